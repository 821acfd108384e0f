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
    """Row chunk -> groups of n: magnitudes, weights, sqrt weights, sign bits [G, n/8], per-group max."""
    w = qweights.superblock_weights(x, qw, scale=1.0).reshape(-1, 8)
    xg = x.reshape(-1, 8)
    xval, signs = fold_signs(xg, w)
    xval, w = xval.reshape(-1, n), w.reshape(-1, n)
    return xval, w, np.sqrt(w), signs.reshape(-1, n // 8), xval.max(axis=1)


def _block_scales(scale: np.ndarray, per_block: int) -> tuple[np.ndarray, np.ndarray]:
    """Group scales [N*per_block] -> fp16 d [N] (max/31) and 4-bit codes [N, per_block]."""
    s = scale.reshape(-1, per_block)
    max_scale = np.maximum(s.max(axis=1), F32(0))
    d = max_scale / F32(31)
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.clip(nearest_int(F32(0.5) * ((F32(1) / d)[:, None] * s - F32(1))), 0, 15).astype(np.uint8)
    return d, np.where(max_scale[:, None] > 0, l, 0).astype(np.uint8)


def _finish_signs(scale: np.ndarray, signs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flip = scale < 0  # "should never happen": ggml flips the scale and all signs
    return np.abs(scale), np.where(flip[:, None], ~signs & 127, signs)


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
    sc, signs[a] = _finish_signs(sc, signs[a])
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
