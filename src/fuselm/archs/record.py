"""Arch: one record per architecture family, holding everything that differs between families.

Code elsewhere switches on these fields, never on the family's name. Adding an architecture is one new file in
archs/ that builds an Arch, plus its line in archs/registry.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ModelConfig

ModuleTable = Callable[[ModelConfig], dict[str, str]]
GGUFGetter = Callable[..., Any]  # get(key_template, default=MISSING, kind="int"|"float"|"bool") -> value


@dataclass(frozen=True)
class FusedQKV:
    """How a checkpoint stores q, k and v as one tensor (Falcon's query_key_value)."""

    split: Callable[[ModelConfig, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    fuse: Callable[[ModelConfig, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Arch:
    name: str  # ModelConfig.arch
    hf_model_types: tuple[str, ...]  # config.json model_type values read as this family (first: the one written)
    hf_architecture: str  # config.json "architectures" entry written
    # (config.json dict, source, common fields: rope, special tokens, flashnorm) -> ModelConfig
    config_from_hf: Callable[[Mapping, str, dict], ModelConfig]
    hf_keys: Callable[[ModelConfig], dict]  # the family's own config.json keys (the common ones are added)
    hf_modules: ModuleTable  # internal module template -> HF module template
    gguf_arch: str  # llama.cpp's general.architecture
    gguf_modules: ModuleTable  # internal module template -> llama.cpp tensor name template
    # (get, tensor names, common fields) -> the family's own ModelConfig fields from its GGUF keys and tensors
    gguf_fields: Callable[[GGUFGetter, set[str], dict], dict]
    gguf_keys: Callable[[ModelConfig], dict]  # the family's GGUF metadata (the common keys are added)
    gguf_problems: Callable[[ModelConfig], list[str]]  # what llama.cpp's graph for gguf_arch cannot run
    # llama.cpp rotates q/k in Meta's interleaved layout for this family: the converter permutes their rows.
    gguf_permutes_qk: bool = True
    hf_fused_qkv: FusedQKV | None = None
    gguf_fused_qkv: bool = False  # GGUF attn_qkv = cat(q, k, v)
    # GGUF tensors whose presence means q/k/v, o and MLP biases (llama.cpp decides biases from tensors too).
    gguf_bias_tensors: tuple[str, str, str] = ("blk.0.attn_q.bias", "blk.0.attn_output.bias", "blk.0.ffn_up.bias")
    # llama.cpp reads Llama-3.1 RoPE scaling from a `rope_freqs.weight` tensor only in its llama graph.
    gguf_rope_freqs: bool = False
    chat_template: str | None = None  # built-in template (generation.chat.BUILTIN) when the model ships none
    image_tokenizer: bool = False  # the family carries a VQGAN (HF: model.vqmodel.*; GGUF: -vqgan companion)
    hf_ignored: tuple[str, ...] = field(default=(r".*rotary_emb\.inv_freq$",))  # HF tensors with no weights we need

    def __str__(self) -> str:
        return self.name
