"""Legacy 32-element block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (ggml's quantize_row_*_ref).

quantize_*: float32 blocks [N, 32] (numpy) -> bytes [N, type_size]. unpack_*: bytes (torch) -> codes and
scales. Codes come from the unrounded fp32 scale; Q4_x/Q5_x truncate `x*id + 8.5f` (a plain float multiply
then add, as libggml-base has no FMA), Q8_0 uses roundf.
"""

from __future__ import annotations

import numpy as np
import torch

from fuselm.quants import qweights
from fuselm.quants.bits import unpack_bits
from fuselm.quants.cfloat import F32, amax_along, first_extreme, fp16_bytes, inverse, roundf, signed_absmax
from fuselm.quants.ksearch import make_qkx2_quants, make_qx_quants
from fuselm.quants.unpacked import Unpacked


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Elements 0..15 in the low nibbles, 16..31 in the high nibbles."""
    return (q[:, :16] & 0xF) | (q[:, 16:] << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """uint32 qh, little-endian: bit i is bit 4 of q[i]."""
    return np.packbits(q >> 4, axis=1, bitorder="little")


def _symmetric(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0/Q5_0: d = max / -levels, q = MIN(2*levels - 1, (int)(x*id + levels + 0.5f))."""
    _, mx = signed_absmax(x, axis=1)
    d = mx / F32(-levels)
    q = np.trunc(x * inverse(d)[:, None] + F32(levels + 0.5))
    return d, np.minimum(q, 2 * levels - 1).astype(np.uint8)


def _asymmetric(x: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1/Q5_1: d = (max - min) / top, q = (int)((x - min)*id + 0.5f)."""
    mn = first_extreme(x, 1, largest=False)
    d = (first_extreme(x, 1, largest=True) - mn) / F32(top)
    q = np.trunc((x - mn[:, None]) * inverse(d)[:, None] + F32(0.5))
    return d, mn, np.minimum(q, top).astype(np.uint8)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    d, q = _symmetric(x, 8)
    return np.concatenate([fp16_bytes(d), _nibbles(q)], axis=1)


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    d, q = _symmetric(x, 16)
    return np.concatenate([fp16_bytes(d), _high_bits(q), _nibbles(q)], axis=1)


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    d, mn, q = _asymmetric(x, 15)
    return np.concatenate([fp16_bytes(d), fp16_bytes(mn), _nibbles(q)], axis=1)


def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    d, mn, q = _asymmetric(x, 31)
    return np.concatenate([fp16_bytes(d), fp16_bytes(mn), _high_bits(q), _nibbles(q)], axis=1)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    d = amax_along(np.abs(x), 1) / F32(127)
    q = roundf(x * inverse(d)[:, None]).astype(np.int8)
    return np.concatenate([fp16_bytes(d), q.view(np.uint8)], axis=1)


# ---------------------------------------------------------------- with importance weights (quantize_row_*_impl)
# x [rows, cols], qw [cols] -> bytes [rows, row_bytes]. sigma2 is the mean square of the whole row.


def _blocks_and_weights(x: np.ndarray, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks [N, 32] and their weights, both transposed to the search layout [32, N]."""
    rows, cols = x.shape
    sigma2 = qweights.sum_squares(x) / F32(cols)
    xb = x.reshape(-1, 32)
    w = qweights.weights(xb, qweights.tile(qw, rows, 32), np.repeat(sigma2, cols // 32))
    return np.ascontiguousarray(xb.T), np.ascontiguousarray(w.T)


def _symmetric_weighted(x: np.ndarray, qw: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    xs, w = _blocks_and_weights(x, qw)
    d, L = make_qx_quants(xs, nmax, w)
    return d, L.T.astype(np.uint8)


def _asymmetric_weighted(x: np.ndarray, qw: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs, w = _blocks_and_weights(x, qw)
    d, the_min, L = make_qkx2_quants(xs, w, nmax, -0.9, 0.05, 36, use_mad=False)  # make_qkx3_quants
    return d, -the_min, L.T.astype(np.uint8)


def quantize_q4_0_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    d, q = _symmetric_weighted(x, qw, 8)
    return np.concatenate([fp16_bytes(d), _nibbles(q)], axis=1).reshape(x.shape[0], -1)


def quantize_q5_0_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    d, q = _symmetric_weighted(x, qw, 16)
    return np.concatenate([fp16_bytes(d), _high_bits(q), _nibbles(q)], axis=1).reshape(x.shape[0], -1)


def quantize_q4_1_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    d, m, q = _asymmetric_weighted(x, qw, 15)
    return np.concatenate([fp16_bytes(d), fp16_bytes(m), _nibbles(q)], axis=1).reshape(x.shape[0], -1)


def quantize_q5_1_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    d, m, q = _asymmetric_weighted(x, qw, 31)
    out = np.concatenate([fp16_bytes(d), fp16_bytes(m), _high_bits(q), _nibbles(q)], axis=1)
    return out.reshape(x.shape[0], -1)


def _fp16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per row -> float32 [N, 1]."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _codes(qs: torch.Tensor, qh: torch.Tensor | None = None) -> torch.Tensor:
    q = torch.cat([qs & 0xF, qs >> 4], dim=1)
    return q if qh is None else q | (unpack_bits(qh) << 4)


def unpack_q4_0(b: torch.Tensor) -> Unpacked:
    """codes int8 in -8..7, scale d [N, 1]."""
    return Unpacked(_codes(b[:, 2:]).to(torch.int8) - 8, _fp16(b[:, :2]), None, 32)


def unpack_q5_0(b: torch.Tensor) -> Unpacked:
    """codes int8 in -16..15, scale d [N, 1]."""
    return Unpacked(_codes(b[:, 6:], b[:, 2:6]).to(torch.int8) - 16, _fp16(b[:, :2]), None, 32)


def unpack_q4_1(b: torch.Tensor) -> Unpacked:
    """codes uint8 in 0..15, scale d, min -m (w = d*q + m)."""
    return Unpacked(_codes(b[:, 4:]), _fp16(b[:, :2]), -_fp16(b[:, 2:4]), 32)


def unpack_q5_1(b: torch.Tensor) -> Unpacked:
    """codes uint8 in 0..31, scale d, min -m (w = d*q + m)."""
    return Unpacked(_codes(b[:, 8:], b[:, 4:8]), _fp16(b[:, :2]), -_fp16(b[:, 2:4]), 32)


def unpack_q8_0(b: torch.Tensor) -> Unpacked:
    """codes int8 in -127..127, scale d [N, 1]."""
    return Unpacked(b[:, 2:].contiguous().view(torch.int8), _fp16(b[:, :2]), None, 32)
