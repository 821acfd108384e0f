"""HF checkpoint directories: config.json, single or sharded safetensors, pytorch_model*.bin.

Safetensors files are memory-mapped copy-on-write and parsed here (header + offsets), so tensors are views of the
file: nothing is read until used and nothing is copied unless the dtype changes.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import FuselmError

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FuselmError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FuselmError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise FuselmError(f"{path}: expected a JSON object at the top level")
    return data


def read_config(directory: Path) -> dict:
    return read_json(Path(directory) / "config.json")


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, data start offset). Validates that every tensor lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FuselmError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 * 2**20:
            raise FuselmError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FuselmError(f"{path}: corrupt safetensors header") from None
    start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if start + end > size:
            raise FuselmError(
                f"{path}: truncated safetensors file: tensor {name!r} needs bytes up to {start + end}, "
                f"file has {size}")
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise FuselmError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    return header, start


def open_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file as zero-copy views of a private (copy-on-write) memory map."""
    header, start = safetensors_header(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else b""
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        count = 1
        for s in shape:
            count *= s
        if end - begin != count * dtype.itemsize:
            raise FuselmError(f"{path}: tensor {name!r} has {end - begin} bytes, expected {count * dtype.itemsize} "
                              f"for shape {shape} {info['dtype']}")
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        out[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=start + begin).view(shape)
    return out


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise FuselmError(f"{path}: cannot load as a weights-only PyTorch checkpoint ({err.__class__.__name__}: "
                          f"{str(err).splitlines()[0][:200]}); fuselm never executes code from checkpoints") from None
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise FuselmError(f"{path}: expected a dict of tensors")
    return dict(data)


def weight_files(directory: Path) -> list[Path]:
    directory = Path(directory)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise FuselmError(f"{index}: missing 'weight_map'")
            files = sorted(set(weight_map.values()))
            for f in files:
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
        tensors = open_safetensors(path) if path.suffix == ".safetensors" else _load_bin(path)
        out.update(tensors)
    return out


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write one safetensors file atomically (temp file, then rename), streaming tensor by tensor."""
    path = Path(path)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    items = [(k, v.detach().contiguous()) for k, v in tensors.items()]
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for _, t in items:
                f.write(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_hf_dir(directory: Path, config_dict: dict, tensors: Mapping[str, torch.Tensor],
                 copy_tokenizer_from: Path | None = None) -> None:
    """Write config.json + model.safetensors (+ tokenizer files) into a directory."""
    import shutil

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", tensors)
    tmp = directory / ".config.json.tmp"
    tmp.write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    os.replace(tmp, directory / "config.json")
    if copy_tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            src = Path(copy_tokenizer_from) / name
            if src.is_file() and src.resolve() != (directory / name).resolve():
                shutil.copyfile(src, directory / name)
