"""float32 arithmetic that rounds exactly like ggml's C reference quantizers.

The C code does every step in `float` (no FMA in libggml-base), accumulates sums one element at a time,
and rounds with `nearest_int` (round half to even) or `roundf` (half away from zero). Reproducing its bytes
needs the same rounding at every step, so these helpers avoid the few torch shortcuts that round
differently: `c / t` for a Python scalar `c` (torch multiplies by a reciprocal), vectorized `sqrt`
(not correctly rounded on CPU), and `sum` (pairwise order).
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15  # ggml: blocks with max |x| below this quantize to zero


def rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """float(c) / t with a single rounding, as C's `c / t`."""
    return torch.div(torch.tensor(c, dtype=torch.float32), t)


def nearest_int(t: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int (the 12582912.f trick) as a float tensor: round half to even for |t| < 2**22."""
    return torch.round(t)


def roundf(t: torch.Tensor) -> torch.Tensor:
    """C roundf: round half away from zero (rounding t + 0.5 in float32 would be off near halves)."""
    whole = torch.trunc(t)
    return whole + torch.where((t - whole).abs() >= 0.5, torch.sign(t), 0.0)


def sqrtf(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (numpy's; torch's vectorized sqrt is off by an ulp)."""
    return torch.from_numpy(np.sqrt(t.contiguous().numpy()))


def fp16_round(t: torch.Tensor) -> torch.Tensor:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(t)): round to nearest even half, back to float32."""
    return t.to(torch.float16).to(torch.float32)


def fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp16 little-endian bytes of t [N] as uint8 [N, 2]."""
    return t.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def seq_sum(t: torch.Tensor, from_zero: bool = True) -> torch.Tensor:
    """Sum over dim 0 one element at a time, like C's `s = 0; for (...) s += t[i];`.

    from_zero=False begins from t[0] itself (C code that initialises the sum with the first term).
    numpy reduces a non-innermost axis row by row in float32, which is exactly that order; a lone column
    would make the summed axis innermost (pairwise summation), so it gets a dummy second column.
    """
    a = t.detach().contiguous().numpy()
    flat = a.reshape(a.shape[0], -1)
    if flat.shape[1] == 1:
        flat = np.concatenate([flat, np.zeros_like(flat)], axis=1)
    s = flat.sum(axis=0)[: a[0].size].reshape(a.shape[1:])
    if from_zero:
        s += np.float32(0)  # 0 + t0 + ... differs from t0 + ... only in the sign of a zero total
    return torch.from_numpy(s)


def signed_absmax(t: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max): largest |t| along dim and the signed value where it first occurs.

    Mirrors `if (fabsf(v) > amax) { amax = fabsf(v); max = v; }` from amax = max = 0: ties keep the first
    element and an all-zero group gives max = +0.0 (even if its elements are -0.0).
    """
    a = t.abs()
    idx = a.argmax(dim=dim, keepdim=True)
    amax = a.gather(dim, idx).squeeze(dim)
    val = t.gather(dim, idx).squeeze(dim)
    return amax, torch.where(amax > 0, val, 0.0)


def positive_max(t: torch.Tensor, dim: int) -> torch.Tensor:
    """`m = 0; if (v > m) m = v;` along dim: max(0, t) with +0.0 when nothing is positive."""
    m = t.amax(dim=dim)
    return torch.where(m > 0, m, 0.0)



def first_extreme(t: torch.Tensor, dim: int, largest: bool) -> torch.Tensor:
    """`m = t[0]; if (v < m) m = v;` (or `>`) along dim: the extreme value as first met.

    Differs from amin/amax only in the sign of a zero result, which lands in the stored fp16 bytes.
    """
    m = t.amax(dim=dim, keepdim=True) if largest else t.amin(dim=dim, keepdim=True)
    idx = (t == m).to(torch.uint8).argmax(dim=dim, keepdim=True)
    return t.gather(dim, idx).squeeze(dim)
