"""llama.cpp's GGUF tensor names and layouts, through the Arch records."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..config import ModelConfig
from .names import fuse_qkv, map_qk_rows, rename_tensors, translate_name
from .registry import arch_record


def gguf_module_names(config: ModelConfig) -> dict[str, str]:
    """Internal module template -> GGUF module template for this config."""
    return arch_record(config.arch).gguf_modules(config)


def permute_for_interleaved_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Meta/llama.cpp interleaved rows (per head), for q/k weights, biases, norms."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest).transpose(1, 2).reshape(w.shape)


def unpermute_from_interleaved_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_for_interleaved_rope."""
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def internal_to_gguf(config: ModelConfig, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Internal state dict -> GGUF tensor names and layouts as llama.cpp expects them."""
    record = arch_record(config.arch)
    sd = dict(state_dict)
    if record.gguf_fused_qkv:
        fuse_qkv(config, sd, lambda q, k, v: torch.cat([q, k, v], dim=0))
    if record.gguf_permutes_qk:
        map_qk_rows(config, sd, permute_for_interleaved_rope)
    return rename_tensors(sd, gguf_module_names(config), "state dict", None)


def gguf_to_internal(config: ModelConfig, tensors: Mapping[str, torch.Tensor],
                     source: str = "gguf") -> dict[str, torch.Tensor]:
    """GGUF tensors (dequantized or not) -> internal names and HF layouts."""
    record = arch_record(config.arch)
    table = {g: ours for ours, g in gguf_module_names(config).items()}
    out = rename_tensors(tensors, table, source, re.compile(r"^rope_freqs\.weight$"))
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    if record.gguf_fused_qkv:
        for name in [n for n in out if ".attn.qkv." in n]:
            fused = out.pop(name)
            prefix, kind = name.rsplit(".attn.qkv.", 1)
            q, k, v = fused.split([config.q_dim, config.kv_dim, config.kv_dim], dim=0)
            for part, tensor in zip("qkv", (q, k, v)):
                out[f"{prefix}.attn.{part}.{kind}"] = tensor
    if record.gguf_permutes_qk:
        map_qk_rows(config, out, unpermute_from_interleaved_rope)
    return out


def gguf_tensor_name(config: ModelConfig, name: str) -> str:
    """The GGUF name holding an internal tensor (Falcon's q/k/v live in the fused attn_qkv)."""
    return translate_name(gguf_module_names(config), name, fused_qkv=arch_record(config.arch).gguf_fused_qkv)
