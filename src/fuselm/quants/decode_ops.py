"""Native float32 pieces of a decode step, called by the model between its matmuls (csrc/decode_step.h).

Each is one ctypes call in place of several torch ops whose fixed costs outweigh the arithmetic at one token:
- `rms_norm(x, weight, eps)`: HF Llama's RMSNorm;
- `silu_mul(gate_up)`: SiLU of the first half of the last dimension times the second half;
- `decode_attend(...)`: one new position per sequence: RoPE on q and k, k and v written into the KV cache at
  each row's slot, softmax attention over the row's positions (from its first real slot, within the window).

`native_ready(x)` says whether they apply: the kernels are built, x is a float32 CPU tensor and no gradient is
being recorded (training and the other dtypes keep torch's ops, which stay the definition these are tested
against).
"""

from __future__ import annotations

import math

import torch

from fuselm.errors import FuselmError
from fuselm.quants.kernel_build import native_library


def native_ready(x: torch.Tensor) -> bool:
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and native_library() is not None)  # fmt: skip


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension; x and weight float32."""
    d = x.shape[-1]
    x, w = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    native_library().fq_rms_norm(x.data_ptr(), w.data_ptr(), x.numel() // d, d, eps, out.data_ptr())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate, up] along the last dimension; float32."""
    f = gate_up.shape[-1] // 2
    gate_up = gate_up.contiguous()
    out = torch.empty(*gate_up.shape[:-1], f, dtype=torch.float32)
    native_library().fq_silu_mul(gate_up.data_ptr(), gate_up.numel() // (2 * f), f, out.data_ptr())
    return out


def decode_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor,
                  pads: torch.Tensor, window: int | None) -> torch.Tensor:
    """One new position per sequence. q [B, H, D], k and v [B, G, D] (views are fine while each row's values are
    contiguous); cos, sin [1, R] (every row) or [B, 1, R]; k_cache, v_cache [rows, G, capacity, D] contiguous,
    written at (rows[b], :, starts[b]); keys from max(pads[b], starts[b] + 1 - window) to starts[b] attended.
    Returns float32 [B, H * D], the attention output ready for the output projection."""
    B, H, D = q.shape
    G = k.shape[1]
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != D or H % G:
        raise FuselmError(f"decode_attend: k, v {tuple(k.shape)}, {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != torch.float32:
            raise FuselmError(f"decode_attend: {name} must be float32, got {t.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1 or t.stride(1) != D:
            raise FuselmError(f"decode_attend: {name} must hold each row's heads contiguously, strides {t.stride()}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
            and k_cache.shape[1] == G and k_cache.shape[3] == D and rows.shape == starts.shape == pads.shape == (B,)):
        raise FuselmError(f"decode_attend: KV cache {tuple(k_cache.shape)} / {tuple(v_cache.shape)} (contiguous) "
                          f"does not fit k {tuple(k.shape)} and {B} rows")
    cos, sin = cos.contiguous(), sin.contiguous()
    if cos.shape != sin.shape or cos.numel() not in (cos.shape[-1], B * cos.shape[-1]):
        raise FuselmError(f"decode_attend: cos/sin {tuple(cos.shape)} must hold one table or one per row of {B}")
    ldcs = 0 if cos.numel() == cos.shape[-1] else cos.shape[-1]
    rows, starts, pads = (t.to(torch.int64).contiguous() for t in (rows, starts, pads))
    out = torch.empty(B, H * D, dtype=torch.float32)
    rc = native_library().fq_decode_attend(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), k.stride(0), v.stride(0), cos.data_ptr(),
        sin.data_ptr(), ldcs, cos.shape[-1], k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
        k_cache.stride(1), k_cache.shape[0], k_cache.shape[2], rows.data_ptr(), starts.data_ptr(), pads.data_ptr(),
        window or 0, B, H, G, D, 1.0 / math.sqrt(D), out.data_ptr(),
    )  # fmt: skip
    if rc != 0:
        raise FuselmError(f"decode_attend: native kernel refused its arguments (code {rc})")
    return out
