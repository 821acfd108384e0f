"""F32, F16 and BF16: element-wise types, as ggml_quantize_chunk writes them."""

from __future__ import annotations

import torch


def quantize_f32(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8)


def quantize_f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).view(torch.uint8)


def quantize_bf16(x: torch.Tensor) -> torch.Tensor:
    """ggml_compute_fp32_to_bf16: round to nearest even on the bits; NaN becomes a quiet NaN."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    quiet_nan = (u >> 16) | 64
    bits = torch.where((u & 0x7FFFFFFF) > 0x7F800000, quiet_nan, rounded).to(torch.int32)
    rows, cols = x.shape
    return bits.view(torch.uint8).reshape(rows, cols, 4)[..., :2].reshape(rows, 2 * cols)


def dequantize_f32(data: torch.Tensor) -> torch.Tensor:
    return data.contiguous().view(torch.float32)


def dequantize_f16(data: torch.Tensor) -> torch.Tensor:
    return data.contiguous().view(torch.float16).to(torch.float32)


def dequantize_bf16(data: torch.Tensor) -> torch.Tensor:
    return (data.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)
