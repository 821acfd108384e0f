"""IQ2_XXS, IQ2_XS and IQ2_S (quantize_row_iq2_*_impl): groups of 8 magnitudes snapped to an E8 lattice grid,
signs kept separately (7 bits, the eighth by parity), one 4-bit scale per 32 (XXS) or 16 (XS, S) elements.

Each group tries a range of scales; for each, every 8 magnitudes are rounded to levels 0..2 and, when that
point is off the grid, replaced by its best neighbour. All groups of a chunk go through a trial together.
"""

from __future__ import annotations

import numpy as np
import torch

from fuselm.quants import qweights
from fuselm.quants.cfloat import F32, GROUP_MAX_EPS, fp16_bytes, nearest_int
from fuselm.quants.iq_grids import lattice
from fuselm.quants.iqcommon import fold_signs, fp16, sign_bits
from fuselm.quants.iqsearch import search
from fuselm.quants.ksearch import make_qp_quants
from fuselm.quants.unpacked import Unpacked

QK_K = 256
K_MAX_Q = 3


def _prepare(x: np.ndarray, qw: np.ndarray, n: int):
    """Row chunk -> groups of n: magnitudes, weights, sqrt weights, sign bits [G, n/8], per-group max
    (IQ2_XXS and IQ2_XS: sigma2 = mean(x^2), signs folded to an even count)."""
    w = qweights.superblock_weights(x, qw, scale=1.0).reshape(-1, 8)
    xg = x.reshape(-1, 8)
    xval, signs = fold_signs(xg, w)
    xval, w = xval.reshape(-1, n), w.reshape(-1, n)
    return xval, w, np.sqrt(w), signs.reshape(-1, n // 8), xval.max(axis=1)


def _block_scales(scale: np.ndarray, per_block: int, fudge: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Group scales [N*per_block] -> fp16 d [N] (max/31 * fudge, 0 when max is 0) and 4-bit codes."""
    s = scale.reshape(-1, per_block)
    max_scale = np.maximum(s.max(axis=1), F32(0))
    d = max_scale / F32(31)
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.clip(nearest_int(F32(0.5) * ((F32(1) / d)[:, None] * s - F32(1))), 0, 15).astype(np.uint8)
    live = max_scale > 0
    return np.where(live, d * F32(fudge), F32(0)), np.where(live[:, None], l, 0).astype(np.uint8)


def _finish_signs(scale: np.ndarray, signs: np.ndarray, mask: int) -> tuple[np.ndarray, np.ndarray]:
    flip = scale < 0  # "should never happen": ggml flips the scale and all signs
    return np.abs(scale), np.where(flip[:, None], ~signs & mask, signs)


# ---------------------------------------------------------------- IQ2_XXS: scale per 32, 8-bit grid index


def quantize_iq2_xxs(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    lat = lattice("IQ2_XXS")
    xval, w, waux, signs, top = _prepare(x, qw, 32)
    G = xval.shape[0]
    scale = np.zeros(G, dtype=F32)
    L = np.zeros((G, 32), dtype=np.uint8)
    a = np.flatnonzero(top >= GROUP_MAX_EPS)
    qp_scale, qp_L = make_qp_quants(np.ascontiguousarray(xval[a].T), K_MAX_Q + 1, np.ascontiguousarray(w[a].T))
    eff_max = qp_scale * F32(K_MAX_Q)
    a, qp_scale, qp_L, eff_max = a[eff_max > 0], qp_scale[eff_max > 0], qp_L[:, eff_max > 0], eff_max[eff_max > 0]
    sc, La = search(lat, K_MAX_Q, xval[a], w[a], waux[a], eff_max, range(-6, 7), 0.1, qp_scale,
                    qp_L.T.astype(np.uint8), True, "all")
    sc, signs[a] = _finish_signs(sc, signs[a], 127)
    scale[a], L[a] = sc, La
    live = np.zeros(G, dtype=bool)
    live[a] = True
    index = np.where(live[:, None], lat.index_of[lat.key(L.reshape(G, 4, 8))], 0).astype(np.uint32)
    signs = np.where(live[:, None], signs, 0).astype(np.uint32)
    d, ls = _block_scales(scale, 8)
    grid_word = (index << np.array([0, 8, 16, 24], dtype=np.uint32)).sum(1, dtype=np.uint32)
    sign_word = (signs << np.array([0, 7, 14, 21], dtype=np.uint32)).sum(1, dtype=np.uint32)
    q2 = np.stack([grid_word.reshape(-1, 8), sign_word.reshape(-1, 8) | (ls.astype(np.uint32) << 28)], axis=2)
    q2 = q2.reshape(-1, 16)
    q2[d == 0] = 0
    return np.concatenate([fp16_bytes(d), q2.astype("<u4").view(np.uint8)], axis=1).reshape(x.shape[0], -1)


def unpack_iq2_xxs(b: torch.Tensor) -> Unpacked:
    """codes: signed grid values (int8), scale d * (0.5 + ls) * 0.25 per 32."""
    N = b.shape[0]
    words = (b[:, 2:66].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF).reshape(N, 8, 2)
    index = (words[:, :, :1] >> torch.tensor([0, 8, 16, 24])) & 255  # [N, 8, 4]
    s7 = (words[:, :, 1:] >> torch.tensor([0, 7, 14, 21])) & 127
    grid = torch.from_numpy(lattice("IQ2_XXS").values.astype(np.int8))[index.reshape(N, 32)]
    codes = (grid * sign_bits(s7.reshape(N, 32))).reshape(N, QK_K)
    ls = (words[:, :, 1] >> 28).to(torch.float32)
    return Unpacked(codes, fp16(b[:, :2]) * (0.5 + ls) * 0.25, None, 32)


# ---------------------------------------------------------------- IQ2_S: scale per 16, 10-bit grid index

_EPS_IQ2_S = F32(1e-8)  # GROUP_MAX_EPS_IQ2_S


def quantize_iq2_s(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """x [rows, cols] (or blocks [N, 256] without qw) -> bytes [rows, row_bytes]."""
    lat = lattice("IQ2_S")
    xb = x.reshape(-1, QK_K)
    if qw is None:  # weight = 0.25*sigma2 + x^2 with sigma2 = 2*mean(x^2)
        sigma2 = F32(2) * qweights.sum_squares(xb) / F32(QK_K)
        w = F32(0.25) * sigma2[:, None] + xb * xb
    else:
        w = qweights.superblock_weights(x, qw)
    xg = x.reshape(-1, 16)
    neg = ~(xg >= 0)
    xval = np.where(neg, -xg, xg)
    signs = np.packbits(neg.reshape(-1, 8), axis=1, bitorder="little").reshape(-1, 2)
    w = w.reshape(-1, 16)
    G = xg.shape[0]
    top = xval.max(axis=1)
    a = np.flatnonzero(top >= _EPS_IQ2_S)
    scale = np.zeros(G, dtype=F32)
    L = np.zeros((G, 16), dtype=np.uint8)
    sc, La = search(lat, K_MAX_Q, xval[a], w[a], np.sqrt(w[a]), top[a], range(-9, 10), 0.1,
                    top[a] / F32(2 * K_MAX_Q - 1), np.zeros((a.size, 16), dtype=np.uint8), True, "off-grid")
    sc, signs[a] = _finish_signs(sc, signs[a], 255)
    scale[a], L[a] = sc, La
    live = np.zeros(G, dtype=bool)
    live[a] = True
    index = np.where(live[:, None], lat.index_of[lat.key(L.reshape(G, 2, 8))], 0).reshape(-1, 32)
    signs = np.where(live[:, None], signs, 0).reshape(-1, 32)
    qh = ((index >> 8).reshape(-1, 8, 4) << np.array([0, 2, 4, 6])).sum(2).astype(np.uint8)
    d, ls = _block_scales(scale, 16, 0.9875)
    return np.concatenate([
        fp16_bytes(d), (index & 255).astype(np.uint8), signs, qh, ls[:, 0::2] | (ls[:, 1::2] << 4),
    ], axis=1).reshape(x.shape[0], -1)


def unpack_iq2_s(b: torch.Tensor) -> Unpacked:
    """codes: signed grid values (int8), scale d * (0.5 + ls) * 0.25 per 16."""
    N = b.shape[0]
    high = (b[:, 66:74].unsqueeze(-1) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)) & 3
    index = b[:, 2:34].to(torch.int64) | (high.reshape(N, 32).to(torch.int64) << 8)
    grid = torch.from_numpy(lattice("IQ2_S").values.astype(np.int8))[index]  # [N, 32, 8]
    signs = 1 - 2 * ((b[:, 34:66].unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).to(torch.int8)
    codes = (grid * signs).reshape(N, QK_K)
    sc = b[:, 74:82]
    ls = torch.stack([sc & 0xF, sc >> 4], dim=2).reshape(N, 16).to(torch.float32)
    return Unpacked(codes, fp16(b[:, :2]) * (0.5 + ls) * 0.25, None, 16)


# ---------------------------------------------------------------- IQ2_XS: scale per 16, 9-bit grid index


def quantize_iq2_xs(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    lat = lattice("IQ2_XS")
    xval, w, waux, signs, top = _prepare(x, qw, 16)
    G = xval.shape[0]
    live = top >= GROUP_MAX_EPS
    scale = np.zeros(G, dtype=F32)
    L = np.zeros((G, 16), dtype=np.uint8)
    a = np.flatnonzero(live)
    sc, La = search(lat, K_MAX_Q, xval[a], w[a], waux[a], top[a], range(-9, 10), 0.1,
                    top[a] / F32(2 * K_MAX_Q - 1), np.zeros((a.size, 16), dtype=np.uint8), True, "off-grid")
    sc, signs[a] = _finish_signs(sc, signs[a], 127)
    scale[a], L[a] = sc, La
    index = lat.index_of[lat.key(L.reshape(G, 2, 8))].astype(np.uint16)
    q2 = np.where(live[:, None], index | (signs.astype(np.uint16) << 9), 0).reshape(-1, 32)
    d, ls = _block_scales(scale, 16)
    q2[d == 0] = 0
    return np.concatenate([
        fp16_bytes(d), q2.astype("<u2").view(np.uint8), ls[:, 0::2] | (ls[:, 1::2] << 4),
    ], axis=1).reshape(x.shape[0], -1)


def unpack_iq2_xs(b: torch.Tensor) -> Unpacked:
    """codes: signed grid values (int8), scale d * (0.5 + ls) * 0.25 per 16."""
    N = b.shape[0]
    qs = b[:, 2:66].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    grid = torch.from_numpy(lattice("IQ2_XS").values.astype(np.int8))[(qs & 511).long()]  # [N, 32, 8]
    codes = (grid * sign_bits(qs >> 9)).reshape(N, QK_K)
    sc = b[:, 66:74]
    ls = torch.stack([sc & 0xF, sc >> 4], dim=2).reshape(N, 16).to(torch.float32)
    return Unpacked(codes, fp16(b[:, :2]) * (0.5 + ls) * 0.25, None, 16)
