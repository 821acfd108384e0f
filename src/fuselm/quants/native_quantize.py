"""The native quantizers (csrc/quantize.cpp) behind one call, for the types it has; the numpy codecs are the
specification and tests/test_quantize_native.py holds them byte-equal.

`native_quantize(x, type)` returns None when the library or the type is not available here (or the rows need
the codec's checks), so callers fall back to the numpy codec. No importance matrix: with one, the codecs run.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGMLQuantizationType

from fuselm.quants.ggml_types import ggml_type, row_bytes
from fuselm.quants.kernel_build import quantize_library

# input element types the library widens to float32 itself (ggml's ids): no float32 copy of an fp16/bf16 tensor
_INPUT_TYPES = {torch.float32: (0, np.float32), torch.float16: (1, np.float16), torch.bfloat16: (30, np.uint16)}


def native_types() -> frozenset[str]:
    """The GGML type names the native library quantizes on this machine (empty without it)."""
    lib = quantize_library()
    if lib is None:
        return frozenset()
    return frozenset(t.name for t in GGMLQuantizationType if lib.fqz_has(int(t)))


def native_quantize(x: torch.Tensor | np.ndarray, type_name: str, threads: int | None = None) -> np.ndarray | None:
    """x [rows, cols] (float32, float16 or bfloat16) -> uint8 [rows, row_bytes] in ggml's layout, or None (no
    library, no such type or input dtype, NaN/Inf in x, or an fp16 scale that overflows: the numpy codec then
    raises the error).

    Rows are split over `threads` Python threads (default torch.get_num_threads()); ctypes drops the GIL."""
    lib = quantize_library()
    t = ggml_type(type_name)
    if lib is None or not lib.fqz_has(int(t.type_id)):
        return None
    x = torch.as_tensor(x).detach()
    if x.dtype not in _INPUT_TYPES or x.device.type != "cpu" or x.dim() != 2:
        return None
    x_type, np_dtype = _INPUT_TYPES[x.dtype]
    x = x.contiguous()
    data = (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy().view(np_dtype)
    rows, cols = data.shape
    out = np.empty((rows, row_bytes(t.name, cols)), dtype=np.uint8)
    workers = max(1, min(threads or torch.get_num_threads(), rows))
    bounds = np.linspace(0, rows, workers + 1).astype(np.int64)

    def run(r0: int, r1: int) -> int:
        return lib.fqz_quantize(int(t.type_id), data[r0:].ctypes.data, x_type, out[r0:].ctypes.data, r1 - r0, cols)

    if workers == 1:
        codes = [run(0, rows)]
    else:
        with ThreadPoolExecutor(workers) as pool:
            codes = list(pool.map(run, bounds[:-1], bounds[1:]))
    return out if all(c == 0 for c in codes) else None
