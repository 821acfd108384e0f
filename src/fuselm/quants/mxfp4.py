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


def quantize_mxfp4(x: np.ndarray) -> np.ndarray:
    amax = amax_along(np.abs(x), 1)
    with np.errstate(divide="ignore"):
        # log2f is correctly rounded for these arguments; float64 rounded to float32 gives the same value
        log2 = np.log2(amax.astype(np.float64)).astype(F32)
        e = np.where(amax > 0, np.floor(log2) - F32(2) + F32(127), F32(0))
    e = (np.nan_to_num(e).astype(np.int64) & 0xFF).astype(np.uint8)
    d = e8m0_half(e)
    err = np.abs(_VALUES[None, None, :] * d[:, None, None] - x[:, :, None])
    best = err.argmin(axis=2).astype(np.uint8)  # first minimum, as C's strict `<`
    return np.concatenate([e[:, None], best[:, :16] | (best[:, 16:] << 4)], axis=1)


def unpack_mxfp4(b: torch.Tensor) -> Unpacked:
    """codes: int8 codebook values (KVALUES), scale 2^(e - 128) per 32."""
    e = b[:, :1].to(torch.int32)
    d = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23).view(torch.float32)
    qs = b[:, 1:17]
    idx = torch.cat([qs & 0xF, qs >> 4], dim=1)
    return Unpacked(_VALUES_I8[idx.long()], d, None, 32)
