"""IQ3_XXS and IQ3_S (quantize_row_iq3_xxs_impl / quantize_row_iq3_s_impl): groups of 32 magnitudes as 8
points of a 4-element lattice grid (levels 0..7), one 4-bit scale per 32.

IQ3_XXS keeps 7 sign bits per 8 (the eighth by parity, as IQ2) and 256 grid points; IQ3_S keeps all 8 sign
bits and 512 grid points (a ninth index bit in qh). Both work with or without importance weights.
"""

from __future__ import annotations

import numpy as np
import torch

from fuselm.quants import qweights
from fuselm.quants.cfloat import F32, fp16_bytes, nearest_int
from fuselm.quants.iq_grids import lattice
from fuselm.quants.iqcommon import fold_signs, fp16, sign_bits
from fuselm.quants.iqsearch import search
from fuselm.quants.unpacked import Unpacked

QK_K = 256
K_MAX_Q = 8
_EPS_IQ3_XXS = F32(1e-8)  # GROUP_MAX_EPS_IQ3_XXS


def _weights(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """[rows * cols / 256, 256]: qw * sqrt(2*mean(x^2) + x^2) per super-block, or x^2 without qw."""
    if qw is None:
        xb = x.reshape(-1, QK_K)
        return xb * xb
    return qweights.superblock_weights(x, qw)


def _scale_codes(scale: np.ndarray, fudge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group scales [N*8] -> (max scale [N], fp16 d = max/31 * fudge [N], 4-bit codes [N, 8])."""
    s = scale.reshape(-1, 8)
    max_scale = np.maximum(s.max(axis=1), F32(0))
    d = max_scale / F32(31)
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.clip(nearest_int(F32(0.5) * ((F32(1) / d)[:, None] * s - F32(1))), 0, 15).astype(np.uint32)
    live = max_scale > 0
    return max_scale, np.where(live, d * F32(fudge), F32(0)), np.where(live[:, None], l, 0)


def _run(type_name: str, xval: np.ndarray, w: np.ndarray, live: np.ndarray, steps: range, on_grid: bool,
         redo: str) -> tuple[np.ndarray, np.ndarray]:
    lat = lattice(type_name)
    G = xval.shape[0]
    scale = np.zeros(G, dtype=F32)
    L = np.zeros((G, 32), dtype=np.uint8)
    a = np.flatnonzero(live)
    top = xval[a].max(axis=1)
    scale[a], L[a] = search(lat, K_MAX_Q, xval[a], w[a], np.sqrt(w[a]), top, steps, 0.2,
                            top / F32(2 * K_MAX_Q - 1), np.zeros((a.size, 32), dtype=np.uint8), on_grid, redo)
    index = lat.index_of[lat.key(L.reshape(G, 8, 4))]
    return scale, index


def quantize_iq3_xxs(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """x [rows, cols] (or blocks [N, 256] without qw) -> bytes [rows, row_bytes]."""
    w = _weights(x, qw).reshape(-1, 8)
    xval, signs = fold_signs(x.reshape(-1, 8), w)
    xval, w, signs = xval.reshape(-1, 32), w.reshape(-1, 32), signs.reshape(-1, 4).astype(np.uint32)
    live = xval.max(axis=1) >= _EPS_IQ3_XXS
    scale, index = _run("IQ3_XXS", xval, w, live, range(-15, 16), True, "off-grid")
    signs = np.where((scale < 0)[:, None], ~signs & 127, signs)
    scale = np.abs(scale)
    index = np.where(live[:, None], index, 0).astype(np.uint8)
    signs = np.where(live[:, None], signs, 0)
    max_scale, d, l = _scale_codes(scale, 1.0125)
    words = (signs << np.array([0, 7, 14, 21], dtype=np.uint32)).sum(1, dtype=np.uint32).reshape(-1, 8) | (l << 28)
    q3 = np.concatenate([index.reshape(-1, 64), words.astype("<u4").view(np.uint8)], axis=1)
    q3[max_scale == 0] = 0
    return np.concatenate([fp16_bytes(d), q3], axis=1).reshape(x.shape[0], -1)


def quantize_iq3_s(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """x [rows, cols] (or blocks [N, 256] without qw) -> bytes [rows, row_bytes]."""
    w = _weights(x, qw).reshape(-1, 32)
    xg = x.reshape(-1, 32)
    neg = ~(xg >= 0)
    xval = np.where(neg, -xg, xg)
    signs = np.packbits(neg.reshape(-1, 8), axis=1, bitorder="little").reshape(-1, 4)
    live = xval.max(axis=1) != 0
    scale, index = _run("IQ3_S", xval, w, live, range(-9, 10), False, "all-if-off-grid")
    signs = np.where((scale < 0)[:, None], ~signs, signs)
    scale = np.abs(scale)
    N = xg.shape[0] // 8
    index = np.where(live[:, None], index, 0)
    qh = np.packbits((index >> 8).astype(np.uint8), axis=1, bitorder="little").reshape(N, 8)
    # ggml advances its qs/signs write position only past groups it quantized: a zero group's slot is taken by
    # the next group, and the super-block's last slots stay zero
    live_b = live.reshape(N, 8)
    slot = np.cumsum(live_b, axis=1) - 1
    qs = np.zeros((N, 8, 8), dtype=np.uint8)
    sg = np.zeros((N, 8, 4), dtype=np.uint8)
    n, g = np.nonzero(live_b)
    qs[n, slot[n, g]] = (index.reshape(N, 8, 8)[n, g] & 255).astype(np.uint8)
    sg[n, slot[n, g]] = signs.reshape(N, 8, 4)[n, g]
    _, d, l = _scale_codes(scale, 1.033)
    scales = (l[:, 0::2] | (l[:, 1::2] << 4)).astype(np.uint8)
    out = np.concatenate([fp16_bytes(d), qs.reshape(N, 64), qh, sg.reshape(N, 32), scales], axis=1)
    return out.reshape(x.shape[0], -1)


def _grid_codes(type_name: str, index: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    grid = torch.from_numpy(lattice(type_name).values.astype(np.int8))[index.long()]  # [N, 64, 4]
    return grid.reshape(index.shape[0], -1, 8) * signs


def unpack_iq3_xxs(b: torch.Tensor) -> Unpacked:
    """codes: signed grid values (int8), scale d * (0.5 + ls) * 0.5 per 32."""
    N = b.shape[0]
    words = b[:, 66:98].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # [N, 8]
    s7 = (words.unsqueeze(-1) >> torch.tensor([0, 7, 14, 21])) & 127  # [N, 8, 4]
    codes = _grid_codes("IQ3_XXS", b[:, 2:66], sign_bits(s7.reshape(N, 32))).reshape(N, QK_K)
    ls = (words >> 28).to(torch.float32)
    return Unpacked(codes, fp16(b[:, :2]) * (0.5 + ls) * 0.5, None, 32)


def unpack_iq3_s(b: torch.Tensor) -> Unpacked:
    """codes: signed grid values (int8), scale d * (1 + 2*ls) per 32."""
    N = b.shape[0]
    high = ((b[:, 66:74].unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(N, 64)
    index = b[:, 2:66].to(torch.int32) | (high.to(torch.int32) << 8)
    signs = 1 - 2 * ((b[:, 74:106].unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).to(torch.int8)
    codes = _grid_codes("IQ3_S", index, signs.reshape(N, 32, 8)).reshape(N, QK_K)
    sc = b[:, 106:110]
    ls = torch.stack([sc & 0xF, sc >> 4], dim=2).reshape(N, 8).to(torch.float32)
    return Unpacked(codes, fp16(b[:, :2]) * (1 + 2 * ls), None, 32)
