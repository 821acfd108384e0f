"""IQ4_NL (32-element blocks) and IQ4_XS (256-element super-blocks): 4-bit indices into a fixed codebook.

Matches ggml_quantize_chunk, i.e. quantize_row_iq4_nl_impl with ntry = 7 and weights x^2 (not
quantize_row_iq4_nl_ref, whose ntry = -1 gives other bytes).
"""

from __future__ import annotations

import numpy as np
import torch

from fuselm.quants import qweights
from fuselm.quants.cfloat import F32, GROUP_MAX_EPS, fp16_bytes, inverse, nearest_int, select, seq_sum, signed_absmax
from fuselm.quants.ksearch import SLICE
from fuselm.quants.unpacked import Unpacked

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl
_VALUES = np.array(KVALUES, dtype=F32)
_VALUES_I8 = torch.tensor(KVALUES, dtype=torch.int8)
NTRY = 7


def _nearest_table() -> tuple[np.ndarray, np.ndarray]:
    """Lookup tables from floor(2v) to best_index(v) and to its codebook value.

    ggml's best_index_int8 brackets v between two codebook values and takes the nearer one by
    `v - lo < hi - v` (a tie goes up). Near a midpoint both differences are exact in float32, so the answer is
    the number of midpoints <= v; the midpoints are multiples of 1/2, hence a table over floor(2v).
    """
    mids = np.array([(a + b) / 2 for a, b in zip(KVALUES[:-1], KVALUES[1:])])
    halves = np.arange(_LO, _HI + 1) / 2
    idx = (halves[:, None] >= mids).sum(1)
    return idx.astype(np.uint8), _VALUES[idx]


_LO, _HI = 2 * KVALUES[0] - 1, 2 * KVALUES[-1] + 1  # floor(2v) beyond these clamps to index 0 / 15
_INDEX, _VALUE = _nearest_table()


def _slot(v2: np.ndarray) -> np.ndarray:
    """Table slot for v2 = 2v; NaN (only from groups whose result is discarded) lands on slot 0."""
    with np.errstate(invalid="ignore"):
        s = np.floor(np.clip(v2, _LO, _HI, out=v2), out=v2).astype(np.int32)
    return np.clip(s, _LO, _HI, out=s) - _LO


def best_index(v: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8(16, kvalues_iq4nl, v) as uint8."""
    return _INDEX[_slot(v * F32(2))]


def _group_scales(x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """The float scale of each 32-group: x, w [32, G] -> scale [G] (0 for groups with max |x| < 1e-15).
    The weights w default to x^2 (no importance matrix).

    The 16 trial scales only differ in the inverse scale, so their sums are computed together
    ([32, 16, groups] at a time); the choice among them then replays C's running comparison.
    """
    amax, mx = signed_absmax(x, 0)
    n, G = x.shape
    with np.errstate(divide="ignore", invalid="ignore"):
        # trial inverse scales: 1/(-max/values[0]), then (itry + values[0])/max for itry = -7..7
        first = F32(1) / (-mx / F32(KVALUES[0]))
        tries = np.arange(-NTRY, NTRY + 1, dtype=F32) + F32(KVALUES[0])
        ids2 = np.concatenate([first[None], tries[:, None] / mx[None]]) * F32(2)  # [C, G]; (2*id)*x == 2*(id*x)
        C = ids2.shape[0]
        w = x * x if w is None else w
        sumqx = np.empty((C, G), dtype=F32)
        sumq2 = np.empty((C, G), dtype=F32)
        for g0 in range(0, G, SLICE):
            g = slice(g0, g0 + SLICE)
            q = _VALUE[_slot(ids2[None, :, g] * x[:, None, g])]  # [32, C, slice]
            terms = np.empty((n, 2, *q.shape[1:]), dtype=F32)
            wq = np.multiply(w[:, None, g], q, out=terms[:, 1])
            np.multiply(wq, x[:, None, g], out=terms[:, 0])
            np.multiply(wq, q, out=terms[:, 1])
            sumqx[:, g], sumq2[:, g] = seq_sum(terms)

        d = np.where(sumq2[0] > 0, sumqx[0] / sumq2[0], F32(0))
        best = d * sumqx[0]
        for c in range(1, C):
            sqx, sq2 = sumqx[c], sumq2[c]
            better = (sq2 > 0) & (sqx * sqx > best * sq2)
            d = select(better, sqx / sq2, d)
            best = select(better, d * sqx, best)
    return np.where(amax < GROUP_MAX_EPS, F32(0), d)


def _pack(L: np.ndarray) -> np.ndarray:
    """qs[16i + j] = L[32i + j] | L[32i + 16 + j] << 4, L [N, n] in 0..15."""
    q = L.reshape(L.shape[0], -1, 2, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(L.shape[0], -1)


def _unpack(qs: torch.Tensor) -> torch.Tensor:
    q = qs.reshape(qs.shape[0], -1, 1, 16)
    idx = torch.cat([q & 0xF, q >> 4], dim=2).reshape(qs.shape[0], -1)
    return _VALUES_I8[idx.long()]


def quantize_iq4_nl(x: np.ndarray) -> np.ndarray:
    d = _group_scales(np.ascontiguousarray(x.T))
    L = best_index(inverse(d)[:, None] * x)
    return np.concatenate([fp16_bytes(d), _pack(L)], axis=1)


def quantize_iq4_nl_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """With importance weights qw * sqrt(sigma2 + x^2), sigma2 = 2/32 * sum(x^2) of the block."""
    xb = x.reshape(-1, 32)
    sigma2 = qweights.sum_squares(xb) * F32(2 / 32)
    w = qweights.weights(xb, qweights.tile(qw, x.shape[0], 32), sigma2)
    d = _group_scales(np.ascontiguousarray(xb.T), np.ascontiguousarray(w.T))
    L = best_index(inverse(d)[:, None] * xb)
    return np.concatenate([fp16_bytes(d), _pack(L)], axis=1).reshape(x.shape[0], -1)


def quantize_iq4_xs_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """With importance weights qw * sqrt(sigma2 + x^2), sigma2 = 2/256 * sum(x^2) of the super-block."""
    w = qweights.superblock_weights(x, qw)
    return quantize_iq4_xs(x.reshape(-1, 256), w).reshape(x.shape[0], -1)


def quantize_iq4_xs(x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    N = x.shape[0]
    wg = None if w is None else np.ascontiguousarray(w.reshape(-1, 32).T)
    scales = _group_scales(np.ascontiguousarray(x.reshape(-1, 32).T), wg).reshape(N, 8)
    _, max_scale = signed_absmax(scales, 1)
    d = -max_scale / F32(32)
    l = np.clip(nearest_int(inverse(d)[:, None] * scales), -32, 31)
    L = best_index(inverse(d[:, None] * l)[:, :, None] * x.reshape(N, 8, 32)).reshape(N, 256)
    ls = (l + 32).astype(np.int32)
    scales_l = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)
    scales_h = ((ls >> 4) << np.arange(0, 16, 2)).sum(1)
    return np.concatenate([
        fp16_bytes(d), scales_h.astype("<u2").reshape(-1, 1).view(np.uint8),
        scales_l.astype(np.uint8), _pack(L),
    ], axis=1)


def _fp16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32)


def unpack_iq4_nl(b: torch.Tensor) -> Unpacked:
    """codes: int8 codebook values (KVALUES), scale d [N, 1]."""
    return Unpacked(_unpack(b[:, 2:]), _fp16(b[:, :2]), None, 32)


def unpack_iq4_xs(b: torch.Tensor) -> Unpacked:
    """codes: int8 codebook values (KVALUES), scale d*(ls - 32) per 32."""
    sh = b[:, 2].to(torch.int32) | (b[:, 3].to(torch.int32) << 8)
    high = (sh[:, None] >> torch.arange(0, 16, 2)) & 3
    sl = b[:, 4:8]
    low = torch.stack([sl & 0xF, sl >> 4], dim=2).reshape(-1, 8)
    ls = (low.to(torch.int32) | (high << 4)).to(torch.float32) - 32
    return Unpacked(_unpack(b[:, 8:]), _fp16(b[:, :2]) * ls, None, 32)
