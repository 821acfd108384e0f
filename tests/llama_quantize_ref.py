"""llama.cpp's whole-model quantizer, `llama_model_quantize` (llama-cpp-python's low-level API), with every
llama-quantize control we compare against: the reference for mixes, overrides, imatrix use and whole files.

Fails loudly when llama_cpp is not installed.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import llama_cpp  # the reference: a missing build must fail, not skip
import llama_cpp._logger
import numpy as np
from gguf import GGMLQuantizationType

_LOG: list[str] = []


@llama_cpp.llama_log_callback
def _capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    _LOG.append(text.decode("utf-8", "replace"))


def llama_ftype(ftype: str) -> int:
    return llama_cpp.LLAMA_FTYPE_ALL_F32 if ftype == "F32" else getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")


def _ggml_type(name: str | None) -> int:
    if name is None:  # GGML_TYPE_COUNT: "not set"
        return llama_cpp.llama_model_quantize_default_params().output_tensor_type
    return int(GGMLQuantizationType[name.upper()])


def _kv_override(key: str, value: int | float | bool | str) -> llama_cpp.llama_model_kv_override:
    o = llama_cpp.llama_model_kv_override()
    o.key = key.encode()
    if isinstance(value, bool):
        o.tag, o.value.val_bool = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL, value
    elif isinstance(value, int):
        o.tag, o.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
    elif isinstance(value, float):
        o.tag, o.value.val_f64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT, value
    else:
        o.tag, o.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()
    return o


def llama_quantize(src: Path, dst: Path, ftype: str, *, pure: bool = False, leave_output: bool = False,
                   output_tensor_type: str | None = None, token_embedding_type: str | None = None,
                   tensor_types: Sequence[tuple[str, str]] = (), imatrix: Mapping[str, np.ndarray] | None = None,
                   kv_overrides: Sequence[tuple[str, int | float | bool | str]] = (), dry_run: bool = False,
                   only_copy: bool = False, nthread: int = 2) -> str:
    """Quantize SRC to DST with llama.cpp; return its log (asserting success)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = llama_ftype(ftype)
    params.pure = pure
    params.quantize_output_tensor = not leave_output
    params.output_tensor_type = _ggml_type(output_tensor_type)
    params.token_embedding_type = _ggml_type(token_embedding_type)
    params.dry_run = dry_run
    params.only_copy = only_copy
    keep = []  # ctypes buffers that must outlive the call
    if tensor_types:
        arr = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, type_) in enumerate(tensor_types):
            arr[i].pattern, arr[i].type = pattern.lower().encode(), _ggml_type(type_)
        arr[len(tensor_types)].pattern, arr[len(tensor_types)].type = None, _ggml_type(None)
        params.tt_overrides = arr
        keep.append(arr)
    if imatrix is not None:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(values)
            arr[i].name = name.encode()
            arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = values.size
        params.imatrix = arr
        keep.append(arr)
    if kv_overrides:
        arr = (llama_cpp.llama_model_kv_override * (len(kv_overrides) + 1))()
        for i, (key, value) in enumerate(kv_overrides):
            arr[i] = _kv_override(key, value)
        params.kv_overrides = arr
        keep.append(arr)
    _LOG.clear()
    llama_cpp.llama_log_set(_capture, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
    log = "".join(_LOG)
    assert rc == 0, f"llama_model_quantize failed:\n{log[-3000:]}"
    return log


_TENSOR_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s+(\S+), size = [^\n(]*(?:\((\S+)\))?\n")


def dry_run_types(log: str) -> dict[str, str]:
    """Every tensor's type from a dry run's log: the target type, or the source type when it is kept."""
    return {m.group(1): (m.group(3) or m.group(2)).upper() for m in _TENSOR_LINE.finditer(log)}


def fallback_lines(log: str) -> list[str]:
    lines = [ln for ln in log.splitlines() if ln.startswith("warning: ") and " ncols " in ln]
    lines += [ln[ln.index("WARNING: ") :] for ln in log.splitlines() if re.search(r"WARNING: \d+ of \d+ tensor", ln)]
    return lines
