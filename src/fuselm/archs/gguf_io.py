"""Writing a model as a GGUF that llama.cpp loads: the config's keys, the tokenizer, the weights."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf

from ..config import ModelConfig
from ..formats.gguf import write_gguf_file
from ..formats.gguf_vocab import tokenizer_to_gguf
from .gguf_config import config_to_gguf_metadata, gguf_extra_tensors
from .registry import arch_record


def write_gguf(path: str | os.PathLike, config: ModelConfig, tensors: Mapping[str, tuple], *, tokenizer=None,
               chat_template: str | None = None, extra_metadata: Mapping[str, Any] | None = None,
               progress: bool = True, vqgan: tuple[Mapping[str, Any], Mapping] | None = None) -> Path:
    """Write a model GGUF: config keys (config_to_gguf_metadata), the tokenizer as tokenizer.ggml.* (a
    `tokenizers.Tokenizer`, or tokenizer.* metadata read from another GGUF), tensors under GGUF names in GGUF
    layouts (archs.internal_to_gguf), plus what llama.cpp needs for the config (rope_freqs.weight for llama3
    scaling). extra_metadata is written last (e.g. general.file_type from a quantization mix).

    vqgan=(VQ config, VQGAN state dict): Chameleon's image tokenizer, written as the companion file and committed
    with the model as a pair (formats.gguf.write_gguf_file). Returns the path."""
    metadata: dict[str, Any] = {}
    if tokenizer is not None:
        if isinstance(tokenizer, Mapping):
            metadata.update({k: v for k, v in tokenizer.items() if k.startswith("tokenizer.")})
        else:
            metadata.update(tokenizer_to_gguf(tokenizer, config.vocab_size))
    metadata.update(config_to_gguf_metadata(config))  # config's special ids win over the tokenizer's
    if chat_template:
        metadata[gguf.Keys.Tokenizer.CHAT_TEMPLATE] = chat_template
    tensors = dict(tensors)
    for name, t in gguf_extra_tensors(config).items():  # e.g. rope_freqs.weight for llama3 RoPE scaling
        tensors.setdefault(name, (t, "F32"))
    metadata.update(extra_metadata or {})
    return write_gguf_file(path, arch_record(config.arch).gguf_arch, metadata, tensors, progress=progress,
                           vqgan=vqgan)
