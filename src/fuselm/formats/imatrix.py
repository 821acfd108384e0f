"""Importance-matrix files as llama.cpp's llama-imatrix writes them (GGUF) and as it used to (legacy `.dat`).

GGUF layout (tools/imatrix/imatrix.cpp, save_imatrix): keys `general.type` = "imatrix", `imatrix.datasets`
(string array), `imatrix.chunk_count` and `imatrix.chunk_size` (UINT32); for each weight, in name order, two F32
tensors: `<weight>.in_sum2` with ne = [cols, n_mat] (the sum over tokens of x^2 per input column, one row per
expert) and `<weight>.counts` with ne = [1, n_mat] (tokens seen per expert). ggml does not write trailing
dimensions of 1, so a dense weight's tensors are 1-D: [cols] and [1].

Legacy layout (common/imatrix-loader.cpp): int32 entry count; per entry int32 name length, name, int32 ncall,
int32 value count, float32 values = (sum / count) * ncall; optionally int32 chunk count, int32 length and the
dataset name.

`Imatrix.importance()` gives the per-tensor vectors llama-quantize feeds the quantizer: sum / count per expert
(1 where an expert saw no token), or, for a legacy file, value / ncall.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FuselmError
from .gguf import read_gguf
from .gguf_exact import TensorOut, write_exact

IMATRIX_TYPE = "imatrix"
KEY_TYPE, KEY_DATASETS = "general.type", "imatrix.datasets"
KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.chunk_count", "imatrix.chunk_size"
SUMS_SUFFIX, COUNTS_SUFFIX = ".in_sum2", ".counts"


@dataclass(frozen=True)
class ImatrixEntry:
    """One weight's statistics: `sums` float32 [n_mat, cols] and `counts` int64 [n_mat] (tokens per expert).
    A legacy entry holds the stored values as [1, n_values] and its ncall as the single count."""

    sums: np.ndarray
    counts: np.ndarray


@dataclass(frozen=True)
class Imatrix:
    entries: dict[str, ImatrixEntry]  # by GGUF weight name ("blk.0.attn_q.weight")
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    chunk_size: int = 0
    is_legacy: bool = False
    has_metadata: bool = True
    path: Path | None = field(default=None, compare=False)

    def importance(self) -> dict[str, np.ndarray]:
        """llama-quantize's importance vectors (float32, n_mat * cols values) by weight name."""
        out = {}
        for name, e in self.entries.items():
            if self.is_legacy:
                ncall = int(e.counts[0]) if e.counts.size else 0
                out[name] = (e.sums / np.float32(ncall) if ncall > 0 else e.sums).reshape(-1).astype(np.float32)
                continue
            counts = e.counts.astype(np.float32)[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                means = np.where(counts > 0, e.sums / np.where(counts > 0, counts, 1), np.float32(1))
            out[name] = means.astype(np.float32).reshape(-1)
        return out


# ---------------------------------------------------------------- reading


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read a GGUF imatrix, or a legacy .dat one (told apart by the GGUF magic, as llama.cpp does)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise FuselmError(f"{path}: cannot read imatrix file ({err.strerror})") from None
    return _read_gguf_imatrix(path) if magic == b"GGUF" else _read_legacy(path)


def _read_gguf_imatrix(path: Path) -> Imatrix:
    gf = read_gguf(path)
    meta, types = gf.metadata, gf.value_types
    kind = meta.get(KEY_TYPE)
    if kind is not None and kind != IMATRIX_TYPE:
        raise FuselmError(f"{path}: {KEY_TYPE} is {kind!r}; expected {IMATRIX_TYPE!r} (an imatrix file)")
    for key in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
        if key in meta and types[key] != "UINT32":
            raise FuselmError(f"{path}: key {key!r} is {types[key]}; expected UINT32")
    datasets = meta.get(KEY_DATASETS, [])
    if KEY_DATASETS in meta and not (types[KEY_DATASETS] == "ARRAY[STRING]" or datasets == []):
        raise FuselmError(f"{path}: key {KEY_DATASETS!r} is {types[KEY_DATASETS]}; expected an array of strings")
    pairs: dict[str, dict[str, object]] = {}
    for name, t in gf.tensors.items():
        for suffix, part in ((SUMS_SUFFIX, "sums"), (COUNTS_SUFFIX, "counts")):
            if name.endswith(suffix):
                if t.type_name != "F32":
                    raise FuselmError(f"{path}: tensor {name!r} is {t.type_name}; imatrix sums and counts are F32")
                pairs.setdefault(name[: -len(suffix)], {})[part] = t
                break
        else:
            raise FuselmError(f"{path}: tensor {name!r} is neither '<weight>{SUMS_SUFFIX}' nor "
                              f"'<weight>{COUNTS_SUFFIX}'")
    if not pairs:
        raise FuselmError(f"{path}: the imatrix file holds no tensors")
    entries = {}
    for weight, parts in sorted(pairs.items()):
        if set(parts) != {"sums", "counts"}:
            missing = COUNTS_SUFFIX if "sums" in parts else SUMS_SUFFIX
            raise FuselmError(f"{path}: weight {weight!r} has no {weight + missing!r} tensor (mismatched sums and "
                              "counts)")
        sums, counts = np.asarray(parts["sums"].data, np.float32), np.asarray(parts["counts"].data, np.float32)
        n_mat = counts.size
        if n_mat == 0 or sums.size % n_mat:
            raise FuselmError(f"{path}: weight {weight!r}: {sums.size} sums do not split over {n_mat} counts")
        if not np.isfinite(counts).all() or (counts < 0).any():
            raise FuselmError(f"{path}: weight {weight!r}: counts must be finite and non-negative")
        # llama.cpp rounds the stored float counts (std::lround: halves away from zero)
        rounded = np.floor(counts.astype(np.float64) + 0.5).astype(np.int64)
        entries[weight] = ImatrixEntry(sums.reshape(n_mat, -1).copy(), rounded.reshape(-1))
    has_metadata = all(k in meta for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE))
    return Imatrix(entries, tuple(datasets), int(meta.get(KEY_CHUNK_COUNT, 0)), int(meta.get(KEY_CHUNK_SIZE, 0)),
                   is_legacy=False, has_metadata=has_metadata, path=path)


class _Cursor:
    def __init__(self, raw: bytes, path: Path) -> None:
        self.raw, self.path, self.pos = raw, path, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.raw):
            raise FuselmError(f"{self.path}: truncated legacy imatrix file ({what} needs {n} bytes at byte "
                              f"{self.pos}, the file has {len(self.raw)})")
        out = self.raw[self.pos : self.pos + n]
        self.pos += n
        return out

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _read_legacy(path: Path) -> Imatrix:
    raw = path.read_bytes()
    c = _Cursor(raw, path)
    n_entries = c.i32("entry count")
    if n_entries < 1:
        raise FuselmError(f"{path}: not an imatrix file (neither GGUF nor a legacy .dat with entries: count "
                          f"{n_entries})")
    entries = {}
    for i in range(n_entries):
        name_len = c.i32(f"entry {i} name length")
        try:
            name = c.take(name_len, f"entry {i} name").decode("utf-8")
        except UnicodeDecodeError:
            raise FuselmError(f"{path}: entry {i} name is not UTF-8") from None
        ncall, nval = c.i32(f"{name!r} ncall"), c.i32(f"{name!r} value count")
        if nval < 1:
            raise FuselmError(f"{path}: entry {name!r} has {nval} values; expected at least 1")
        values = np.frombuffer(c.take(4 * nval, f"{name!r} values"), dtype="<f4").astype(np.float32)
        if name in entries:
            raise FuselmError(f"{path}: entry {name!r} appears twice")
        entries[name] = ImatrixEntry(values.reshape(1, -1), np.array([ncall], np.int64))
    chunk_count, datasets = 0, ()
    if c.pos < len(raw):  # optional trailer: chunk count, then the dataset name
        chunk_count = c.i32("chunk count")
        if c.pos < len(raw):
            n = c.i32("dataset name length")
            if n > 0:
                datasets = (c.take(n, "dataset name").decode("utf-8", "replace"),)
    if c.pos != len(raw):
        raise FuselmError(f"{path}: {len(raw) - c.pos} unexpected bytes after the legacy imatrix data")
    return Imatrix(entries, datasets, chunk_count, 0, is_legacy=True, has_metadata=False, path=path)


# ---------------------------------------------------------------- writing


def write_imatrix(path: str | os.PathLike, entries: Mapping[str, ImatrixEntry], *, datasets: tuple[str, ...] = (),
                  chunk_count: int, chunk_size: int) -> Path:
    """Write the GGUF imatrix llama-imatrix writes: same keys, same tensor names, order and shapes."""
    metadata = [(KEY_TYPE, "STRING", IMATRIX_TYPE), (KEY_DATASETS, "ARRAY[STRING]", list(datasets)),
                (KEY_CHUNK_COUNT, "UINT32", int(chunk_count)), (KEY_CHUNK_SIZE, "UINT32", int(chunk_size))]
    tensors = []
    for name in sorted(entries):  # llama-imatrix sorts the names
        e = entries[name]
        sums = np.ascontiguousarray(e.sums, np.float32)
        counts = np.asarray(e.counts).reshape(-1)
        if sums.ndim != 2 or sums.shape[0] != counts.size or counts.size == 0:
            raise FuselmError(f"imatrix entry {name!r}: sums {sums.shape} must be [n_mat, cols] with one count "
                              f"per matrix (got {counts.size})")
        tensors.append(TensorOut(name + SUMS_SUFFIX, "F32", sums.shape, lambda s=sums: s))
        c = counts.astype(np.float32).reshape(-1, 1)
        tensors.append(TensorOut(name + COUNTS_SUFFIX, "F32", c.shape, lambda c=c: c))
    return write_exact(path, metadata, tensors, progress=False)[0]
