"""GGUF files: read memory-mapped (gguf_read), written streamed and atomically (gguf_write, atomic), on the `gguf`
package's types and writer; plus the model-level writer and Chameleon's image-tokenizer companion file.

A Chameleon image tokenizer (VQGAN) goes into a companion file, `<model>-vqgan.gguf`, the way llama.cpp keeps
vision encoders in `mmproj` files: llama.cpp rejects unknown tensors in the main file. Its architecture is
`chameleon_vqgan` (fuselm's own, llama.cpp does not read it): metadata `chameleon_vqgan.config` holds the VQ config
as JSON and the tensors keep their checkpoint names (encoder.*, decoder.*, quantize.*, quant_conv.*, ...).

A model written together with its companion (`write_gguf(..., vqgan=...)`) is committed as a pair: companion first,
then the main file, and both carry the same `fuselm.companion_id`. `read_companion` refuses a main file whose
companion is missing or belongs to another write, so an interrupted write never loads as a text-only model.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import torch

from ..errors import FuselmError
from .atomic import atomic_write, commit_pair
from .gguf_read import GGUF_MAGIC, SUPPORTED_VERSIONS, GGUFFile, GGUFTensor, check_value, metadata_value, read_gguf  # noqa: F401 (API)
from .gguf_write import MAX_NAME_BYTES, TensorPlan, file_type, plan_tensor, write_file  # noqa: F401 (API)
from .json_file import parse_json_object

VQGAN_ARCH = "chameleon_vqgan"
VQGAN_CONFIG_KEY = f"{VQGAN_ARCH}.config"
COMPANION_ID_KEY = "fuselm.companion_id"  # the same random id in a model and the companion written with it
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION


def write_gguf_file(path: str | os.PathLike, arch: str, metadata: Mapping[str, Any], tensors: Mapping[str, tuple],
                    *, progress: bool = True,
                    vqgan: tuple[Mapping[str, Any], Mapping[str, torch.Tensor]] | None = None) -> Path:
    """Write a GGUF: `metadata` (general.architecture = arch goes first), then `tensors`, each name -> (tensor,
    type name) or (callable producing GGML bytes, type name, shape), one in memory at a time. general.file_type
    and the quantization version are derived from the tensors unless `metadata` sets them.

    vqgan=(VQ config, VQGAN state dict) writes Chameleon's image tokenizer as the companion file and commits the
    two as a pair. Without it, a companion left beside `path` by an earlier write is removed. Returns the path."""
    path = Path(path)
    plans = [plan_tensor(name, value) for name, value in tensors.items()]
    metadata = {gguf.Keys.General.FILE_TYPE: file_type(plans),
                gguf.Keys.General.QUANTIZATION_VERSION: QUANTIZATION_VERSION, **metadata}
    metadata.pop(COMPANION_ID_KEY, None)  # a copied source's id would pair this file with a stranger
    if vqgan is None:
        with atomic_write(path) as tmp:
            write_file(tmp, arch, metadata, plans, progress, path.name)
        _remove_stale_companion(path)
        return path
    companion = companion_path(path)
    metadata[COMPANION_ID_KEY] = pair_id = _content_id(*vqgan)
    vq_metadata, vq_plans = _vqgan_plans(companion, *vqgan)
    vq_metadata[COMPANION_ID_KEY] = pair_id
    with commit_pair(path, companion) as (main_tmp, companion_tmp):
        write_file(companion_tmp, VQGAN_ARCH, vq_metadata, vq_plans, False, companion.name)
        write_file(main_tmp, arch, metadata, plans, progress, path.name)
    return path


def _content_id(vq_config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> str:
    """The pair id: a hash of the companion's content, so the same model written twice gives the same bytes (a
    seeded training run is reproducible), while a companion of other content never matches."""
    h = hashlib.sha256(json.dumps(dict(vq_config), sort_keys=True, default=str).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def _remove_stale_companion(path: Path) -> None:
    companion = companion_path(path)
    if companion.is_file():
        companion.unlink()
        print(f"note: removed {companion}: it was the image tokenizer of the file {path} replaced", file=sys.stderr)


# ---------------------------------------------------------------- Chameleon's image tokenizer (companion file)

def companion_path(model_path: str | os.PathLike) -> Path:
    """`<model>.gguf` -> `<model>-vqgan.gguf`, the image tokenizer beside the language model."""
    p = Path(model_path)
    stem = p.name[:-len(".gguf")] if p.name.endswith(".gguf") else p.name
    return p.with_name(f"{stem}-vqgan.gguf")


def _vqgan_plans(path: Path, vq_config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
                 ) -> tuple[dict[str, Any], list[TensorPlan]]:
    try:
        config_json = json.dumps(dict(vq_config), sort_keys=True)
    except (TypeError, ValueError) as err:
        raise FuselmError(f"{path}: VQ config is not JSON-serializable ({err})") from None
    keep = {torch.float16: "F16", torch.bfloat16: "BF16"}
    plans = []
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise FuselmError(f"{path}: VQGAN tensor {name!r} must be a float torch tensor")
        plans.append(plan_tensor(name, (t.reshape(1) if t.ndim == 0 else t, keep.get(t.dtype, "F32"))))
    return {VQGAN_CONFIG_KEY: config_json, gguf.Keys.General.NAME: "chameleon vqgan"}, plans


def companion_for(model_path: str | os.PathLike, vq_config: Mapping[str, Any],
                  state_dict: Mapping[str, torch.Tensor]) -> tuple[str, Path, Callable[[Path], None]]:
    """(pair id, companion path, write(tmp)) of the image tokenizer to commit with the model at `model_path`
    (put the id in the model's metadata under COMPANION_ID_KEY)."""
    companion = companion_path(model_path)
    pair_id = _content_id(vq_config, state_dict)
    metadata, plans = _vqgan_plans(companion, vq_config, state_dict)
    metadata[COMPANION_ID_KEY] = pair_id
    return pair_id, companion, lambda tmp: write_file(tmp, VQGAN_ARCH, metadata, plans, False, companion.name)


def remove_stale_companion(model_path: str | os.PathLike) -> None:
    """A model written without an image tokenizer: remove one an earlier write left beside it."""
    _remove_stale_companion(Path(model_path))


def write_vqgan_gguf(path: str | os.PathLike, vq_config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                     *, progress: bool = False) -> Path:
    """The VQGAN alone as its own GGUF (arch chameleon_vqgan): config as JSON, tensors F32 (F16/BF16 kept).
    To write it beside a model, prefer write_gguf(..., vqgan=...), which commits the two as a pair."""
    path = Path(path)
    metadata, plans = _vqgan_plans(path, vq_config, state_dict)
    with atomic_write(path) as tmp:
        write_file(tmp, VQGAN_ARCH, metadata, plans, progress, path.name)
    return path


def read_vqgan_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(VQ config, state dict) from a chameleon_vqgan GGUF; tensors are zero-copy views of the mapped file."""
    config, tensors, _ = _read_vqgan(read_gguf(path))
    return config, tensors


def _read_vqgan(f: GGUFFile) -> tuple[dict, dict[str, torch.Tensor], str | None]:
    if f.architecture != VQGAN_ARCH:
        raise FuselmError(f"{f.path}: general.architecture is {f.architecture!r}; expected {VQGAN_ARCH!r} "
                          "(a Chameleon image-tokenizer companion file)")
    raw = metadata_value(f, VQGAN_CONFIG_KEY, "str")
    config = parse_json_object(raw, f"{f.path}: key {VQGAN_CONFIG_KEY!r}")
    pair_id = metadata_value(f, COMPANION_ID_KEY, "str", None)
    return config, {name: t.to_torch() for name, t in f.tensors.items()}, pair_id


def read_companion(model: GGUFFile) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(VQ config, state dict) of the image tokenizer beside a model GGUF, or None when there is none.

    A model written with its companion names it by `fuselm.companion_id`: then the companion must exist and carry
    the same id. A companion carrying an id that the model does not name is debris of another write."""
    want = metadata_value(model, COMPANION_ID_KEY, "str", None)
    path = companion_path(model.path)
    if not path.is_file():
        if want is not None:
            raise FuselmError(f"{model.path}: its image tokenizer {path.name} is missing (the model was written with "
                              f"it, key {COMPANION_ID_KEY!r}); put the companion file beside the model")
        return None
    config, tensors, got = _read_vqgan(read_gguf(path))
    if got != want:
        raise FuselmError(f"{path}: this image tokenizer was not written with {model.path.name} (key "
                          f"{COMPANION_ID_KEY!r} is {got!r}, the model expects {want!r}); it is left from another "
                          "write")
    return config, tensors
