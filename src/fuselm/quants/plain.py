"""F32, F16 and BF16: element-wise types, as ggml_quantize_chunk writes them."""

from __future__ import annotations

import numpy as np
import torch


def quantize_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype="<f4").view(np.uint8)


def quantize_f16(x: np.ndarray) -> np.ndarray:
    return x.astype("<f2").view(np.uint8)


def quantize_bf16(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: round to nearest even on the bits; NaN becomes a quiet NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    bits = np.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 64, rounded)
    return bits.astype("<u2").view(np.uint8)


def dequantize_f32(data: torch.Tensor) -> torch.Tensor:
    return data.contiguous().view(torch.float32)


def dequantize_f16(data: torch.Tensor) -> torch.Tensor:
    return data.contiguous().view(torch.float16).to(torch.float32)


def dequantize_bf16(data: torch.Tensor) -> torch.Tensor:
    return (data.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)
