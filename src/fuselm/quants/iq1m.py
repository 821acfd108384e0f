"""IQ1_M (quantize_row_iq1_m_impl): as IQ1_S but 16-element groups, each 8-element half with its own shift
sign, 3-bit scales per 16, and the fp16 super-block scale refitted over the whole block and stored in four
nibbles spread over the scale words. Works with or without importance weights."""

from __future__ import annotations

import numpy as np
import torch

from fuselm.quants import qweights
from fuselm.quants.cfloat import F32, nearest_int
from fuselm.quants.iq1 import X_M, X_P, refit, scan_splits, snap_to_grid
from fuselm.quants.iq_grids import lattice
from fuselm.quants.iqcommon import sum_last
from fuselm.quants.unpacked import Unpacked

QK_K = 256
_EPS_IQ1_M = F32(1e-7)
_MASKS = np.array([0x00, 0x80, 0x08, 0x88], dtype=np.int64)  # qh bits of the halves' shifts, per best_k
# best_k: bit 1 set -> first half uses x_m, bit 0 set -> second half uses x_m
_HALF_VALUES = np.stack([np.stack([X_P, X_P]), np.stack([X_P, X_M]), np.stack([X_M, X_P]), np.stack([X_M, X_M])])


def _best_split(xb: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The exhaustive fit over splits (i1, i2) and the four shift pairs, with ggml's per-half prefix sums.
    -> (found [G], scale [G], best_k [G], L [G, 16])."""
    G, n = xb.shape
    order = np.argsort(xb, axis=1, kind="stable")
    xs = np.take_along_axis(xb, order, axis=1)
    ws = np.take_along_axis(w, order, axis=1)
    second = order >= n // 2
    px = np.zeros((2, G, n + 1), dtype=F32)
    pw = np.zeros((2, G, n + 1), dtype=F32)
    for j in range(n):
        for h in (0, 1):
            mine = second[:, j] == bool(h)
            px[h, :, j + 1] = np.where(mine, px[h, :, j] + ws[:, j] * xs[:, j], px[h, :, j])
            pw[h, :, j + 1] = np.where(mine, pw[h, :, j] + ws[:, j], pw[h, :, j])
    txs, tws = px[:, :, n:], pw[:, :, n:]
    p2, m2 = X_P[2], X_M[2]
    cp1, cp2 = X_P[0] * X_P[0] - X_P[1] * X_P[1], X_P[1] * X_P[1] - X_P[2] * X_P[2]
    cm1, cm2 = X_M[0] * X_M[0] - X_M[1] * X_M[1], X_M[1] * X_M[1] - X_M[2] * X_M[2]
    i1, i2 = np.triu_indices(n + 1)
    sx = px[:, :, i1] + px[:, :, i2]  # [2, G, C]
    qx_p, qx_m = txs * p2 - sx, txs * m2 - sx
    q2_p = tws * p2 * p2 + pw[:, :, i1] * cp1 + pw[:, :, i2] * cp2
    q2_m = tws * m2 * m2 + pw[:, :, i1] * cm1 + pw[:, :, i2] * cm2
    cands = [(qx_p[0] + qx_p[1], q2_p[0] + q2_p[1]), (qx_p[0] + qx_m[1], q2_p[0] + q2_m[1]),
             (qx_m[0] + qx_p[1], q2_m[0] + q2_p[1]), (qx_m[0] + qx_m[1], q2_m[0] + q2_m[1])]
    return scan_splits(cands, i1, i2, order)


def quantize_iq1_m(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """x [rows, cols] (or blocks [N, 256] without qw) -> bytes [rows, row_bytes]."""
    lat = lattice("IQ1_M")
    xb = x.reshape(-1, 16)
    if qw is None:
        w = xb * xb
    else:
        w = qweights.superblock_weights(x, qw).reshape(-1, 16)
    G = xb.shape[0]
    N = G // 16
    scale = np.zeros(G, dtype=F32)
    shift = np.zeros(G, dtype=np.int64)
    index = np.zeros((G, 2), dtype=np.int64)
    a = np.flatnonzero(np.abs(xb).max(axis=1) >= _EPS_IQ1_M)
    found, sc, k, L = _best_split(xb[a], w[a])
    a, sc, k, L = a[found], sc[found], k[found], L[found]
    flip = sc < 0
    L = np.where(flip[:, None], 2 - L, L)
    sc, k = np.abs(sc), np.where(flip, 3 - k, k)
    values = _HALF_VALUES[k]  # [g, 2, 3]
    idx, on = snap_to_grid(lat, xb[a], w[a], sc, values, L)
    sumqx, sumq2 = refit(lat, xb[a], w[a], idx, values)
    sc = np.where(~on & (sumqx > 0) & (sumq2 > 0), sumqx / sumq2, sc)
    scale[a], shift[a], index[a] = sc, k, idx

    s = scale.reshape(N, 16)
    max_scale = np.maximum(s.max(axis=1), F32(0))
    live = max_scale > 0
    d = max_scale / F32(15)
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.clip(nearest_int(F32(0.5) * ((F32(1) / d)[:, None] * s - F32(1))), 0, 7).astype(np.int64)
    qh = (index[:, 0] >> 8) | ((index[:, 1] >> 8) << 4)
    qh = qh.reshape(N, 16) | np.where(live[:, None], _MASKS[shift.reshape(N, 16)], 0)
    # the super-block scale is refitted over all 256 elements with the stored levels and 3-bit scales
    values = _HALF_VALUES[shift]  # [G, 2, 3]
    levels = lat.levels[index].astype(np.intp)  # [G, 2, 8]
    q = np.take_along_axis(values, levels, axis=2).reshape(N, 16, 16) * (F32(2) * l.astype(F32) + F32(1))[:, :, None]
    wq = w.reshape(N, 16, 16) * q
    sumqx_f = sum_last((wq * xb.reshape(N, 16, 16)).reshape(N, QK_K))
    sumq2_f = sum_last((wq * q).reshape(N, QK_K))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(sumq2_f > 0, sumqx_f / sumq2_f, d)
    bits = (d * F32(1.1125)).astype(np.float16).view(np.uint16).astype(np.int64)
    sc_words = (l.reshape(N, 4, 4) << np.array([0, 3, 6, 9])).sum(2)
    sc_words |= ((bits[:, None] >> np.array([0, 4, 8, 12])) & 0xF) << 12
    sc_words = np.where(live[:, None], sc_words, 0)
    return np.concatenate([
        (index & 255).astype(np.uint8).reshape(N, 32), qh.astype(np.uint8), sc_words.astype("<u2").view(np.uint8),
    ], axis=1).reshape(x.shape[0], -1)


def unpack_iq1_m(b: torch.Tensor) -> Unpacked:
    """codes: 8 * (grid value + delta) (int8, odd), scale d * (2*ls + 1) / 8 per 16 (exactly dl * (g + delta))."""
    N = b.shape[0]
    words = b[:, 48:56].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF  # [N, 4]
    d_bits = ((words >> 12) << torch.tensor([0, 4, 8, 12])).sum(1).to(torch.int16)
    d = d_bits.view(torch.float16).to(torch.float32)
    ls = ((words.unsqueeze(-1) >> torch.tensor([0, 3, 6, 9])) & 7).reshape(N, 16)
    qh = b[:, 32:48].to(torch.int64)
    halves = torch.stack([qh & 0xF, qh >> 4], dim=2)  # [N, 16, 2]
    index = b[:, :32].to(torch.int64).reshape(N, 16, 2) | ((halves & 7) << 8)
    grid = torch.from_numpy(lattice("IQ1_M").values.astype(np.int8))[index]  # [N, 16, 2, 8]
    delta = torch.where((halves & 8) != 0, -1, 1).to(torch.int8)
    codes = (grid * 8 + delta.unsqueeze(-1)).reshape(N, QK_K)
    return Unpacked(codes, d[:, None] * (2 * ls + 1).to(torch.float32) / 8, None, 16)
