"""PyTorch pickle checkpoints (pytorch_model*.bin, Meta's consolidated*.pth and vqgan.ckpt), read without running
code from them: torch.load(weights_only=True), memory-mapped when the file is a zip archive (torch >= 1.6's
format), read whole when it is the legacy format, which cannot be mapped.

weights_only=True means torch's restricted unpickler: nothing in the file can run code. What it can still do on a
hostile file is raise almost anything (UnpicklingError, RuntimeError, ValueError, UnicodeDecodeError, IndexError,
KeyError, EOFError, zipfile errors, MemoryError for absurd storage sizes); every one of those becomes one
FuselmError naming the file.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import FuselmError

_ZIP_MAGIC = b"PK\x03\x04"


def is_zip_checkpoint(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _ZIP_MAGIC


def load_pickle(path: str | os.PathLike) -> Any:
    """The object stored in a torch checkpoint, loaded with weights_only=True (and mmap when possible)."""
    path = Path(path)
    try:
        mappable = is_zip_checkpoint(path)
    except OSError as err:
        raise FuselmError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mappable)
    except pickle.UnpicklingError as err:
        raise FuselmError(f"{path}: refusing to load: not a plain-tensor (weights-only) checkpoint (torch.load "
                          f"weights_only=True failed: {_unpickler_reason(err)}); fuselm never executes code from "
                          "checkpoints") from None
    except MemoryError:
        raise FuselmError(f"{path}: corrupt PyTorch checkpoint (it asks for more memory than there is)") from None
    except Exception as err:  # torch raises a dozen types for malformed files; none of them is the caller's bug
        raise FuselmError(f"{path}: corrupt or unreadable PyTorch checkpoint ({err.__class__.__name__}: "
                          f"{_first_line(err)})") from None


def load_tensor_dict(path: str | os.PathLike, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} checkpoint; with `key`, the dict stored under that key when the top level has it
    (Lightning checkpoints keep weights under "state_dict")."""
    path = Path(path)
    data = load_pickle(path)
    where = str(path)
    if key is not None and isinstance(data, Mapping) and key in data:
        data, where = data[key], f"{path}: key {key!r}"
    return check_tensor_dict(data, where)


def check_tensor_dict(data: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(data, Mapping):
        raise FuselmError(f"{where}: expected a dict of tensor names to tensors, found {type(data).__name__}")
    for name, value in data.items():
        if not isinstance(name, str):
            raise FuselmError(f"{where}: expected tensor names as strings, found the key {name!r}")
        if not isinstance(value, torch.Tensor):
            raise FuselmError(f"{where}: entry {name!r} is a {type(value).__name__}; expected a tensor")
    return dict(data)


def _unpickler_reason(err: BaseException) -> str:
    """torch's message opens with advice about weights_only; the reason is on the 'WeightsUnpickler error' line."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n", 1)[0]
        return " ".join(reason.split())[:200] or "no reason given"
    return _first_line(err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else "no message"
