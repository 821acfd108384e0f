"""Pieces shared by the IQ1/IQ2/IQ3 quantizers: sequential sums, sign folding, ksigns, the fp16 block scale."""

from __future__ import annotations

import numpy as np
import torch

from fuselm.quants.cfloat import F32

# ksigns_iq2xs: 7 sign bits plus an eighth that makes the count of set bits even
_PARITY = np.array([bin(i).count("1") & 1 for i in range(128)], dtype=np.uint8)
KSIGNS = torch.from_numpy(np.arange(128, dtype=np.uint8) | (_PARITY << 7))
_BITS8 = torch.arange(8, dtype=torch.uint8)


def sum_last(a: np.ndarray) -> np.ndarray:
    """`s = 0; for (i) s += a[i];` over the last axis."""
    s = np.zeros(a.shape[:-1], dtype=F32)
    for i in range(a.shape[-1]):
        s += a[..., i]
    return s


def fold_signs(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Groups of 8 [M, 8] -> (|x| with one element flipped back to make the sign count even, the 7 sign bits
    stored). ggml flips the element of least w*x*x (the first such) when the count of negatives is odd."""
    neg = ~(x >= 0)
    xval = np.where(neg, -x, x)
    s = np.packbits(neg, axis=1, bitorder="little")[:, 0]
    odd = np.flatnonzero(neg.sum(1) & 1)
    if odd.size:
        imin = (w[odd] * x[odd] * x[odd]).argmin(axis=1)
        xval[odd, imin] = -xval[odd, imin]
        s[odd] ^= (1 << imin).astype(np.uint8)
    return xval, s & 127


def sign_bits(s: torch.Tensor) -> torch.Tensor:
    """7-bit sign indices [...] -> -1/+1 int8 [..., 8] via ksigns."""
    bits = (KSIGNS[s.long()].unsqueeze(-1) >> _BITS8) & 1
    return 1 - 2 * bits.to(torch.int8)


def fp16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per row -> float32 [N, 1]."""
    return b.contiguous().view(torch.float16).to(torch.float32)
