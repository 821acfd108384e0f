"""llama.cpp's own quantizer, `ggml_quantize_chunk` from llama-cpp-python's libggml-base, via ctypes.

The reference for bit-exact tests and for benchmarks. Fails loudly when llama_cpp is not installed.
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType


@functools.cache
def libggml_base() -> ctypes.CDLL:
    import llama_cpp  # the test dependency that ships llama.cpp; ImportError here is the loud failure

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.so*")) + sorted(lib_dir.glob("libggml-base.dylib"))
    if not candidates:
        raise FileNotFoundError(f"no libggml-base shared library under {lib_dir}")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # enum ggml_type
        ctypes.c_void_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # start (element index)
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.c_void_p,  # const float * imatrix (NULL)
    ]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def ggml_quantize(x: np.ndarray, type_name: str, threads: int = 1) -> np.ndarray:
    """Quantize float32 x [rows, cols] with llama.cpp; uint8 [rows, row_bytes].

    threads > 1 splits the rows over Python threads (ctypes drops the GIL), as llama-quantize does.
    """
    lib = libggml_base()
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    type_id = int(GGMLQuantizationType[type_name])
    row_size = lib.ggml_row_size(type_id, cols)
    out = np.empty((rows, row_size), dtype=np.uint8)
    src, dst = x.ctypes.data, out.ctypes.data

    def run(r0: int, r1: int) -> None:
        if r1 > r0:
            lib.ggml_quantize_chunk(type_id, src, dst, r0 * cols, r1 - r0, cols, None)

    if threads <= 1:
        run(0, rows)
    else:
        bounds = np.linspace(0, rows, threads + 1).astype(int)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, bounds[:-1], bounds[1:]))
    return out
