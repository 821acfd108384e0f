"""float32 numpy arithmetic that rounds exactly like ggml's C reference quantizers.

The C code does every step in `float` (no FMA in libggml-base), accumulates sums one element at a time,
rounds with `nearest_int` (round half to even) or `roundf` (half away from zero), and stores fp16 with
round-to-nearest-even. numpy float32 ufuncs round each operation the same way; the helpers here cover the
rest: sequential sums, first-occurrence extremes, C rounding modes, and a fast exact select.
numpy rather than torch on these paths: torch's CPU sqrt and scalar-by-tensor division round differently,
its comparisons and where are several times slower, and numpy releases the GIL for chunk-level threads.
(torch is used for one thing, row max/min, where it is exact and faster.)
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = np.float32(1e-15)  # ggml: groups with max |x| below this quantize to zero
F32 = np.float32


def rdiv(c: float, a: np.ndarray) -> np.ndarray:
    """float(c) / a, as C's `c / a`."""
    return F32(c) / a


def nearest_int(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """ggml's nearest_int (the 12582912.f trick) as floats: round half to even for |a| < 2**22."""
    return np.rint(a, out=out)


_JUST_BELOW_HALF = np.nextafter(F32(0.5), F32(0))


def roundf(a: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero) as trunc(a + copysign(0.49999997f, a)).

    Adding 0.5 instead would round up values just below a half; with the largest float below 0.5 a true half
    still reaches the next integer (the sum rounds up to it) and nothing below does.
    """
    return np.trunc(a + np.copysign(_JUST_BELOW_HALF, a))


def fp16_round(a: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(a)): round to nearest even half, back to float32."""
    return a.astype(np.float16).astype(F32)


def fp16_bytes(a: np.ndarray) -> np.ndarray:
    """fp16 little-endian bytes of a [N] as uint8 [N, 2]."""
    return a.astype("<f2").reshape(-1, 1).view(np.uint8)


def seq_sum(a: np.ndarray, from_zero: bool = True) -> np.ndarray:
    """Sum over axis 0 one element at a time, like C's `s = 0; for (...) s += a[i];`.

    from_zero=False begins from a[0] itself (C code that initialises the sum with the first term).
    numpy reduces a non-innermost axis row by row in the array's dtype, which is exactly that order; a lone
    column would make the summed axis innermost (pairwise summation), so it gets a dummy second column.
    """
    flat = np.ascontiguousarray(a).reshape(a.shape[0], -1)
    cols = flat.shape[1]
    if cols == 1:
        flat = np.concatenate([flat, np.zeros_like(flat)], axis=1)
    # numpy starts a sum from +0.0; -0.0 + a0 == a0 exactly, so starting there is C's `s = a[0]`
    start = F32(0.0) if from_zero else F32(-0.0)
    return flat.sum(axis=0, initial=start)[:cols].reshape(a.shape[1:])


def select(mask: np.ndarray, a: np.ndarray | float, b: np.ndarray) -> np.ndarray:
    """Exact float32 `mask ? a : b` (a bit select; np.where is slow on unpredictable masks)."""
    bi = b.view(np.int32)
    ai = np.full_like(b, a).view(np.int32) if np.ndim(a) == 0 else a.view(np.int32)
    m = mask.view(np.int8).astype(np.int32)
    np.negative(m, out=m)  # all ones where mask
    return ((ai ^ bi) & m ^ bi).view(F32)


def amax_along(a: np.ndarray, axis: int, largest: bool = True) -> np.ndarray:
    """a.max(axis) (or min). numpy reduces short contiguous rows one call per row; torch's kernel is several
    times faster there, on the same memory (max and min are exact in any order; only a zero's sign may vary)."""
    if axis == a.ndim - 1 and a.flags.c_contiguous:
        t = torch.from_numpy(a)
        return (t.amax(dim=axis) if largest else t.amin(dim=axis)).numpy()
    return a.max(axis=axis) if largest else a.min(axis=axis)


def signed_absmax(a: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max): largest |a| along axis and the signed value where it first occurs.

    Mirrors `if (fabsf(v) > amax) { amax = fabsf(v); max = v; }` from amax = max = 0: ties keep the first
    element and an all-zero group gives max = +0.0 (even if its elements are -0.0). Two plain reductions
    settle it unless both +amax and -amax occur; only those groups search for the first one.
    """
    hi = amax_along(a, axis)
    lo = amax_along(a, axis, largest=False)
    amax = np.maximum(hi, -lo)
    mx = np.where(hi >= -lo, hi, lo)
    tie = np.flatnonzero((hi == -lo) & (hi > 0))
    if tie.size:  # a is 2-D: groups run along the other axis
        part = np.take(a, tie, axis=1 - axis)
        first = np.expand_dims(np.abs(part).argmax(axis=axis), axis)
        mx[tie] = np.take_along_axis(part, first, axis).squeeze(axis)
    return amax, np.where(amax > 0, mx, F32(0))


def positive_max(a: np.ndarray, axis: int) -> np.ndarray:
    """`m = 0; if (v > m) m = v;` along axis: max(0, a) with +0.0 when nothing is positive."""
    m = amax_along(a, axis)
    return np.where(m > 0, m, F32(0))


def first_extreme(a: np.ndarray, axis: int, largest: bool) -> np.ndarray:
    """`m = a[0]; if (v < m) m = v;` (or `>`) along axis of a 2-D array: the extreme value as first met.

    Differs from min/max only in the sign of a zero result (which lands in stored fp16 bytes), so only
    groups whose extreme is zero look for their first zero.
    """
    m = amax_along(a, axis, largest)
    zero = np.flatnonzero(m == 0)
    if zero.size:  # groups run along the other axis
        part = np.take(a, zero, axis=1 - axis)
        first = np.expand_dims((part == 0).argmax(axis=axis), axis)
        m[zero] = np.take_along_axis(part, first, axis).squeeze(axis)
    return m


def inverse(d: np.ndarray) -> np.ndarray:
    """`d ? 1.0f/d : 0.0f`."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0))
