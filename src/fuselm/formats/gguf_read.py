"""Reading GGUF files: a bounds-checked parser over one private memory map; tensors are zero-copy numpy views.

Layout (ggml docs/gguf.md): header (magic, version, tensor count, kv count), key/values, tensor infos (name, dims
in ggml order, type, offset), padding to `general.alignment` (32), tensor data, each tensor padded to alignment.

Reading does not go through gguf.GGUFReader: it decodes every array element through numpy views and takes about
8 s for a Llama-3 vocabulary (128k tokens + 280k merges); this parser reads the same header with `struct` in a
fraction of that.

Every count, length, dimension and offset in the file is checked against the file's size with Python integers
(no int64 wrap-around) before anything is allocated or looped over; a bad file raises one FuselmError naming the
file and the key or tensor.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType

from ..errors import FuselmError
from .values import check_value

GGUF_MAGIC = 0x46554747  # b"GGUF" little-endian
SUPPORTED_VERSIONS = (2, 3)
MAX_ARRAY_NESTING = 8  # llama.cpp reads no nested arrays at all; gguf-py writes them for a few keys
MAX_DIM = 2**63 - 1  # ggml's int64 ne[]

# Types whose data numpy can hold directly; everything else is ggml blocks (uint8 rows). BF16 is kept as raw bits.
PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.BF16: np.uint16,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64,
}

SCALAR_FORMATS = {  # GGUF value type -> struct format (little-endian) and size
    GGUFValueType.UINT8: ("<B", 1), GGUFValueType.INT8: ("<b", 1), GGUFValueType.UINT16: ("<H", 2),
    GGUFValueType.INT16: ("<h", 2), GGUFValueType.UINT32: ("<I", 4), GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4), GGUFValueType.BOOL: ("<?", 1), GGUFValueType.UINT64: ("<Q", 8),
    GGUFValueType.INT64: ("<q", 8), GGUFValueType.FLOAT64: ("<d", 8),
}
ARRAY_DTYPES = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8, GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16, GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.BOOL: np.bool_, GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64, GGUFValueType.FLOAT64: np.float64,
}
VALUE_TYPE_OF_DTYPE = {np.dtype(d): t for t, d in ARRAY_DTYPES.items()}
_MIN_ITEM_BYTES = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}  # a length, or an item type plus a count


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str  # GGML type name: "F32", "Q4_K", ...
    shape: tuple[int, ...]  # logical shape in torch order: (rows, cols) for a matrix
    data: np.ndarray  # zero-copy view of the file: float32/float16 for F32/F16, uint16 bits for BF16,
    #                   uint8 [..., row_bytes] ggml blocks for quantized types

    @property
    def qtype(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.type_name]

    def to_torch(self) -> torch.Tensor:
        """The values as a torch tensor: zero-copy for F32/F16/BF16, dequantized (float32) for block types."""
        qtype = self.qtype
        if qtype == GGMLQuantizationType.BF16:
            return torch.from_numpy(self.data).view(torch.bfloat16)
        if qtype in PLAIN_DTYPES:
            return torch.from_numpy(self.data)
        return torch.from_numpy(gguf.quants.dequantize(self.data, qtype)).reshape(self.shape)


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    alignment: int
    metadata: dict[str, Any]  # str, int, float, bool; arrays as list[str] or numpy arrays (nested: lists)
    value_types: dict[str, str]  # key -> GGUF value type name ("UINT32", "ARRAY[STRING]", ...)
    tensors: dict[str, GGUFTensor]

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get(gguf.Keys.General.ARCHITECTURE)
        if arch is not None and not isinstance(arch, str):
            kind = self.value_types.get("general.architecture")
            raise FuselmError(f"{self.path}: key 'general.architecture' is {kind}; expected a STRING")
        return arch


class _Parser:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, what: str) -> FuselmError:
        return FuselmError(f"{self.path}: truncated or corrupt GGUF file ({what} at byte {self.pos}, file has "
                           f"{self.size} bytes)")

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise self.fail(f"{what} runs past the end of the file")
        self.pos = start + n
        return start

    def scalar(self, vtype: GGUFValueType, what: str):
        fmt, size = SCALAR_FORMATS[vtype]
        return struct.unpack_from(fmt, self.buf, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(what)
        start = self.take(n, what)
        return _utf8(self.buf[start:start + n])

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"unknown value type {raw} for {what}") from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0):
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.FLOAT32:
            # float32 keys (eps, rope base) read back as the shortest decimal that round-trips: 1e-05, not 9.99e-06
            return float(str(np.float32(self.scalar(vtype, what))))
        if vtype in SCALAR_FORMATS:
            return self.scalar(vtype, what)
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"{what} nests arrays more than {MAX_ARRAY_NESTING} deep")
        item = self.value_type(what)
        n = self.u64(what)
        item_bytes = _MIN_ITEM_BYTES.get(item) or np.dtype(ARRAY_DTYPES[item]).itemsize
        if n * item_bytes > self.size - self.pos:  # checked before any loop or allocation
            raise self.fail(f"{what} claims {n} items of at least {item_bytes} bytes, more than the file holds")
        if item == GGUFValueType.STRING:
            return self.strings(n, what)
        if item == GGUFValueType.ARRAY:
            return [self.value(item, what, depth + 1) for _ in range(n)]
        dtype = np.dtype(ARRAY_DTYPES[item])
        start = self.take(n * dtype.itemsize, what)
        return np.frombuffer(self.buf, dtype=dtype.newbyteorder("<"), count=n, offset=start).copy()

    def strings(self, n: int, what: str) -> list[str]:
        # The hot loop for vocabularies: plain struct reads, no per-item numpy.
        buf, pos, size, unpack = self.buf, self.pos, self.size, struct.unpack_from
        out = []
        for _ in range(n):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail(f"{what} runs past the end of the file")
            length = unpack("<Q", buf, pos)[0]
            pos += 8
            if pos + length > size:
                self.pos = pos
                raise self.fail(f"{what} runs past the end of the file")
            out.append(_utf8(buf[pos:pos + length]))
            pos += length
        self.pos = pos
        return out


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # keep the bytes recoverable (raw.encode("utf-8", "surrogateescape"))
        return raw.decode("utf-8", "surrogateescape")


def _type_name(vtype: GGUFValueType, value) -> str:
    if vtype != GGUFValueType.ARRAY:
        return vtype.name
    if isinstance(value, np.ndarray):
        return f"ARRAY[{VALUE_TYPE_OF_DTYPE[value.dtype.newbyteorder('=')].name}]"
    return "ARRAY[STRING]" if value and isinstance(value[0], str) else "ARRAY"


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file. Tensor data stays in the file: each GGUFTensor.data is a view of one private mapping
    (copy-on-write, so torch.from_numpy works without copying and writes never reach the file)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise FuselmError(f"{path}: truncated or corrupt GGUF file ({size} bytes; the header alone is 24)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as err:
        raise FuselmError(f"{path}: cannot read GGUF file ({err.strerror})") from None
    p = _Parser(buf, path)
    magic = p.u32("magic")
    if magic != GGUF_MAGIC:
        raise FuselmError(f"{path}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')")
    version = p.u32("version")
    if version not in SUPPORTED_VERSIONS:
        swapped = version & 0xFFFF == 0
        raise FuselmError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)"
                          + ("; big-endian GGUF files are not supported" if swapped else ""))
    n_tensors, n_kv = p.u64("tensor count"), p.u64("metadata count")
    if n_kv * 12 > size or n_tensors * 24 > size:
        raise p.fail(f"header claims {n_tensors} tensors and {n_kv} metadata keys")
    metadata: dict[str, Any] = {}
    value_types: dict[str, str] = {}
    for _ in range(n_kv):
        key = p.string("metadata key")
        vtype = p.value_type(f"metadata key {key!r}")
        value = p.value(vtype, f"metadata key {key!r}")
        if key in metadata:
            raise p.fail(f"duplicate metadata key {key!r}")
        metadata[key], value_types[key] = value, _type_name(vtype, value)
    alignment = metadata.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
    if gguf.Keys.General.ALIGNMENT in metadata and (
            value_types[gguf.Keys.General.ALIGNMENT] != "UINT32" or alignment <= 0 or alignment & (alignment - 1)):
        raise FuselmError(f"{path}: key 'general.alignment' is {alignment!r}; expected a power of two (UINT32)")
    infos = [_tensor_info(p) for _ in range(n_tensors)]
    data_start = -(-p.pos // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    spans = []
    for name, shape, qtype, offset in infos:
        if name in tensors:
            raise FuselmError(f"{path}: corrupt GGUF file (tensor {name!r} appears twice)")
        tensors[name] = _tensor_view(buf, path, name, shape, qtype, data_start, offset, alignment)
        spans.append((offset, offset + tensors[name].data.nbytes, name))
    _check_no_overlap(path, spans)
    return GGUFFile(path=path, version=version, alignment=alignment, metadata=metadata, value_types=value_types,
                    tensors=tensors)


def _check_no_overlap(path: Path, spans: list[tuple[int, int, str]]) -> None:
    """Tensors may not share bytes (llama.cpp requires them in order, back to back, padded to the alignment)."""
    end, previous = 0, None
    for begin, stop, name in sorted(spans):
        if begin < end and stop > begin:
            raise FuselmError(f"{path}: corrupt GGUF file (tensor {name!r} at data offset {begin} overlaps tensor "
                              f"{previous!r}, which ends at {end})")
        if stop > end:
            end, previous = stop, name


def _tensor_info(p: _Parser) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
    name = p.string("tensor name")
    n_dims = p.u32(f"tensor {name!r} dimensions")
    if not 1 <= n_dims <= 4:
        raise p.fail(f"tensor {name!r} has {n_dims} dimensions (expected 1 to 4)")
    dims = [p.u64(f"tensor {name!r} shape") for _ in range(n_dims)]
    if math.prod(d for d in dims if d) > MAX_DIM:  # numpy refuses shapes past int64 even when empty
        raise p.fail(f"tensor {name!r} has dimensions {dims}, more elements than ggml can index")
    raw_type = p.u32(f"tensor {name!r} type")
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise FuselmError(f"{p.path}: tensor {name!r} has GGML type id {raw_type}, which this version of the gguf "
                          "package does not know") from None
    offset = p.u64(f"tensor {name!r} offset")
    return name, tuple(reversed(dims)), qtype, offset  # ggml order (ne0 = row length first) -> torch order


def _tensor_view(buf: mmap.mmap, path: Path, name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType,
                 data_start: int, offset: int, alignment: int) -> GGUFTensor:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise FuselmError(f"{path}: corrupt GGUF file (tensor {name!r} of type {qtype.name} has rows of "
                          f"{shape[-1]} values, not a multiple of its block size {block})")
    if offset % alignment:
        raise FuselmError(f"{path}: corrupt GGUF file (tensor {name!r} offset {offset} is not a multiple of the "
                          f"alignment {alignment})")
    n_rows = math.prod(shape[:-1])  # Python ints: no int64 wrap-around
    row_bytes = shape[-1] // block * type_size
    start, nbytes = data_start + offset, n_rows * row_bytes
    if start + nbytes > len(buf):
        raise FuselmError(f"{path}: truncated GGUF file (tensor {name!r} needs bytes {start}..{start + nbytes}, "
                          f"the file has {len(buf)})")
    dtype = PLAIN_DTYPES.get(qtype)
    if dtype is None:
        data = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start).reshape(*shape[:-1], row_bytes)
    else:
        data = np.frombuffer(buf, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize, offset=start).reshape(shape)
    return GGUFTensor(name=name, type_name=qtype.name, shape=shape, data=data)


# ---------------------------------------------------------------- typed metadata access

_MISSING = object()


def metadata_value(gf: GGUFFile, key: str, kind: str, default: Any = _MISSING, *, low: float | None = None,
                   high: float | None = None):
    """`gf.metadata[key]` checked to be a `kind` ("str", "int", "float", "bool") within [low, high]; FuselmError
    naming the file and key otherwise. Without a default the key is required."""
    if key not in gf.metadata:
        if default is _MISSING:
            raise FuselmError(f"{gf.path}: missing required GGUF key {key!r}")
        return default
    return check_value(gf.metadata[key], kind, f"{gf.path}: key {key!r}", low=low, high=high)
