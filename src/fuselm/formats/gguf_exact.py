"""GGUF written byte for byte as ggml writes it: keys in the order given with the value types given, tensors in
the order given, one file or gguf-split shards.

llama.cpp's quantizer copies the source's keys (`gguf_set_kv`), so the same bytes need the source's own value
types, which `read_gguf` reports in `value_types` ("UINT32", "ARRAY[STRING]", ...). Layout (ggml docs/gguf.md):
header (magic, version 3, tensor count, key count), keys, tensor infos (name, dims in ggml order, type, offset),
zero padding to the alignment, then each tensor's data padded to the alignment.

Shards follow `gguf-split --split-max-size/--split-max-tensors`: the first holds every key, each holds
split.no (UINT16), split.tensors.count (INT32) and split.count (UINT16), and shard k of n is named
`<stem>-0000k-of-0000n.gguf` (llama_split_path), so llama.cpp loads the set from the first file.
Sizes are in bytes; gguf-split's "N(M|G)" means N * 1000**2 or N * 1000**3 bytes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from tqdm import tqdm

from ..errors import FuselmError
from .atomic import atomic_set

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}

# (key, value type as read_gguf names it, value)
KeyValue = tuple[str, str, Any]


@dataclass(frozen=True)
class TensorOut:
    """One tensor to write: GGML type name, logical shape (torch order) and a producer of its bytes."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[self.type_name]]
        rows = int(np.prod(self.shape[:-1], dtype=np.int64))
        return rows * (self.shape[-1] // block) * type_size


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _string(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogateescape")  # read_gguf keeps undecodable bytes as surrogates
    return struct.pack("<Q", len(raw)) + raw


def _value_bytes(key: str, type_name: str, value: Any) -> bytes:
    try:
        if type_name.startswith("ARRAY[") and type_name.endswith("]"):
            item = GGUFValueType[type_name[6:-1]]
            items = list(value)
            head = struct.pack("<IIQ", GGUFValueType.ARRAY, item, len(items))
            if item == GGUFValueType.STRING:
                return head + b"".join(_string(v) for v in items)
            return head + np.asarray(items, dtype=np.dtype(_SCALARS[item][1:]).newbyteorder("<")).tobytes()
        vtype = GGUFValueType[type_name]
        if vtype == GGUFValueType.STRING:
            return struct.pack("<I", vtype) + _string(str(value))
        return struct.pack("<I", vtype) + struct.pack(_SCALARS[vtype], value)
    except (KeyError, struct.error, TypeError, ValueError, OverflowError) as err:
        raise FuselmError(f"metadata key {key!r}: cannot write {value!r} as GGUF {type_name} ({err})") from None


def header_bytes(metadata: Sequence[KeyValue], tensors: Sequence[TensorOut], alignment: int, *,
                 keep_dims: bool = False) -> bytes:
    """Header, keys and tensor infos, padded to the alignment: what gguf_get_meta_data returns. keep_dims writes
    every dimension of the logical shape (gguf-py's way) instead of ggml_n_dims' (trailing 1s dropped)."""
    parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    for key, type_name, value in metadata:
        parts += [_string(key), _value_bytes(key, type_name, value)]
    offset = 0
    for t in tensors:
        dims = list(reversed(t.shape))  # torch order -> ggml order (ne0 = row length first)
        while not keep_dims and len(dims) > 1 and dims[-1] == 1:  # ggml_n_dims: trailing ne of 1 are not written
            dims.pop()
        parts += [_string(t.name), struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims,
                                               GGMLQuantizationType[t.type_name], offset)]
        offset += _pad(t.nbytes, alignment)
    raw = b"".join(parts)
    return raw + bytes(_pad(len(raw), alignment) - len(raw))


def split_points(tensors: Sequence[TensorOut], *, max_bytes: int | None = None,
                 max_tensors: int | None = None) -> list[list[TensorOut]]:
    """gguf-split's split_strategy: a new shard when the padded tensor bytes would pass max_bytes, or every
    max_tensors tensors. No limit: one shard."""
    if max_bytes is not None and max_tensors is not None:
        raise FuselmError("give a maximum shard size or a maximum tensor count per shard, not both")
    if (max_bytes is not None and max_bytes <= 0) or (max_tensors is not None and max_tensors <= 0):
        raise FuselmError(f"shard limits must be positive (size {max_bytes}, tensors {max_tensors})")
    shards: list[list[TensorOut]] = [[]]
    size = 0
    for i, t in enumerate(tensors):
        n = _pad(t.nbytes, DEFAULT_ALIGNMENT)
        if max_bytes is not None:
            split = size + n > max_bytes
        else:
            split = max_tensors is not None and 0 < i < len(tensors) and i % max_tensors == 0
        if split:
            if not shards[-1]:
                raise FuselmError(f"tensor {t.name} ({n} bytes) does not fit in a shard of {max_bytes} bytes")
            shards.append([])
            size = n
        else:
            size += n
        shards[-1].append(t)
    return shards


def shard_path(path: str | os.PathLike, index: int, count: int) -> Path:
    """llama_split_path: `model.gguf`, shard 0 of 3 -> `model-00001-of-00003.gguf`."""
    p = Path(path)
    stem = p.name[: -len(".gguf")] if p.name.endswith(".gguf") else p.name
    return p.with_name(f"{stem}-{index + 1:05d}-of-{count:05d}.gguf")


def write_exact(path: str | os.PathLike, metadata: Sequence[KeyValue], tensors: Sequence[TensorOut], *,
                max_bytes: int | None = None, max_tensors: int | None = None, alignment: int = DEFAULT_ALIGNMENT,
                progress: bool = True, companion: tuple[Path, Callable[[Path], None]] | None = None) -> list[Path]:
    """Write one GGUF (or gguf-split shards when a limit is given) atomically: every file appears only when all
    are complete (formats.atomic: temporary files are removed on errors, SIGTERM and SIGINT, and a killed run's
    are cleaned by the next). Tensors are produced and written one at a time. `companion` = (path, write(tmp)):
    a file written first and committed first (Chameleon's image tokenizer). Returns the paths written."""
    names = [k for k, _, _ in metadata]
    if len(set(names)) != len(names):
        raise FuselmError(f"{path}: a metadata key is given twice")
    split = max_bytes is not None or max_tensors is not None
    shards = split_points(tensors, max_bytes=max_bytes, max_tensors=max_tensors) if split else [list(tensors)]
    if split:
        paths = [shard_path(path, i, len(shards)) for i in range(len(shards))]
        metas = [[*(metadata if i == 0 else ()), (SPLIT_NO, "UINT16", i), (SPLIT_TENSORS, "INT32", len(tensors)),
                  (SPLIT_COUNT, "UINT16", len(shards))] for i in range(len(shards))]
    else:
        paths, metas = [Path(path)], [list(metadata)]
    first = [companion[0]] if companion is not None else []
    try:
        with atomic_set([*first, *paths]) as temps:
            if companion is not None:
                companion[1](temps[0])
                temps = temps[1:]
            with tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True,
                      desc=f"writing {Path(path).name}", disable=not progress) as bar:
                for tmp, meta, shard in zip(temps, metas, shards):
                    with open(tmp, "wb") as f:
                        f.write(header_bytes(meta, shard, alignment))
                        for t in shard:
                            write_tensor(f, t, alignment)
                            bar.update(t.nbytes)
    except OSError as err:
        raise FuselmError(f"{path}: cannot write GGUF ({err.strerror or err})") from None
    return paths


def write_tensor(f: BinaryIO, t: TensorOut, alignment: int) -> None:
    data = np.ascontiguousarray(t.produce())
    if data.nbytes != t.nbytes:
        raise FuselmError(f"tensor {t.name!r}: produced {data.nbytes} bytes for {t.type_name} {t.shape}, "
                          f"expected {t.nbytes}")
    f.write(memoryview(data).cast("B"))
    f.write(bytes(_pad(t.nbytes, alignment) - t.nbytes))
