"""The safetensors header, validated against the file before anything is mapped or allocated.

Layout: u64 little-endian header length N, N bytes of UTF-8 JSON, then the data buffer. The JSON maps tensor names
to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data buffer) plus an optional
"__metadata__" object of strings. The checks follow the reference reader (huggingface/safetensors, `validate`):
tensors tile the data buffer in offset order with no gap and no overlap, each one's byte length is
numel * itemsize, and the buffer ends where the last tensor ends. So header bytes can never be read as weights.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import FuselmError
from .json_file import parse_json_object

MAX_HEADER_BYTES = 100 * 2**20  # the reference reader's limit
MAX_DIMS = 16

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    data_start: int  # 8 + header length
    tensors: dict[str, TensorEntry]  # in file order
    metadata: dict[str, str]


def read_header(f: BinaryIO, path: Path, file_size: int) -> SafetensorsHeader:
    """Parse and validate the header of an open safetensors file of `file_size` bytes."""
    raw = f.read(8)
    if len(raw) < 8:
        raise FuselmError(f"{path}: truncated safetensors file ({file_size} bytes; the header length alone is 8)")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES:
        raise FuselmError(f"{path}: corrupt safetensors file (header length {n} bytes; expected at most "
                          f"{MAX_HEADER_BYTES})")
    if 8 + n > file_size:
        raise FuselmError(f"{path}: truncated safetensors file (header of {n} bytes, file has {file_size})")
    text = f.read(n)
    if not text.startswith(b"{"):
        raise FuselmError(f"{path}: corrupt safetensors header (expected a JSON object after the 8-byte length)")
    header = parse_json_object(text, f"{path} (safetensors header)")
    return validate_header(header, path, 8 + n, file_size)


def validate_header(header: dict, path: Path, data_start: int, file_size: int) -> SafetensorsHeader:
    """Check every entry's types and ranges, then that the tensors tile the data buffer exactly."""
    metadata = _metadata(header.get("__metadata__", {}), path)
    entries = [_entry(name, info, path, data_start) for name, info in header.items() if name != "__metadata__"]
    data_size = file_size - data_start
    cursor = 0
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        begin = entry.begin - data_start
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else f"leaves a gap of {begin - cursor} bytes"
            raise FuselmError(f"{path}: tensor {entry.name!r} starts at data offset {begin}, which {what} "
                              f"(expected {cursor}: tensors must tile the data buffer)")
        cursor = entry.end - data_start
    if cursor != data_size:
        if cursor > data_size:
            last = max(entries, key=lambda e: e.end)
            raise FuselmError(f"{path}: truncated safetensors file: tensor {last.name!r} needs bytes up to "
                              f"{last.end}, the file has {file_size}")
        raise FuselmError(f"{path}: safetensors data buffer has {data_size} bytes but its tensors cover {cursor}")
    return SafetensorsHeader(path=path, data_start=data_start, tensors={e.name: e for e in entries},
                             metadata=metadata)


def _metadata(value, path: Path) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise FuselmError(f"{path}: safetensors key '__metadata__' must be an object of strings, got "
                          f"{_describe(value)}")
    return value


def _entry(name: str, info, path: Path, data_start: int) -> TensorEntry:
    where = f"{path}: safetensors tensor {name!r}"
    if not isinstance(info, dict):
        raise FuselmError(f"{where}: expected an object with dtype, shape and data_offsets, got {_describe(info)}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise FuselmError(f"{where}: missing field {key!r}")
    dtype_name = info["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise FuselmError(f"{where}: field 'dtype' is {_describe(dtype_name)}; expected one of {', '.join(DTYPES)}")
    shape = info["shape"]
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(_is_int(s) and s >= 0 for s in shape)):
        raise FuselmError(f"{where}: field 'shape' is {_describe(shape)}; expected a list of at most {MAX_DIMS} "
                          "non-negative integers")
    offsets = info["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise FuselmError(f"{where}: field 'data_offsets' is {_describe(offsets)}; expected [begin, end] integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise FuselmError(f"{where}: field 'data_offsets' is {offsets}; expected 0 <= begin <= end")
    dtype = DTYPES[dtype_name]
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no wrap-around, compared before any allocation
    if end - begin != nbytes:
        raise FuselmError(f"{where}: data_offsets {offsets} hold {end - begin} bytes, but shape {shape} "
                          f"{dtype_name} needs {nbytes}")
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=data_start + begin, end=data_start + end)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
