"""Legacy 32-element block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (ggml's quantize_row_*_ref).

Each quantize_* maps float32 blocks [N, 32] to their bytes [N, type_size]; each unpack_* maps bytes back to
codes and scales. Indices come from the unrounded fp32 scale; Q4_x/Q5_x truncate `x*id + 8.5f` (no FMA, no
round), Q8_0 uses roundf.
"""

from __future__ import annotations

import torch

from fuselm.quants.bits import pack_bits, unpack_bits
from fuselm.quants.cfloat import first_extreme, fp16_bytes, roundf, signed_absmax
from fuselm.quants.unpacked import Unpacked


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """`id = d ? 1.0f/d : 0.0f`."""
    return torch.where(d != 0, 1.0 / d, 0.0)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """Elements 0..15 in the low nibbles, 16..31 in the high nibbles."""
    return (q[:, :16] & 0xF) | (q[:, 16:] << 4)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """uint32 qh, little-endian: bit i is bit 4 of q[i]."""
    return pack_bits(q >> 4)


def _symmetric(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0/Q5_0: d = max / -levels, q = MIN(2*levels - 1, (int)(x*id + levels + 0.5f))."""
    _, mx = signed_absmax(x, dim=1)
    d = mx / -levels
    q = torch.trunc(x * _inverse(d)[:, None] + (levels + 0.5)).clamp_max(2 * levels - 1)
    return d, q.to(torch.uint8)


def _asymmetric(x: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1/Q5_1: d = (max - min) / top, q = (int)((x - min)*id + 0.5f)."""
    mn = first_extreme(x, 1, largest=False)
    mx = first_extreme(x, 1, largest=True)
    d = (mx - mn) / top
    q = torch.trunc((x - mn[:, None]) * _inverse(d)[:, None] + 0.5).clamp_max(top)
    return d, mn, q.to(torch.uint8)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric(x, 8)
    return torch.cat([fp16_bytes(d), _nibbles(q)], dim=1)


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric(x, 16)
    return torch.cat([fp16_bytes(d), _high_bits(q), _nibbles(q)], dim=1)


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    d, mn, q = _asymmetric(x, 15)
    return torch.cat([fp16_bytes(d), fp16_bytes(mn), _nibbles(q)], dim=1)


def quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    d, mn, q = _asymmetric(x, 31)
    return torch.cat([fp16_bytes(d), fp16_bytes(mn), _high_bits(q), _nibbles(q)], dim=1)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(dim=1) / 127
    q = roundf(x * _inverse(d)[:, None]).to(torch.int8)
    return torch.cat([fp16_bytes(d), q.view(torch.uint8)], dim=1)


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
