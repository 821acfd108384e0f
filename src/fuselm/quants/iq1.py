"""IQ1_S (quantize_row_iq1_s_impl): 32-element groups of ternary levels {-1, 0, 1} shifted by +-1/8, as 4
points of IQ1's 2048-point grid, with a 3-bit scale and the shift's sign per group. Requires importance weights.

With three levels the weighted least-squares fit is solved exactly: sort the group, and every split of the
sorted values into three runs (i1 <= i2) is a candidate, for either shift; C's running comparison over the
1122 candidates is replayed for all groups at once.
"""

from __future__ import annotations

import numpy as np
import torch

from fuselm.quants import qweights
from fuselm.quants.cfloat import F32, fp16_bytes, nearest_int
from fuselm.quants.iq_grids import Lattice, best_neighbour, lattice
from fuselm.quants.iqcommon import fp16, sum_last
from fuselm.quants.unpacked import Unpacked

QK_K = 256
DELTA = F32(0.125)  # IQ1S_DELTA
X_P = np.array([-1 + 0.125, 0.125, 1 + 0.125], dtype=F32)
X_M = np.array([-1 - 0.125, -0.125, 1 - 0.125], dtype=F32)
_EPS_IQ1_S = F32(1e-12)


def _splits(n: int) -> tuple[np.ndarray, np.ndarray]:
    i1, i2 = np.triu_indices(n + 1)  # row-major: i1 outer, i2 = i1..n inner, C's loop order
    return i1, i2


def scan_splits(cands: list[tuple[np.ndarray, np.ndarray]], i1: np.ndarray, i2: np.ndarray, order: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ggml's scan over splits (outer) and candidate level sets (inner), each (sumqx, sumq2) [G, C]: the first
    strictly better a^2/b wins. -> (found [G], scale [G], candidate k [G] (read only where found), L [G, n] in
    0..2 in the groups' own order)."""
    G, n = order.shape
    best = np.full(G, -np.finfo(F32).max, dtype=F32)
    scale = np.zeros(G, dtype=F32)
    pick = np.full(G, -1, dtype=np.int64)
    which = np.zeros(G, dtype=np.int64)
    for c in range(i1.size):
        for k, (sqx, sq2) in enumerate(cands):
            a, b = sqx[:, c], sq2[:, c]
            better = (b > 0) & (a * a > best * b)
            scale = np.where(better, a / b, scale)
            best = np.where(better, scale * a, best)
            pick = np.where(better, c, pick)
            which = np.where(better, k, which)
    found = pick >= 0
    p = np.maximum(pick, 0)
    pos = np.arange(n)
    Ls = (pos >= i1[p][:, None]).astype(np.uint8) + (pos >= i2[p][:, None]).astype(np.uint8)
    L = np.empty_like(Ls)
    np.put_along_axis(L, order, Ls, axis=1)
    return found, scale, which, L


def best_split(xb: np.ndarray, w: np.ndarray, levels: tuple[np.ndarray, ...]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The exhaustive three-level fit of groups xb, w [G, n] over the level sets `levels` (tried in turn at
    each split). -> (found [G], scale [G], which level set [G], L [G, n] in 0..2)."""
    G, n = xb.shape
    order = np.argsort(xb, axis=1, kind="stable")  # glibc's qsort is a merge sort: ties keep their order
    xs = np.take_along_axis(xb, order, axis=1)
    ws = np.take_along_axis(w, order, axis=1)
    sumx = np.zeros((G, n + 1), dtype=F32)
    sumw = np.zeros((G, n + 1), dtype=F32)
    for j in range(n):
        sumx[:, j + 1] = sumx[:, j] + ws[:, j] * xs[:, j]
        sumw[:, j + 1] = sumw[:, j] + ws[:, j]
    i1, i2 = _splits(n)
    parts_x = (sumx[:, i1] - sumx[:, :1], sumx[:, i2] - sumx[:, i1], sumx[:, n:] - sumx[:, i2])
    parts_w = (sumw[:, i1] - sumw[:, :1], sumw[:, i2] - sumw[:, i1], sumw[:, n:] - sumw[:, i2])
    cands = []
    for p in levels:
        sumqx = parts_x[0] * p[0] + parts_x[1] * p[1] + parts_x[2] * p[2]
        sumq2 = parts_w[0] * p[0] * p[0] + parts_w[1] * p[1] * p[1] + parts_w[2] * p[2] * p[2]
        cands.append((sumqx, sumq2))
    return scan_splits(cands, i1, i2, order)


def snap_to_grid(lat: Lattice, xb: np.ndarray, w: np.ndarray, scale: np.ndarray, values: np.ndarray,
                 L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points of 8 levels [G, n] onto the grid; an off-grid point takes iq1_find_best_neighbour2's choice
    (least sum w*(scale*values[l] - x)^2). values [G, n/8, 3]: each point's level values.
    -> (grid index [G, n/8], all on grid [G])."""
    G, n = L.shape
    Lp = L.reshape(G, n // 8, 8)
    keys = lat.key(Lp)
    index = lat.index_of[keys]
    off = index < 0
    g, h = np.nonzero(off)
    if g.size:
        index[g, h] = best_neighbour(lat, keys[g, h], xb.reshape(G, -1, 8)[g, h], w.reshape(G, -1, 8)[g, h],
                                     scale[g], values[g, h])
    return index, ~off.any(1)


def refit(lat: Lattice, xb: np.ndarray, w: np.ndarray, index: np.ndarray, values: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """sumqx, sumq2 of the grid points `index` [G, n/8] with q = values[point, level]."""
    G, n = xb.shape
    levels = lat.levels[index].astype(np.intp)  # [G, n/8, 8]
    q = np.take_along_axis(values, levels, axis=2).reshape(G, n)
    wq = w * q
    return sum_last(wq * xb), sum_last(wq * q)


def quantize_iq1_s(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    lat = lattice("IQ1_S")
    w = qweights.superblock_weights(x, qw).reshape(-1, 32)
    xb = x.reshape(-1, 32)
    G = xb.shape[0]
    scale = np.zeros(G, dtype=F32)
    shift = np.ones(G, dtype=np.int64)
    index = np.zeros((G, 4), dtype=np.int64)
    a = np.flatnonzero(np.abs(xb).max(axis=1) >= _EPS_IQ1_S)
    found, sc, which, L = best_split(xb[a], w[a], (X_P, X_M))
    a, sc, L = a[found], sc[found], L[found]
    sh = np.where(which[found] == 0, 1, -1)
    flip = sc < 0
    L = np.where(flip[:, None], 2 - L, L)
    sc, sh = np.abs(sc), np.where(flip, -sh, sh)
    values = np.broadcast_to(np.where((sh == 1)[:, None], X_P, X_M)[:, None, :], (sh.size, 4, 3))
    idx, on = snap_to_grid(lat, xb[a], w[a], sc, values, L)
    sumqx, sumq2 = refit(lat, xb[a], w[a], idx, values)
    sc = np.where(~on & (sumqx > 0) & (sumq2 > 0), sumqx / sumq2, sc)
    scale[a], shift[a], index[a] = sc, sh, idx

    s = scale.reshape(-1, 8)
    max_scale = np.maximum(s.max(axis=1), F32(0))
    d = max_scale / F32(15)
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.clip(nearest_int(F32(0.5) * ((F32(1) / d)[:, None] * s - F32(1))), 0, 7).astype(np.int64)
    l |= np.where(shift.reshape(-1, 8) == -1, 8, 0)
    live = max_scale > 0
    l = np.where(live[:, None], l, 0)
    h = ((index >> 8) << np.array([0, 3, 6, 9])).sum(1).reshape(-1, 8) | (l << 12)
    return np.concatenate([
        fp16_bytes(np.where(live, d * F32(1.125), F32(0))), (index & 255).astype(np.uint8).reshape(-1, 32),
        h.astype("<u2").view(np.uint8),
    ], axis=1).reshape(x.shape[0], -1)


def unpack_iq1_s(b: torch.Tensor) -> Unpacked:
    """codes: 8 * (grid value + delta) (int8, odd), scale d * (2*ls + 1) / 8 per 32 (exactly dl * (g + delta))."""
    N = b.shape[0]
    qh = b[:, 34:50].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF  # [N, 8]
    high = (qh.unsqueeze(-1) >> torch.tensor([0, 3, 6, 9])) & 7  # [N, 8, 4]
    index = b[:, 2:34].to(torch.int64).reshape(N, 8, 4) | (high.to(torch.int64) << 8)
    grid = torch.from_numpy(lattice("IQ1_S").values.astype(np.int8))[index].reshape(N, 8, 32)
    delta = torch.where((qh & 0x8000) != 0, -1, 1).to(torch.int8)  # [N, 8]
    codes = (grid * 8 + delta.unsqueeze(-1)).reshape(N, QK_K)
    dl = fp16(b[:, :2]) * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)
    return Unpacked(codes, dl / 8, None, 32)
