"""GGUF files: read memory-mapped, write streamed and atomically, on the `gguf` package's types and writer.

Layout (ggml docs/gguf.md): header (magic, version, tensor count, kv count), key/values, tensor infos (name, dims
in ggml order, type, offset), padding to `general.alignment` (32), tensor data, each tensor padded to alignment.

Reading does not go through gguf.GGUFReader: it decodes every array element through numpy views and takes about
8 s for a Llama-3 vocabulary (128k tokens + 280k merges); this parser reads the same header with `struct` in a
fraction of that and maps tensor data the same way (one private mmap, zero-copy numpy views).

Tensors are given to the writer under GGUF names (archs.internal_to_gguf) as (data, type name), where data is a
float array/tensor for F32/F16/BF16 and ggml block bytes uint8 [rows, row_bytes] for quantized types, or lazily as
(callable returning that data, type name, logical shape), so a quantizer can produce one tensor at a time.

A Chameleon image tokenizer (VQGAN) goes into a companion file, `<model>-vqgan.gguf`, the way llama.cpp keeps
vision encoders in `mmproj` files: llama.cpp rejects unknown tensors in the main file. Its architecture is
`chameleon_vqgan` (fuselm's own, llama.cpp does not read it): metadata `chameleon_vqgan.config` holds the VQ config
as JSON and the tensors keep their checkpoint names (encoder.*, decoder.*, quantize.*, quant_conv.*, ...).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import uuid
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

GGUF_MAGIC = 0x46554747  # b"GGUF" little-endian
SUPPORTED_VERSIONS = (2, 3)
MAX_NAME_BYTES = 63  # llama.cpp rejects tensor names of GGML_MAX_NAME (64) bytes or more
VQGAN_ARCH = "chameleon_vqgan"
VQGAN_CONFIG_KEY = f"{VQGAN_ARCH}.config"
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION

# Types whose data numpy can hold directly; everything else is ggml blocks (uint8 rows). BF16 is kept as raw bits.
_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.BF16: np.uint16,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64,
}
_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                GGMLQuantizationType.F64)

_SCALAR_FORMATS = {  # GGUF value type -> struct format (little-endian) and size
    GGUFValueType.UINT8: ("<B", 1), GGUFValueType.INT8: ("<b", 1), GGUFValueType.UINT16: ("<H", 2),
    GGUFValueType.INT16: ("<h", 2), GGUFValueType.UINT32: ("<I", 4), GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4), GGUFValueType.BOOL: ("<?", 1), GGUFValueType.UINT64: ("<Q", 8),
    GGUFValueType.INT64: ("<q", 8), GGUFValueType.FLOAT64: ("<d", 8),
}
_ARRAY_DTYPES = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8, GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16, GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.BOOL: np.bool_, GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64, GGUFValueType.FLOAT64: np.float64,
}
_VALUE_TYPE_OF_DTYPE = {np.dtype(d): t for t, d in _ARRAY_DTYPES.items()}

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


# ---------------------------------------------------------------- reading

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
        if qtype in _PLAIN_DTYPES:
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
        return self.metadata.get(gguf.Keys.General.ARCHITECTURE)


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
        fmt, size = _SCALAR_FORMATS[vtype]
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

    def value(self, vtype: GGUFValueType, what: str):
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.FLOAT32:
            # float32 keys (eps, rope base) read back as the shortest decimal that round-trips: 1e-05, not 9.99e-06
            return float(str(np.float32(self.scalar(vtype, what))))
        if vtype in _SCALAR_FORMATS:
            return self.scalar(vtype, what)
        item = self.value_type(what)
        n = self.u64(what)
        if item == GGUFValueType.STRING:
            return self.strings(n, what)
        if item == GGUFValueType.ARRAY:
            return [self.value(item, what) for _ in range(n)]
        dtype = np.dtype(_ARRAY_DTYPES[item])
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
        return f"ARRAY[{_VALUE_TYPE_OF_DTYPE[value.dtype.newbyteorder('=')].name}]"
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
    for name, shape, qtype, offset in infos:
        if name in tensors:
            raise FuselmError(f"{path}: corrupt GGUF file (tensor {name!r} appears twice)")
        tensors[name] = _tensor_view(buf, path, name, shape, qtype, data_start, offset, alignment)
    return GGUFFile(path=path, version=version, alignment=alignment, metadata=metadata, value_types=value_types,
                    tensors=tensors)


def _tensor_info(p: _Parser) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
    name = p.string("tensor name")
    n_dims = p.u32(f"tensor {name!r} dimensions")
    if not 1 <= n_dims <= 4:
        raise p.fail(f"tensor {name!r} has {n_dims} dimensions (expected 1 to 4)")
    dims = [p.u64(f"tensor {name!r} shape") for _ in range(n_dims)]
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
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    row_bytes = shape[-1] // block * type_size
    start, nbytes = data_start + offset, n_rows * row_bytes
    if start + nbytes > len(buf):
        raise FuselmError(f"{path}: truncated GGUF file (tensor {name!r} needs bytes {start}..{start + nbytes}, "
                          f"the file has {len(buf)})")
    dtype = _PLAIN_DTYPES.get(qtype)
    if dtype is None:
        data = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start).reshape(*shape[:-1], row_bytes)
    else:
        data = np.frombuffer(buf, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize, offset=start).reshape(shape)
    return GGUFTensor(name=name, type_name=qtype.name, shape=shape, data=data)


# ---------------------------------------------------------------- writing

@dataclass(frozen=True)
class _TensorPlan:
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
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_size


def _raw_data(name: str, data, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Data in file layout for one tensor (converting floats to the target float type, one tensor at a time)."""
    if isinstance(data, torch.Tensor):
        t = data.detach().cpu()
        if qtype == GGMLQuantizationType.BF16 and t.is_floating_point():
            return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        data = t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
    data = np.asarray(data)
    if qtype in _FLOAT_TYPES:
        if data.dtype.kind != "f":
            raise FuselmError(f"tensor {name!r}: type {qtype.name} needs float data, got {data.dtype}")
        if qtype == GGMLQuantizationType.BF16:
            return _raw_data(name, torch.from_numpy(np.ascontiguousarray(data, np.float32)), qtype, shape)
        return np.ascontiguousarray(data, dtype=_PLAIN_DTYPES[qtype])
    if qtype in _PLAIN_DTYPES:
        return np.ascontiguousarray(data, dtype=_PLAIN_DTYPES[qtype])
    if data.dtype != np.uint8:
        raise FuselmError(f"tensor {name!r}: type {qtype.name} needs ggml block bytes (uint8 [rows, row_bytes], "
                          f"from fuselm.quants.quantize), got {data.dtype}")
    return np.ascontiguousarray(data)


def _plan_tensor(name: str, value) -> _TensorPlan:
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
        if qtype not in _PLAIN_DTYPES:  # block bytes [..., row_bytes] -> logical [..., cols]
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

    return _TensorPlan(name=name, qtype=qtype, shape=shape, nbytes=nbytes, produce=produce)


def _value_type(key: str, value) -> tuple[GGUFValueType, GGUFValueType | None, Any] | None:
    """(type, array item type, value as the writer wants it) for a metadata value; None skips it (empty array)."""
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL, None, bool(value)
    if isinstance(value, np.generic) and value.dtype in _VALUE_TYPE_OF_DTYPE:
        return _VALUE_TYPE_OF_DTYPE[value.dtype], None, value.item()
    if isinstance(value, int):
        return _int_type([value]), None, value
    if isinstance(value, float):
        return GGUFValueType.FLOAT32, None, value
    if isinstance(value, str):
        return GGUFValueType.STRING, None, value
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype in _VALUE_TYPE_OF_DTYPE:
        if not len(value):
            return None
        return GGUFValueType.ARRAY, _VALUE_TYPE_OF_DTYPE[value.dtype], value.tolist()
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


def _write_atomically(path: str | os.PathLike, arch: str, metadata: Mapping[str, Any], plans: list[_TensorPlan],
                      progress: bool) -> Path:
    """Write to a hidden temporary file beside `path`, then rename: a killed run never leaves a partial `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FuselmError(f"{path}: cannot create its folder {path.parent} ({err.strerror})") from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        for key, value in metadata.items():
            if key == gguf.Keys.General.ARCHITECTURE:
                continue  # GGUFWriter writes it first
            typed = _value_type(key, value)
            if typed is not None:
                writer.add_key_value(key, typed[2], typed[0], sub_type=typed[1])
        for plan in plans:
            # The gguf writer wants numpy order and a dtype; raw_dtype carries the real GGML type.
            writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), plan.nbytes, raw_dtype=plan.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=sum(p.nbytes for p in plans), unit="B", unit_scale=True, desc=f"writing {path.name}",
                  disable=not progress) as bar:
            for plan in plans:  # one tensor in memory at a time
                writer.write_tensor_data(plan.produce())
                bar.update(plan.nbytes)
        writer.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _file_type(plans: list[_TensorPlan]) -> int:
    counts: dict[str, int] = {}
    for plan in plans:
        if len(plan.shape) >= 2:
            counts[plan.qtype.name] = counts.get(plan.qtype.name, 0) + int(np.prod(plan.shape))
    if not counts:
        return int(gguf.LlamaFileType.ALL_F32)
    main = max(counts, key=counts.get)
    return int(_FILE_TYPES.get(main, gguf.LlamaFileType.GUESSED))


def write_gguf_file(path: str | os.PathLike, arch: str, metadata: Mapping[str, Any], tensors: Mapping[str, tuple],
                    *, progress: bool = True) -> Path:
    """Write a GGUF: `metadata` (general.architecture = arch is written first), then `tensors`, each
    name -> (tensor, type name) or (callable producing GGML bytes, type name, shape), one in memory at a time.
    general.file_type and the quantization version are derived from the tensors unless `metadata` sets them."""
    plans = [_plan_tensor(name, value) for name, value in tensors.items()]
    metadata = {gguf.Keys.General.FILE_TYPE: _file_type(plans),
                gguf.Keys.General.QUANTIZATION_VERSION: QUANTIZATION_VERSION, **metadata}
    return _write_atomically(path, arch, metadata, plans, progress)


# ---------------------------------------------------------------- Chameleon's image tokenizer (companion file)

def companion_path(model_path: str | os.PathLike) -> Path:
    """`<model>.gguf` -> `<model>-vqgan.gguf`, the image tokenizer beside the language model."""
    p = Path(model_path)
    stem = p.name[:-len(".gguf")] if p.name.endswith(".gguf") else p.name
    return p.with_name(f"{stem}-vqgan.gguf")


def write_vqgan_gguf(path: str | os.PathLike, vq_config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                     *, progress: bool = False) -> Path:
    """The VQGAN as its own GGUF (arch chameleon_vqgan): config as JSON, tensors F32 (F16/BF16 kept as they are)."""
    try:
        config_json = json.dumps(dict(vq_config), sort_keys=True)
    except TypeError as err:
        raise FuselmError(f"{path}: VQ config is not JSON-serializable ({err})") from None
    keep = {torch.float16: "F16", torch.bfloat16: "BF16"}
    plans = []
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise FuselmError(f"{path}: VQGAN tensor {name!r} must be a float torch tensor")
        plans.append(_plan_tensor(name, (t.reshape(1) if t.ndim == 0 else t, keep.get(t.dtype, "F32"))))
    metadata = {VQGAN_CONFIG_KEY: config_json, gguf.Keys.General.NAME: "chameleon vqgan"}
    return _write_atomically(path, VQGAN_ARCH, metadata, plans, progress)


def read_vqgan_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(VQ config, state dict) from a chameleon_vqgan GGUF; tensors are zero-copy views of the mapped file."""
    f = read_gguf(path)
    if f.architecture != VQGAN_ARCH:
        raise FuselmError(f"{f.path}: general.architecture is {f.architecture!r}; expected {VQGAN_ARCH!r} "
                          "(a Chameleon image-tokenizer companion file)")
    if VQGAN_CONFIG_KEY not in f.metadata:
        raise FuselmError(f"{f.path}: missing required GGUF key {VQGAN_CONFIG_KEY!r}")
    try:
        config = json.loads(f.metadata[VQGAN_CONFIG_KEY])
    except json.JSONDecodeError as err:
        raise FuselmError(f"{f.path}: key {VQGAN_CONFIG_KEY!r} is not valid JSON ({err})") from None
    return config, {name: t.to_torch() for name, t in f.tensors.items()}
