"""TQ1_0 and TQ2_0: ternary weights {-1, 0, 1} times one fp16 scale per 256-element block (quantize_row_tq*_ref).

The scale is the block's max |x| and each code is roundf(x / max) + 1 in 0..2. TQ2_0 packs four 2-bit codes
per byte; TQ1_0 packs five base-3 digits per byte as ceil(q * 256 / 243), so that a digit comes back as the
high byte of (q * 3^n mod 256) * 3.
"""

from __future__ import annotations

import numpy as np
import torch

from fuselm.quants.cfloat import F32, amax_along, fp16_bytes, inverse, roundf
from fuselm.quants.unpacked import Unpacked

_SHIFT2 = np.array([0, 2, 4, 6], dtype=np.uint8)
_POW3 = (1, 3, 9, 27, 81)
# TQ1_0's spans: (first element, elements per byte-digit, digits per byte); the last (qh) gets a padding digit
_TQ1_SPANS = ((0, 32, 5), (160, 16, 5), (240, 4, 4))


def _codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = amax_along(np.abs(x), 1)
    return d, (roundf(x * inverse(d)[:, None]) + F32(1)).astype(np.uint8)


def quantize_tq2_0(x: np.ndarray) -> np.ndarray:
    d, q = _codes(x)
    qs = np.bitwise_or.reduce(q.reshape(-1, 2, 4, 32) << _SHIFT2.reshape(1, 1, 4, 1), axis=2).reshape(-1, 64)
    return np.concatenate([qs, fp16_bytes(d)], axis=1)


def quantize_tq1_0(x: np.ndarray) -> np.ndarray:
    d, q = _codes(x)
    parts = []
    for start, width, digits in _TQ1_SPANS:
        span = q[:, start : start + width * digits].reshape(-1, digits, width).astype(np.uint16)
        weights = np.array(_POW3[:digits][::-1], dtype=np.uint16).reshape(1, digits, 1) * (3 if digits == 4 else 1)
        packed = (span * weights).sum(axis=1, dtype=np.uint16)
        parts.append(((packed * 256 + 242) // 243).astype(np.uint8))
    return np.concatenate([*parts, fp16_bytes(d)], axis=1)


def _fp16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32)


def unpack_tq2_0(b: torch.Tensor) -> Unpacked:
    """codes int8 -1..1, scale d per 256."""
    q = b[:, :64].reshape(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    return Unpacked((q & 3).reshape(-1, 256).to(torch.int8) - 1, _fp16(b[:, 64:66]), None, 256)


def unpack_tq1_0(b: torch.Tensor) -> Unpacked:
    """codes int8 -1..1, scale d per 256."""
    codes = []
    offset = 0
    for _, width, digits in _TQ1_SPANS:
        span = b[:, offset : offset + width].to(torch.int32)  # one byte per element position of the span
        offset += width
        pow3 = torch.tensor(_POW3[:digits], dtype=torch.int32).view(1, digits, 1)
        q = (span.unsqueeze(1) * pow3) & 0xFF  # the uint8_t product
        codes.append(((q * 3) >> 8).reshape(b.shape[0], -1))
    return Unpacked(torch.cat(codes, dim=1).to(torch.int8) - 1, _fp16(b[:, 52:54]), None, 256)
