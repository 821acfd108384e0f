"""HF checkpoint directories: config.json, single or sharded safetensors, pytorch_model*.bin.

Safetensors files are memory-mapped copy-on-write and parsed here (header + offsets), so tensors are views of the
file: nothing is read until used and nothing is copied unless the dtype changes.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import FuselmError
from .atomic import atomic_set, atomic_write
from .json_file import read_json_object
from .safetensors_header import DTYPE_NAMES, DTYPES, SafetensorsHeader, read_header  # noqa: F401 (API)
from .torch_file import load_tensor_dict


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_json(path: Path) -> dict:
    """A JSON object file of the directory (size-capped, strict UTF-8, bounded nesting): see formats.json_file."""
    return read_json_object(path)


def read_config(directory: Path) -> dict:
    return read_json(Path(directory) / "config.json")


def safetensors_header(path: Path) -> SafetensorsHeader:
    """The validated header of a safetensors file: every tensor typed, in bounds, and tiling the data exactly."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return read_header(f, path, os.fstat(f.fileno()).st_size)
    except OSError as err:
        raise FuselmError(f"{path}: cannot read safetensors file ({err.strerror})") from None


def open_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file as zero-copy views of a private (copy-on-write) memory map."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header = read_header(f, path, size)
            buf = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if header.tensors else b""
    except OSError as err:
        raise FuselmError(f"{path}: cannot read safetensors file ({err.strerror})") from None
    out: dict[str, torch.Tensor] = {}
    for name, entry in header.tensors.items():
        if entry.numel == 0:
            out[name] = torch.empty(entry.shape, dtype=entry.dtype)
        else:
            flat = torch.frombuffer(buf, dtype=entry.dtype, count=entry.numel, offset=entry.begin)
            out[name] = flat.view(entry.shape)
    return out


def weight_files(directory: Path) -> list[Path]:
    directory = Path(directory)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise FuselmError(f"{index}: key 'weight_map' must be an object of tensor names to shard file names")
            files = sorted(set(weight_map.values()))
            for f in files:
                if Path(f).name != f or f in ("", ".", ".."):
                    raise FuselmError(f"{index}: shard {f!r} in 'weight_map' is not a file name in {directory}")
                if not (directory / f).is_file():
                    raise FuselmError(f"{index}: shard {f!r} is listed but missing from {directory}")
            return [directory / f for f in files]
        if (directory / single).is_file():
            return [directory / single]
    raise FuselmError(f"{directory}: no weights found (expected model.safetensors, model.safetensors.index.json "
                      f"or pytorch_model.bin)")


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory by HF name, memory-mapped where the format allows."""
    out: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        tensors = open_safetensors(path) if path.suffix == ".safetensors" else load_tensor_dict(path)
        out.update(tensors)
    return out


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write one safetensors file atomically (formats.atomic), streaming tensor by tensor."""
    path = Path(path)
    with atomic_write(path) as tmp:
        _write_safetensors_to(tmp, path, tensors, metadata)


def _write_safetensors_to(tmp: Path, path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict | None) -> None:
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    items = [(k, v.detach().contiguous()) for k, v in tensors.items()]
    for name, t in items:
        if t.dtype not in DTYPE_NAMES:
            raise FuselmError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors files do not hold here "
                              f"(expected one of {', '.join(DTYPE_NAMES.values())})")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            f.write(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def write_hf_dir(directory: Path, config_dict: dict, tensors: Mapping[str, torch.Tensor],
                 copy_tokenizer_from: Path | None = None) -> None:
    """Write model.safetensors (+ tokenizer files) + config.json into a directory, committed as a set: every file
    is written first, then renamed into place, config.json last (it is what marks the folder as a model)."""
    import shutil

    directory = Path(directory)
    copies = []
    if copy_tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = Path(copy_tokenizer_from) / name
            if src.is_file() and src.resolve() != (directory / name).resolve():
                copies.append((src, directory / name))
    weights, config = directory / "model.safetensors", directory / "config.json"
    with atomic_set([weights, *(dst for _, dst in copies), config]) as temps:
        _write_safetensors_to(temps[0], weights, tensors, None)
        for (src, _), tmp in zip(copies, temps[1:-1]):
            shutil.copyfile(src, tmp)
        temps[-1].write_text(json.dumps(config_dict, indent=2, sort_keys=True))
