"""Writing model GGUF files from Python values: metadata values typed, tensors planned (name, GGML type, logical
shape, byte size) before any byte is written, then streamed one tensor at a time by gguf_exact's byte writer.

Tensors are given as (data, type name), where data is a float array/tensor for F32/F16/BF16 and ggml block bytes
uint8 [rows, row_bytes] for quantized types, or lazily as (callable returning that data, type name, logical shape),
so a quantizer can produce one tensor at a time. The file goes to a temporary path; formats.atomic renames it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType
from tqdm import tqdm

from ..errors import FuselmError
from .gguf_exact import DEFAULT_ALIGNMENT, KeyValue, TensorOut, header_bytes, write_tensor
from .gguf_read import PLAIN_DTYPES, VALUE_TYPE_OF_DTYPE

MAX_NAME_BYTES = 63  # llama.cpp rejects tensor names of GGML_MAX_NAME (64) bytes or more
FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
               GGMLQuantizationType.F64)

# llama_ftype written as general.file_type, from the type holding most matrix elements (llama.cpp's quantizer writes
# the exact mix name; fuselm's quantizer passes it in extra_metadata).
_FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q2_K": gguf.LlamaFileType.MOSTLY_Q2_K, "Q3_K": gguf.LlamaFileType.MOSTLY_Q3_K_M,
    "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M, "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K, "IQ4_NL": gguf.LlamaFileType.MOSTLY_IQ4_NL,
    "IQ4_XS": gguf.LlamaFileType.MOSTLY_IQ4_XS,
}


@dataclass(frozen=True)
class TensorPlan:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # logical, torch order
    nbytes: int
    produce: Callable[[], np.ndarray]  # raw array of exactly nbytes, in file layout


def _qtype(type_name: str, name: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[str(type_name).upper()]
    except KeyError:
        raise FuselmError(f"tensor {name!r}: unknown GGML type {type_name!r}") from None


def _nbytes(qtype: GGMLQuantizationType, shape: tuple[int, ...], name: str) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if not shape or shape[-1] % block:
        raise FuselmError(f"tensor {name!r}: shape {shape} does not fit {qtype.name} (rows must be a multiple of "
                          f"{block} values)")
    return math.prod(shape[:-1]) * (shape[-1] // block) * type_size


def _raw_data(name: str, data, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Data in file layout for one tensor (converting floats to the target float type, one tensor at a time)."""
    if isinstance(data, torch.Tensor):
        t = data.detach().cpu()
        if qtype == GGMLQuantizationType.BF16 and t.is_floating_point():
            return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        data = t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
    data = np.asarray(data)
    if qtype in FLOAT_TYPES:
        if data.dtype.kind != "f":
            raise FuselmError(f"tensor {name!r}: type {qtype.name} needs float data, got {data.dtype}")
        if qtype == GGMLQuantizationType.BF16:
            return _raw_data(name, torch.from_numpy(np.ascontiguousarray(data, np.float32)), qtype, shape)
        return np.ascontiguousarray(data, dtype=PLAIN_DTYPES[qtype])
    if qtype in PLAIN_DTYPES:
        return np.ascontiguousarray(data, dtype=PLAIN_DTYPES[qtype])
    if data.dtype != np.uint8:
        raise FuselmError(f"tensor {name!r}: type {qtype.name} needs ggml block bytes (uint8 [rows, row_bytes], "
                          f"from fuselm.quants.quantize), got {data.dtype}")
    return np.ascontiguousarray(data)


def plan_tensor(name: str, value) -> TensorPlan:
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise FuselmError(f"tensor {name!r}: GGUF tensor names are limited to {MAX_NAME_BYTES} bytes (llama.cpp)")
    if not isinstance(value, tuple) or len(value) not in (2, 3):
        raise FuselmError(f"tensor {name!r}: expected (data, type name) or (callable, type name, shape), "
                          f"got {type(value).__name__}")
    data, qtype = value[0], _qtype(value[1], name)
    if callable(data):
        if len(value) != 3:
            raise FuselmError(f"tensor {name!r}: a lazily produced tensor needs its logical shape: "
                              "(callable, type name, shape)")
        shape = tuple(int(s) for s in value[2])
    else:
        shape = tuple(int(s) for s in data.shape)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if qtype not in PLAIN_DTYPES:  # block bytes [..., row_bytes] -> logical [..., cols]
            if not shape or shape[-1] % type_size:
                raise FuselmError(f"tensor {name!r}: {qtype.name} data must be uint8 [rows, row_bytes] with "
                                  f"row_bytes a multiple of {type_size}, got shape {shape}")
            shape = (*shape[:-1], shape[-1] // type_size * block)
    if not 1 <= len(shape) <= 4:
        raise FuselmError(f"tensor {name!r}: GGUF holds 1 to 4 dimensions, got shape {shape}")
    nbytes = _nbytes(qtype, shape, name)

    def produce() -> np.ndarray:
        raw = _raw_data(name, data() if callable(data) else data, qtype, shape)
        if raw.nbytes != nbytes:
            raise FuselmError(f"tensor {name!r}: produced {raw.nbytes} bytes for {qtype.name} {shape}, expected "
                              f"{nbytes}")
        return raw

    return TensorPlan(name=name, qtype=qtype, shape=shape, nbytes=nbytes, produce=produce)


def typed_value(key: str, value) -> tuple[GGUFValueType, GGUFValueType | None, Any] | None:
    """(type, array item type, value as the writer wants it) for a metadata value; None skips it (empty array)."""
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL, None, bool(value)
    if isinstance(value, np.generic) and value.dtype in VALUE_TYPE_OF_DTYPE:
        return VALUE_TYPE_OF_DTYPE[value.dtype], None, value.item()
    if isinstance(value, int):
        return _int_type([value]), None, value
    if isinstance(value, float):
        return GGUFValueType.FLOAT32, None, value
    if isinstance(value, str):
        return GGUFValueType.STRING, None, value
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind == "U":
        return GGUFValueType.ARRAY, GGUFValueType.STRING, value.tolist()  # typed even when empty
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype in VALUE_TYPE_OF_DTYPE:
        return GGUFValueType.ARRAY, VALUE_TYPE_OF_DTYPE[value.dtype], value.tolist()
    if isinstance(value, (list, tuple)):
        items = list(value)
        if not items:
            return None
        if all(isinstance(v, str) for v in items):
            return GGUFValueType.ARRAY, GGUFValueType.STRING, items
        if all(isinstance(v, bool) for v in items):
            return GGUFValueType.ARRAY, GGUFValueType.BOOL, items
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return GGUFValueType.ARRAY, _int_type(items), items
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            return GGUFValueType.ARRAY, GGUFValueType.FLOAT32, [float(v) for v in items]
    raise FuselmError(f"metadata key {key!r}: cannot store a value of type {type(value).__name__} in GGUF "
                      "(expected bool, int, float, str, a 1-D numpy array, or a list of one of those)")


def _int_type(values: list[int]) -> GGUFValueType:
    lo, hi = min(values), max(values)
    if lo >= 0:
        return GGUFValueType.UINT32 if hi < 2**32 else GGUFValueType.UINT64
    return GGUFValueType.INT32 if lo >= -(2**31) and hi < 2**31 else GGUFValueType.INT64


def typed_metadata(values: Mapping[str, Any]) -> list[KeyValue]:
    """(key, value type name, value) for every value (typed by typed_value; empty untyped lists are skipped)."""
    out = []
    for key, value in values.items():
        typed = typed_value(key, value)
        if typed is not None:
            vtype, item, v = typed
            out.append((key, f"ARRAY[{item.name}]" if item is not None else vtype.name, v))
    return out


def write_file(path: Path, arch: str, metadata: Mapping[str, Any], plans: list[TensorPlan], progress: bool,
               shown_name: str) -> None:
    """Write one GGUF to `path` (a temporary file from formats.atomic), one tensor in memory at a time, with the
    byte writer of gguf_exact (general.architecture first, every dimension of each shape written)."""
    arch_key = gguf.Keys.General.ARCHITECTURE
    keys = [(arch_key, "STRING", arch), *typed_metadata({k: v for k, v in metadata.items() if k != arch_key})]
    tensors = [TensorOut(p.name, p.qtype.name, p.shape, p.produce) for p in plans]
    with open(path, "wb") as f:
        f.write(header_bytes(keys, tensors, DEFAULT_ALIGNMENT, keep_dims=True))
        with tqdm(total=sum(p.nbytes for p in plans), unit="B", unit_scale=True, desc=f"writing {shown_name}",
                  disable=not progress) as bar:
            for t in tensors:
                write_tensor(f, t, DEFAULT_ALIGNMENT)
                bar.update(t.nbytes)


def file_type(plans: list[TensorPlan]) -> int:
    counts: dict[str, int] = {}
    for plan in plans:
        if len(plan.shape) >= 2:
            counts[plan.qtype.name] = counts.get(plan.qtype.name, 0) + math.prod(plan.shape)
    if not counts:
        return int(gguf.LlamaFileType.ALL_F32)
    main = max(counts, key=counts.get)
    return int(_FILE_TYPES.get(main, gguf.LlamaFileType.GUESSED))
