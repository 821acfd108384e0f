"""Loading a GGUF model (ours or llama.cpp's), with Chameleon's companion image-tokenizer GGUF beside it."""

from __future__ import annotations

from pathlib import Path

import torch

from . import archs
from .formats import gguf as gguf_format
from .model.build import build_transformer, check_state_dict, parse_dtype
from .model.rope import normalize_rope_scaling
from .sources import rope_freqs_tensor
from .tokenizer import Tokenizer

PLAIN_TYPES = ("F32", "F16", "BF16")


def _gguf_tokenizer(path: Path, gf) -> Tokenizer | None:
    """tokenizer.json beside the file wins (exact HF behaviour); otherwise rebuild it from tokenizer.ggml.*."""
    beside = path.with_name("tokenizer.json")
    if beside.is_file():
        return Tokenizer.from_file(beside, path.with_name("tokenizer_config.json"))
    if "tokenizer.ggml.model" not in gf.metadata:
        return None
    from .formats.gguf_vocab import tokenizer_from_gguf

    backend = tokenizer_from_gguf(gf.metadata, source=str(path))
    meta = gf.metadata
    tokens = meta.get("tokenizer.ggml.tokens") or []

    def name(key: str) -> str | None:
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return Tokenizer(backend, bos_token=name("tokenizer.ggml.bos_token_id"),
                     eos_token=name("tokenizer.ggml.eos_token_id"),
                     chat_template=meta.get("tokenizer.chat_template"),
                     add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)), source=str(path))


def _image_tokenizer(path: Path):
    companion = gguf_format.companion_path(path)
    if not companion.is_file():
        return None
    from .vision import ImageTokenizer, VQGANConfig, vqgan_from_state_dict

    vq_config, state = gguf_format.read_vqgan_gguf(companion)
    config = VQGANConfig.from_dict(vq_config, source=str(companion))
    return ImageTokenizer(vqgan_from_state_dict(config, state, source=str(companion)))


def load_gguf(path: Path, *, dtype=None, device: str = "cpu", rope_scaling: dict | None = None):
    from .loader import Model, _with_rope_override

    path = Path(path)
    gf = gguf_format.read_gguf(path)
    shapes = {name: t.shape for name, t in gf.tensors.items()}
    config = archs.config_from_gguf(gf.metadata, str(path), shapes, rope_freqs=rope_freqs_tensor(gf))
    config = _with_rope_override(config, rope_scaling)
    if config.rope_scaling is not None:
        normalize_rope_scaling(config.rope_scaling, source=str(path))
    types = {t.type_name for t in gf.tensors.values()}
    quantized = sorted(types - set(PLAIN_TYPES))
    tensors: dict[str, torch.Tensor] = {}
    for name, t in gf.tensors.items():
        if t.type_name in PLAIN_TYPES:
            tensors[name] = t.to_torch()
        else:
            from .quants import dequantize

            rows = int(torch.tensor(t.shape[:-1]).prod()) if len(t.shape) > 1 else 1
            data = torch.from_numpy(t.data).reshape(rows, -1)
            tensors[name] = dequantize(data, t.type_name, (rows, t.shape[-1])).reshape(t.shape)
    state = archs.gguf_to_internal(config, tensors, source=str(path))
    state = check_state_dict(config, state, str(path), lambda n: n)
    target = parse_dtype(dtype) or (torch.float32 if quantized else _plain_dtype(state))
    transformer = build_transformer(config, state, dtype=target, device=device)
    file_type = "gguf " + ("+".join(quantized) if quantized else "+".join(sorted(types)))
    return Model(transformer, _gguf_tokenizer(path, gf), image_tokenizer=_image_tokenizer(path), source=str(path),
                 file_type=file_type)


def _plain_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for name, t in state.items() if t.is_floating_point() and t.ndim == 2}
    if len(dtypes) != 1:
        return torch.float32
    d = dtypes.pop()
    if d == torch.float16:  # float16 matmuls are slow on CPUs; bfloat16 keeps the range and uses AMX
        return torch.bfloat16
    return d

