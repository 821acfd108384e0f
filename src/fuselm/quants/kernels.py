"""QuantLinear: a linear layer that computes straight from GGML-quantized weights.

Paths:
- CPU "native" (x86-64 with AVX-512 VNNI/VBMI, or AVX2 + FMA + F16C; csrc/qkernels.cpp through ctypes, see
  kernel_build.py). At construction the ggml bytes are repacked once into 16-row interleaved tiles of the same
  size (rows padded to a multiple of 16), in huge-page memory (kernel_memory.huge_page_buffer). When the source
  is a memory-mapped file its pages are then dropped from the resident set, so resident memory stays at the
  file size (plus at most 15 padding rows).
  - decode, M <= DECODE_MAX_ROWS activation rows (float32 or bf16 in, the same dtype out): integer-code GEMV
    with 16-bit activations, every weight read once for all M rows; row i's result does not depend on M.
    Error vs float64 `x @ dequantize(W).T`: ~2e-5 of max |y| (bound 1e-4): activations rounded to 2^-16 of
    each 32-block's max |x|, float32 accumulation. llama.cpp rounds activations to 8 bits (~100x coarser).
  - prefill, more rows: weights decoded in row tiles to the GEMM dtype this CPU runs best for its accuracy
    (gemm_dtype.prefill_dtype: float32, fp16 or bf16), then torch's GEMM. Error: float32 ~3e-7 of max |y|;
    fp16 ~4e-4 (bound 4e-3), and where fp16 would overflow (|x| >= 6e4 or an infinite output) the same runs
    in bf16; bf16 ~4e-3 (bound 2e-2).
  F16/BF16 rows are not repacked, only copied once into huge-page memory: an exact float32 GEMV for decode,
  the chosen GEMM on the rows (used in place when the dtypes match) for prefill. F32: torch F.linear on the bytes
  viewed as float32.
- CPU "torch": machines without the kernels, or types they lack (IQ4_XS): row tiles dequantized to float32
  on every call, then F.linear. Exact, slow; memory stays at the file size plus one tile.
- "dense", and any non-CPU input (CUDA): the weight is dequantized once onto the input's device (bf16 on
  CUDA when supported, else fp16; float32 on CPU) and F.linear does the rest. Correct and simple, not
  memory-frugal: 2 bytes per weight on the GPU.

Inference only: there is no autograd through the native kernels. Under torch.compile the native path is one
opaque custom op (fuselm::quant_linear).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from fuselm.errors import FuselmError
from fuselm.quants.codecs import dequantize
from fuselm.quants.gemm_dtype import prefill_dtype
from fuselm.quants.ggml_types import ggml_type
from fuselm.quants.kernel_build import native_library
from fuselm.quants.kernel_memory import drop_file_pages, huge_page_buffer
from fuselm.quants.tensor import QuantizedWeight

_PACKED_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")
# ggml types the native kernels run (name -> ggml type id); F16/BF16 rows are read as they are
NATIVE_TYPES = {name: int(ggml_type(name).type_id) for name in ("F16", "BF16", *_PACKED_TYPES)}
DENSE_TYPES = ("F32", "F16", "BF16")
DECODE_MAX_ROWS = 32  # up to this many activation rows use the GEMV (measured crossover ~40), more the GEMM
TILE_BYTES = 8 << 20  # fp16/bf16 weight tile for the prefill GEMM (one reused scratch buffer per thread)
BACKENDS = ("native", "torch", "dense")


class _Scratch(threading.local):
    """A growing byte buffer for prefill weight tiles, one per thread, shared by all layers."""

    def __init__(self) -> None:
        self.buf = torch.empty(0, dtype=torch.uint8)

    def get(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        if self.buf.numel() < nbytes:
            self.buf = torch.empty(nbytes, dtype=torch.uint8)
        return self.buf[:nbytes].view(dtype)


_scratch = _Scratch()
_DEQUANT_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # fq_dequant's output kinds


# ------------------------------------------------------------------------------------------------- native calls
def _native_gemv(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, type_id: int, n: int) -> torch.Tensor:
    """x2 [M, K] float32/bf16 contiguous -> [M, n] in x2's dtype."""
    m, k = x2.shape
    y = torch.empty(m, n, dtype=x2.dtype)
    bf16 = x2.dtype == torch.bfloat16
    rc = native_library().fq_linear(
        type_id, w.data_ptr(), n, k, x2.data_ptr(), bf16, m, k, y.data_ptr(), bf16, n,
        None if bias is None else bias.data_ptr(),
    )  # fmt: skip
    if rc != 0:
        raise FuselmError(f"QuantLinear: native kernel failed for ggml type {type_id} (code {rc})")
    return y


def _weight_tiles(w: torch.Tensor, type_id: int, n: int, k: int, dtype: torch.dtype):
    """(row0, row1, weights [row1 - row0, k] in dtype (float32, fp16 or bf16)) covering all n rows. F16/BF16
    rows of the same dtype are used in place; anything else is decoded into the shared scratch."""
    dense = {NATIVE_TYPES["F16"]: torch.float16, NATIVE_TYPES["BF16"]: torch.bfloat16}.get(type_id)
    step = max(16, min(n, TILE_BYTES // (dtype.itemsize * k)) // 16 * 16)  # whole 16-row tiles
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        if dense is not None:
            rows = w[r0:r1].view(dense)
            if dense != dtype:
                rows = _scratch.get((r1 - r0) * k, dtype).view(r1 - r0, k).copy_(rows)
            yield r0, r1, rows
            continue
        # rows K + 32 apart: at a power-of-two stride the 16 rows a tile writes at once share one L1 set
        ld = k + 32
        tile = _scratch.get((r1 - r0) * ld, dtype).view(r1 - r0, ld)[:, :k]
        rc = native_library().fq_dequant(type_id, w.data_ptr(), r0, r1, k, tile.data_ptr(), ld, _DEQUANT_KIND[dtype])
        if rc != 0:
            raise FuselmError(f"QuantLinear: native dequantize failed for ggml type {type_id} (code {rc})")
        yield r0, r1, tile


def _gemm(x2: torch.Tensor, w: torch.Tensor, type_id: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    xd = x2.to(dtype)
    y = None
    for r0, r1, tile in _weight_tiles(w, type_id, n, x2.shape[1], dtype):
        part = torch.mm(xd, tile.t())
        if r1 - r0 == n:
            return part
        if y is None:
            y = torch.empty(x2.shape[0], n, dtype=dtype)
        y[:, r0:r1] = part
    return y


def _native_prefill(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, type_id: int, n: int):
    # the GEMM dtype this CPU runs fastest for its accuracy (gemm_dtype.py). fp16's range (65504) is checked
    # on the way in and out, and bf16 takes over where it would overflow; BF16 weights never go through fp16.
    dtype = prefill_dtype()
    if dtype == torch.float16 and type_id == NATIVE_TYPES["BF16"]:
        dtype = torch.bfloat16
    y = None
    if dtype == torch.float16 and float(x2.abs().max()) < 6e4:
        y = _gemm(x2, w, type_id, n, torch.float16)
        if not math.isfinite(float(y.sum(dtype=torch.float32))):  # any inf (or nan) shows in the sum; 10x faster
            y = None
    if y is None:
        y = _gemm(x2, w, type_id, n, torch.bfloat16 if dtype == torch.float16 else dtype)
    if bias is not None:
        y = y.float().add_(bias)
    return y.to(x2.dtype)


@torch.library.custom_op("fuselm::quant_linear", mutates_args=())
def quant_linear_op(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, type_id: int, n: int) -> torch.Tensor:
    """The native path as one op (for torch.compile): x2 [M, K] float32/bf16 -> [M, n]."""
    if x2.shape[0] <= DECODE_MAX_ROWS:
        return _native_gemv(x2.contiguous(), w, bias, type_id, n)
    return _native_prefill(x2.contiguous(), w, bias, type_id, n)


@quant_linear_op.register_fake
def _(x2, w, bias, type_id, n):
    return x2.new_empty(x2.shape[0], n)


# ------------------------------------------------------------------------------------------------- module
def _default_backend(qtype: str) -> str:
    if qtype == "F32":
        return "dense"
    if qtype in NATIVE_TYPES and native_library() is not None:
        return "native"
    return "torch"


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W given as a QuantizedWeight, or as several with the same type and in_features
    stacked by rows (e.g. q/k/v or gate/up: one call instead of several, each smaller call costs a fixed
    ~10 us and runs at lower bandwidth).

    x: [..., in_features] float32 or bf16 (other float dtypes are computed in float32); y: [..., out_features]
    in x's dtype. `parts` keeps the source weights (`layer.weight` is the single part, or their row
    concatenation, built on request); `bias` is float32 or None.
    """

    def __init__(
        self,
        weight: QuantizedWeight | Sequence[QuantizedWeight],
        bias: torch.Tensor | None = None,
        *,
        backend: str | None = None,
    ):
        super().__init__()
        parts = (weight,) if isinstance(weight, QuantizedWeight) else tuple(weight)
        if not parts or any(p.qtype != parts[0].qtype or p.in_features != parts[0].in_features for p in parts):
            found = ", ".join(f"{p.qtype} {p.shape}" for p in parts) or "nothing"
            raise FuselmError(f"QuantLinear: expected weights of one type and one in_features, got {found}")
        for p in parts:
            if p.data.device.type != "cpu":
                raise FuselmError(f"QuantLinear: weight bytes must be on the CPU, got {p.data.device}")
        self.qtype = parts[0].qtype
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.backend = backend or _default_backend(self.qtype)
        if self.backend not in BACKENDS:
            raise FuselmError(f"QuantLinear backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.backend == "native" and (self.qtype not in NATIVE_TYPES or native_library() is None):
            raise FuselmError(f"QuantLinear: no native kernel for {self.qtype} on this machine")
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise FuselmError(f"QuantLinear bias: expected shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = bias.detach().to("cpu", torch.float32).contiguous()
        self.bias = bias  # a plain attribute, not a buffer: module.to(dtype) must not change what the kernels read
        # contiguous views (the usual case, also for an mmap) are used in place, anything else is copied once;
        # a row order is kept only where the repack applies it, elsewhere the rows are put in order now
        packed = self.backend == "native" and self.qtype in _PACKED_TYPES
        if not packed and any(p.row_order is not None for p in parts):
            ordered = tuple(p.in_order() for p in parts)
            for p in parts:
                if p.row_order is not None:
                    drop_file_pages(p.data)  # read once into its reordered copy
            parts = ordered
        # a strided view (a tensor-parallel rank's columns of a file's rows) is repacked a few tiles at a time
        self.parts = tuple(p if p.data.is_contiguous() or packed else replace(p, data=p.data.contiguous())
                           for p in parts)
        self._type_id = NATIVE_TYPES.get(self.qtype, -1)
        self._dense: dict[torch.device, torch.Tensor] = {}
        self._w: torch.Tensor | None = None
        if packed:
            self._w = self._repack()  # what the native kernels read
        elif self.qtype in DENSE_TYPES and self.backend == "native":
            # 16-bit rows as they are, copied once into huge-page memory (faster to stream than the file's
            # mapping) and joined when stacked; the parts become views of the copy and the sources can go
            joined = huge_page_buffer(sum(p.data.numel() for p in self.parts)).view(self.out_features, -1)
            torch.cat([p.data for p in self.parts], out=joined)
            self._drop_sources()
            self._w = joined
            rows = joined.split([p.out_features for p in self.parts])
            self.parts = tuple(QuantizedWeight(d, p.qtype, p.shape) for d, p in zip(rows, self.parts))
        elif self.qtype == "F32":
            self._w = self._joined_rows()  # rows as they are
            self._dense[torch.device("cpu")] = self._w.view(torch.float32).view(self.out_features, -1)

    @property
    def weight(self) -> QuantizedWeight:
        if len(self.parts) == 1:
            return self.parts[0]
        return QuantizedWeight(self._joined_rows(), self.qtype, (self.out_features, self.in_features))

    def _joined_rows(self) -> torch.Tensor:
        """GGML bytes of all rows in order: the single part's own, or a joined copy."""
        if len(self.parts) == 1:
            return self.parts[0].in_order().data
        return torch.cat([p.in_order().data for p in self.parts])

    def _drop_sources(self) -> None:
        for p in self.parts:
            drop_file_pages(p.data)  # from now on the kernels read their own copy

    def _repack(self) -> torch.Tensor:
        lib = native_library()
        tile = lib.fq_tile_rows()
        row_bytes = self.parts[0].data.shape[1]
        packed = huge_page_buffer(-(-self.out_features // tile) * tile * row_bytes)

        def repack_into(row0: int, rows: torch.Tensor) -> None:
            dst = packed[row0 * row_bytes :]
            rc = lib.fq_repack(self._type_id, rows.data_ptr(), rows.shape[0], self.in_features, dst.data_ptr())
            if rc != 0:
                raise FuselmError(f"QuantLinear: native repack failed for {self.qtype} (code {rc})")

        if any(p.out_features % tile for p in self.parts[:-1]):  # parts not in whole tiles: from a joined copy
            repack_into(0, self._joined_rows())
        else:
            row0 = 0
            for p in self.parts:
                if p.row_order is None and p.data.is_contiguous():
                    repack_into(row0, p.data)
                else:  # reordered or strided rows, gathered a few tiles at a time (no full copy)
                    step = 16 * tile
                    for r in range(0, p.out_features, step):
                        repack_into(row0 + r, p.rows(r, min(p.out_features, r + step)).contiguous())
                row0 += p.out_features
        self._drop_sources()
        return packed

    def _dequantize_rows(self, r0: int, r1: int) -> torch.Tensor:
        """float32 [r1 - r0, in_features] of the stacked parts, from their ggml bytes."""
        pieces, p0 = [], 0
        for p in self.parts:
            a, b = max(r0, p0), min(r1, p0 + p.out_features)
            if a < b:
                pieces.append(dequantize(p.rows(a - p0, b - p0), self.qtype, (b - a, self.in_features)))
            p0 += p.out_features
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, "
            f"backend={self.backend}, bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        if x.shape[-1] != k:
            raise FuselmError(
                f"QuantLinear ({self.qtype} {self.out_features}x{k}): input has {x.shape[-1]} features, expected {k}"
            )
        if x.device.type != "cpu" or self.backend == "dense":
            return self._forward_dense(x)
        x2 = x.reshape(-1, k)
        if x2.dtype not in (torch.float32, torch.bfloat16):
            x2 = x2.float()
        if self.backend == "torch":
            y = self._forward_torch(x2)
        elif torch.compiler.is_compiling():
            y = quant_linear_op(x2, self._w, self.bias, self._type_id, self.out_features)
        elif x2.shape[0] <= DECODE_MAX_ROWS:  # the decode hot path: one ctypes call
            y = _native_gemv(x2.contiguous(), self._w, self.bias, self._type_id, self.out_features)
        else:
            y = _native_prefill(x2.contiguous(), self._w, self.bias, self._type_id, self.out_features)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _forward_torch(self, x2: torch.Tensor) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        xf = x2.float()
        y = torch.empty(x2.shape[0], n, dtype=torch.float32)
        step = max(1, min(n, (TILE_BYTES // 2) // (4 * k)))
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            y[:, r0:r1] = xf @ self._dequantize_rows(r0, r1).t()
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
            n, k = self.out_features, self.in_features
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
                w[r0:r1] = self._dequantize_rows(r0, r1).to(device=device, dtype=dtype)
            if self.backend == "native":
                self._drop_sources()
            self._dense[device] = w
        return self._dense[device]

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dense_weight(x.device)
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=w.dtype)
        return F.linear(x.to(w.dtype), w, bias).to(x.dtype)
