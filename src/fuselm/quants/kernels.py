"""QuantLinear: a linear layer that computes straight from GGML-quantized weights.

Paths, chosen per call (see the table in DESIGN notes / the kernels report):
- CPU "native" (AVX-512 VNNI machines, csrc/qkernels.cpp via ctypes). The weights stay in ggml's bytes (the
  memory-mapped file is used in place: resident memory is the file size, no repack).
  - decode, M <= DECODE_MAX_ROWS activation rows: integer-code GEMV with 16-bit activations. Error vs
    `x @ dequantize(W).T` in float64: about 2e-5 of max |y| (activation rounding to 2^-16 of each
    32-block's max |x|, float32 accumulation).
  - prefill, more rows: weights decoded to bf16 in row tiles, then a bf16 GEMM (oneDNN, AMX). Error: bf16
    rounding of weights, activations and outputs, about 1e-2 of max |y| at worst, typically 2e-3.
  F16/BF16 weights: an exact float32 GEMV (decode) and the same bf16 GEMM (prefill). F32: torch F.linear.
- CPU "torch": for machines without the kernels (or types they lack, e.g. IQ4_XS): dequantize row tiles to
  float32 on every call and F.linear. Exact but slow; memory stays at the file size plus one tile.
- "dense" (and any non-CPU device, e.g. CUDA): the weight is dequantized once to a dense tensor on the
  device (bf16 on CUDA when supported, else fp16; float32 on CPU) and F.linear does the rest. Correct, not
  memory-frugal: the device holds 2 bytes per weight.

Inference only: no autograd through the native kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fuselm.errors import FuselmError
from fuselm.quants.codecs import dequantize
from fuselm.quants.ggml_types import ggml_type
from fuselm.quants.kernel_build import native_library
from fuselm.quants.tensor import QuantizedWeight

# ggml types the native kernels run (type name -> ggml type id)
NATIVE_TYPES = {
    name: int(ggml_type(name).type_id)
    for name in ("F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
    + ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")
}
DENSE_TYPES = ("F32", "F16", "BF16")
DECODE_MAX_ROWS = 8  # up to this many activation rows use the GEMV; more use dequantize-to-bf16 + GEMM
TILE_BYTES = 32 << 20  # bf16 weight tile for the prefill GEMM (reused scratch)
BACKENDS = ("native", "torch", "dense")


def set_threads(n: int) -> None:
    """Use n threads for torch ops and for fuselm's kernels (they share torch's OpenMP pool)."""
    if n < 1:
        raise FuselmError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass  # torch allows this once, before any inter-op work; the intra-op count above is what matters


class _Scratch:
    """One growing bf16 buffer for prefill weight tiles, shared by all layers (forward passes are sequential)."""

    buf: torch.Tensor = torch.empty(0, dtype=torch.bfloat16)

    @classmethod
    def get(cls, numel: int) -> torch.Tensor:
        if cls.buf.numel() < numel:
            cls.buf = torch.empty(numel, dtype=torch.bfloat16)
        return cls.buf[:numel]


def _default_backend(qtype: str) -> str:
    if qtype == "F32":
        return "dense"
    if qtype in NATIVE_TYPES and native_library() is not None:
        return "native"
    return "torch"


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W given as a QuantizedWeight. x: [..., in_features] float32/bf16 (fp16 works,
    computed in float32); y: [..., out_features] in x's dtype."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None, *, backend: str | None = None):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.qtype = weight.qtype
        self.backend = backend or _default_backend(weight.qtype)
        if self.backend not in BACKENDS:
            raise FuselmError(f"QuantLinear backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.backend == "native" and (weight.qtype not in NATIVE_TYPES or native_library() is None):
            raise FuselmError(f"QuantLinear: no native kernel for {weight.qtype} on this machine")
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise FuselmError(f"QuantLinear bias: expected shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = bias.detach().to(torch.float32).contiguous()
        self.register_buffer("bias", bias, persistent=False)
        data = weight.data
        if data.device.type != "cpu":
            raise FuselmError(f"QuantLinear: weight bytes must be on the CPU, got {data.device}")
        # the kernels read rows at a fixed stride; a contiguous view (the usual case, also for an mmap) is used
        # in place, anything else is copied once
        self._data = data if data.is_contiguous() else data.contiguous()
        self._dense: dict[torch.device, torch.Tensor] = {}
        if self.qtype == "F32":
            self._dense[torch.device("cpu")] = self._data.view(torch.float32).view(weight.shape)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, "
            f"backend={self.backend}, bias={self.bias is not None}"
        )

    # ---------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise FuselmError(
                f"QuantLinear ({self.qtype} {self.out_features}x{self.in_features}): input has {x.shape[-1]} features"
            )
        if x.device.type != "cpu" or self.backend == "dense":
            return self._forward_dense(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype not in (torch.float32, torch.bfloat16):
            x2 = x2.float()
        x2 = x2.contiguous()
        if self.backend == "torch":
            y = self._forward_torch(x2)
        elif x2.shape[0] <= DECODE_MAX_ROWS:
            y = self._gemv(x2)
        else:
            y = self._prefill(x2)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _gemv(self, x2: torch.Tensor) -> torch.Tensor:
        m = x2.shape[0]
        y = torch.empty(m, self.out_features, dtype=x2.dtype)
        rc = native_library().fq_linear(
            NATIVE_TYPES[self.qtype],
            self._data.data_ptr(),
            self.out_features,
            self.in_features,
            self._data.shape[1],
            x2.data_ptr(),
            int(x2.dtype == torch.bfloat16),
            m,
            self.in_features,
            y.data_ptr(),
            int(y.dtype == torch.bfloat16),
            self.out_features,
            None if self.bias is None else self.bias.data_ptr(),
        )
        if rc != 0:
            raise FuselmError(f"QuantLinear: native kernel failed for {self.qtype} (code {rc})")
        return y

    def _weight_tiles(self):
        """(row0, row1, bf16 weight tile [row1 - row0, K]) over all rows, decoded into the shared scratch."""
        n, k = self.weight.shape
        step = max(1, min(n, TILE_BYTES // (2 * k)))
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            if self.qtype == "BF16":
                yield r0, r1, self._data[r0:r1].view(torch.bfloat16)
                continue
            tile = _Scratch.get((r1 - r0) * k).view(r1 - r0, k)
            if self.qtype == "F16":
                tile.copy_(self._data[r0:r1].view(torch.float16))
            else:
                rc = native_library().fq_dequant_bf16(
                    NATIVE_TYPES[self.qtype], self._data.data_ptr(), r0, r1, k, self._data.shape[1], tile.data_ptr(), k
                )
                if rc != 0:
                    raise FuselmError(f"QuantLinear: native dequantize failed for {self.qtype} (code {rc})")
            yield r0, r1, tile

    def _prefill(self, x2: torch.Tensor) -> torch.Tensor:
        xb = x2.to(torch.bfloat16)
        n = self.out_features
        y = None
        for r0, r1, tile in self._weight_tiles():
            part = torch.mm(xb, tile.t())
            if r0 == 0 and r1 == n:
                y = part
                break
            if y is None:
                y = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
            y[:, r0:r1] = part
        if self.bias is not None:
            y = y.float().add_(self.bias)
        return y

    def _forward_torch(self, x2: torch.Tensor) -> torch.Tensor:
        n, k = self.weight.shape
        xf = x2.float()
        y = torch.empty(x2.shape[0], n, dtype=torch.float32)
        step = max(1, min(n, (TILE_BYTES // 2) // (4 * k)))
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            w = dequantize(self._data[r0:r1], self.qtype, (r1 - r0, k))
            y[:, r0:r1] = xf @ w.t()
        if self.bias is not None:
            y += self.bias
        return y

    # ---------------------------------------------------------------------------------------------------
    def dense_weight(self, device: torch.device | str) -> torch.Tensor:
        """The weight dequantized once onto `device` (cached): bf16 (CUDA with bf16), fp16 (other GPUs) or
        float32 (CPU), filled tile by tile so the host never holds a full float copy."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._dense:
            n, k = self.weight.shape
            if device.type == "cpu":
                dtype = torch.float32
            elif device.type == "cuda" and torch.cuda.is_bf16_supported():
                dtype = torch.bfloat16
            else:
                dtype = torch.float16
            w = torch.empty(n, k, dtype=dtype, device=device)
            step = max(1, min(n, TILE_BYTES // (4 * k)))
            for r0 in range(0, n, step):
                r1 = min(n, r0 + step)
                w[r0:r1] = dequantize(self._data[r0:r1], self.qtype, (r1 - r0, k)).to(device=device, dtype=dtype)
            self._dense[device] = w
        return self._dense[device]

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dense_weight(x.device)
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=w.dtype)
        return F.linear(x.to(w.dtype), w, bias).to(x.dtype)
