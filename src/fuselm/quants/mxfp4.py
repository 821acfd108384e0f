"""MXFP4: 32 elements as 4-bit e2m1 codes (doubled: kvalues_mxfp4) times a shared power of two (e8m0).

quantize_row_mxfp4_ref: e = floor(log2(max |x|)) - 2 + 127, the scale is 2^(e - 128) (half of e8m0's value,
matching the doubled codebook), and each element takes the first codebook entry nearest to it.
"""

from __future__ import annotations

import numpy as np
import torch

from fuselm.quants.cfloat import F32, amax_along
from fuselm.quants.unpacked import Unpacked

KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # kvalues_mxfp4 (2 x e2m1)
_VALUES = np.array(KVALUES, dtype=F32)
_VALUES_I8 = torch.tensor(KVALUES, dtype=torch.int8)


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """GGML_E8M0_TO_FP32_HALF: 2^(e - 128) as float32 bits (denormal for e < 2)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23)
    return bits.astype(np.uint32).view(F32)


_MIDPOINTS = np.array([0.5, 1.5, 2.5, 3.5, 5, 7, 10], dtype=F32)  # between |KVALUES[0..7]|


def _best_index(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """best_index_mxfp4 for blocks x [N, 32] with scales d [N]: the first codebook entry of least |k*d - x|.

    d is a power of two and |x| < 16d, so |x|/d is exact and each error against the two nearest magnitudes is
    exact (Sterbenz: neighbouring magnitudes are within a factor 2); the choice is the nearest magnitude with
    ties to the smaller one (the lower index), on x's side (0, not -0, for the zero entry)."""
    y = np.abs(x) / d[:, None]
    j = np.searchsorted(_MIDPOINTS, y, side="left").astype(np.uint8)  # midpoints strictly below y
    return np.where((x < 0) & (j > 0), j + 8, j).astype(np.uint8)


def quantize_mxfp4(x: np.ndarray) -> np.ndarray:
    amax = amax_along(np.abs(x), 1)
    with np.errstate(divide="ignore"):
        # log2f is correctly rounded for these arguments; float64 rounded to float32 gives the same value
        log2 = np.log2(amax.astype(np.float64)).astype(F32)
        e = np.where(amax > 0, np.floor(log2) - F32(2) + F32(127), F32(0))
    e = (np.nan_to_num(e).astype(np.int64) & 0xFF).astype(np.uint8)
    best = _best_index(x, e8m0_half(e))
    return np.concatenate([e[:, None], best[:, :16] | (best[:, 16:] << 4)], axis=1)


def unpack_mxfp4(b: torch.Tensor) -> Unpacked:
    """codes: int8 codebook values (KVALUES), scale 2^(e - 128) per 32."""
    e = b[:, :1].to(torch.int32)
    d = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23).view(torch.float32)
    qs = b[:, 1:17]
    idx = torch.cat([qs & 0xF, qs >> 4], dim=1)
    return Unpacked(_VALUES_I8[idx.long()], d, None, 32)
