"""IQ4_NL (32-element blocks) and IQ4_XS (256-element super-blocks): 4-bit indices into a fixed codebook.

Matches ggml_quantize_chunk, i.e. quantize_row_iq4_nl_impl with ntry = 7 and weights x^2 (not
quantize_row_iq4_nl_ref, whose ntry = -1 gives other bytes).
"""

from __future__ import annotations

import numpy as np
import torch

from fuselm.quants.cfloat import GROUP_MAX_EPS, fp16_bytes, nearest_int, seq_sum, signed_absmax
from fuselm.quants.unpacked import Unpacked

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl
_VALUES = torch.tensor(KVALUES, dtype=torch.float32)
_VALUES_I8 = torch.tensor(KVALUES, dtype=torch.int8)
NTRY = 7


def _nearest_table() -> tuple[torch.Tensor, torch.Tensor]:
    """Lookup tables from floor(2v) to best_index(v) and to its codebook value.

    ggml's best_index_int8 brackets v between two codebook values and takes the nearer one by
    `v - lo < hi - v` (a tie goes up). Near a midpoint both differences are exact in float32, so the answer is
    the number of midpoints <= v; the midpoints are multiples of 1/2, hence a table over floor(2v).
    """
    mids = [(a + b) / 2 for a, b in zip(KVALUES[:-1], KVALUES[1:])]
    halves = torch.arange(_LO, _HI + 1, dtype=torch.float32) / 2
    idx = (halves[:, None] >= torch.tensor(mids)).sum(1)
    return idx.to(torch.uint8), _VALUES[idx]


_LO, _HI = 2 * KVALUES[0] - 1, 2 * KVALUES[-1] + 1  # floor(2v) beyond these clamps to index 0 / 15
_INDEX, _VALUE = _nearest_table()


def _slot(v2: torch.Tensor) -> torch.Tensor:
    """Table slot for v2 = 2v; NaN (only from groups whose result is discarded) lands on slot 0."""
    return torch.floor(v2.clamp(_LO, _HI)).to(torch.int32).clamp_(_LO, _HI) - _LO


def best_index(v: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8(16, kvalues_iq4nl, v) as uint8."""
    return _INDEX[_slot(v * 2)]


def _group_scales(x: torch.Tensor) -> torch.Tensor:
    """The float scale of each 32-group: x [32, G] -> scale [G] (0 for groups with max |x| < 1e-15)."""
    amax, mx = signed_absmax(x, 0)
    # trial inverse scales: -max/values[0] (inverted), then (itry + values[0])/max for itry = -7..7
    first = 1.0 / (-mx / float(KVALUES[0]))
    tries = torch.from_numpy(np.arange(-NTRY, NTRY + 1, dtype=np.float32) + np.float32(KVALUES[0]))
    ids = torch.cat([first[None], tries[:, None] / mx[None]])  # [C, G]
    q = _VALUE[_slot((ids * 2)[None] * x[:, None])]  # [32, C, G]; (2*id)*x == 2*(id*x) exactly
    w = x * x
    n, C, G = q.shape
    terms = torch.empty((n, 2, C, G), dtype=torch.float32)
    wq = torch.mul(w[:, None], q, out=terms[:, 1])
    torch.mul(wq, x[:, None], out=terms[:, 0])
    torch.mul(wq, q, out=terms[:, 1])
    sumqx, sumq2 = seq_sum(terms)
    del terms, wq

    d = torch.where(sumq2[0] > 0, sumqx[0] / sumq2[0], 0.0)
    best = d * sumqx[0]
    for c in range(1, C):
        sqx, sq2 = sumqx[c], sumq2[c]
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = torch.where(better, sqx / sq2, d)
        best = torch.where(better, d * sqx, best)
    return torch.where(amax < GROUP_MAX_EPS, 0.0, d)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1.0 / d, 0.0)


def _pack(L: torch.Tensor) -> torch.Tensor:
    """qs[16i + j] = L[32i + j] | L[32i + 16 + j] << 4, L [N, n] in 0..15."""
    q = L.to(torch.uint8).reshape(L.shape[0], -1, 2, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(L.shape[0], -1)


def _unpack(qs: torch.Tensor) -> torch.Tensor:
    q = qs.reshape(qs.shape[0], -1, 1, 16)
    idx = torch.cat([q & 0xF, q >> 4], dim=2).reshape(qs.shape[0], -1)
    return _VALUES_I8[idx.long()]


def quantize_iq4_nl(x: torch.Tensor) -> torch.Tensor:
    xs = x.t().contiguous()  # [32, N]
    d = _group_scales(xs)
    L = best_index(_inverse(d)[:, None] * x)
    return torch.cat([fp16_bytes(d), _pack(L)], dim=1)


def quantize_iq4_xs(x: torch.Tensor) -> torch.Tensor:
    N = x.shape[0]
    xs = x.reshape(-1, 32).t().contiguous()  # [32, N*8]
    scales = _group_scales(xs).view(N, 8)
    _, max_scale = signed_absmax(scales, 1)
    d = -max_scale / 32
    l = nearest_int(_inverse(d)[:, None] * scales).clamp_(-32, 31)
    dl = d[:, None] * l
    L = best_index(_inverse(dl).reshape(N, 8, 1) * x.reshape(N, 8, 32)).reshape(N, 256)
    ls = (l + 32).to(torch.int32)
    scales_l = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)
    scales_h = ((ls >> 4) << torch.arange(0, 16, 2)).sum(1, dtype=torch.int32)
    scales_h = torch.stack([scales_h & 0xFF, scales_h >> 8], dim=1)
    return torch.cat([fp16_bytes(d), scales_h.to(torch.uint8), scales_l.to(torch.uint8), _pack(L)], dim=1)


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
