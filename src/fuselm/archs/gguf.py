"""llama.cpp GGUF tensor names and layouts for our architectures."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..config import ModelConfig
from ..errors import FuselmError
from .tensors import _rename

# ---------------------------------------------------------------- GGUF name tables (llama.cpp's names)

GGUF_MODULES = {
    "embed": "token_embd",
    "norm": "output_norm",
    "lm_head": "output",
    "layers.{i}.attn_norm": "blk.{i}.attn_norm",
    "layers.{i}.mlp_norm": "blk.{i}.ffn_norm",
    "layers.{i}.attn.q": "blk.{i}.attn_q",
    "layers.{i}.attn.k": "blk.{i}.attn_k",
    "layers.{i}.attn.v": "blk.{i}.attn_v",
    "layers.{i}.attn.o": "blk.{i}.attn_output",
    "layers.{i}.attn.q_norm": "blk.{i}.attn_q_norm",
    "layers.{i}.attn.k_norm": "blk.{i}.attn_k_norm",
    "layers.{i}.mlp.gate": "blk.{i}.ffn_gate",
    "layers.{i}.mlp.up": "blk.{i}.ffn_up",
    "layers.{i}.mlp.down": "blk.{i}.ffn_down",
}
# llama.cpp's Falcon: attn_norm feeds the MLP (and attention when there is one norm); attn_norm_2 is
# Falcon-40B's ln_attn. q/k/v are one fused attn_qkv tensor laid out as cat(q, k, v).
GGUF_FALCON_MODULES = {
    "embed": "token_embd",
    "norm": "output_norm",
    "lm_head": "output",
    "layers.{i}.attn.qkv": "blk.{i}.attn_qkv",
    "layers.{i}.attn.o": "blk.{i}.attn_output",
    "layers.{i}.mlp.up": "blk.{i}.ffn_up",
    "layers.{i}.mlp.down": "blk.{i}.ffn_down",
}
# llama.cpp rotates q/k in the interleaved (Meta) layout for these archs, so HF's rotate-half rows are permuted.
GGUF_PERMUTES_QK = {"llama": True, "chameleon": True, "falcon": False}


def gguf_module_names(config: ModelConfig) -> dict[str, str]:
    """Internal module template -> GGUF module template for this config."""
    if config.arch != "falcon":
        return dict(GGUF_MODULES)
    table = dict(GGUF_FALCON_MODULES)
    if config.block_kind != "parallel":
        raise FuselmError("llama.cpp's falcon architecture has no sequential (parallel_attn=false) layout")
    if config.parallel_norms == 2:
        table["layers.{i}.attn_norm"] = "blk.{i}.attn_norm_2"
        table["layers.{i}.mlp_norm"] = "blk.{i}.attn_norm"
    else:
        table["layers.{i}.attn_norm"] = "blk.{i}.attn_norm"
    return table


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
    sd = dict(state_dict)
    if config.arch == "falcon":
        for i in range(config.num_hidden_layers):
            for kind in ("weight", "bias"):
                names = [f"layers.{i}.attn.{p}.{kind}" for p in "qkv"]
                if all(n in sd for n in names):
                    sd[f"layers.{i}.attn.qkv.{kind}"] = torch.cat([sd.pop(n) for n in names], dim=0)
    if GGUF_PERMUTES_QK[config.arch]:
        for name in list(sd):
            m = re.fullmatch(r"layers\.\d+\.attn\.(q|k)(_norm)?\.(weight|bias)", name)
            if not m:
                continue
            t = sd[name]
            if m.group(2):  # qk-norm rows are per head or group: permute within head_dim
                sd[name] = permute_for_interleaved_rope(t.reshape(-1), t.shape[0]).reshape(t.shape)
            else:
                heads = config.num_attention_heads if m.group(1) == "q" else config.num_key_value_heads
                sd[name] = permute_for_interleaved_rope(t, heads)
    return _rename(sd, gguf_module_names(config), "state dict", None)


def gguf_to_internal(config: ModelConfig, tensors: Mapping[str, torch.Tensor],
                     source: str = "gguf") -> dict[str, torch.Tensor]:
    """GGUF tensors (dequantized or not) -> internal names and HF layouts."""
    table = {g: ours for ours, g in gguf_module_names(config).items()}
    out = _rename(tensors, table, source, re.compile(r"^rope_freqs\.weight$"))
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    if config.arch == "falcon":
        for name in [n for n in out if ".attn.qkv." in n]:
            fused = out.pop(name)
            prefix, kind = name.rsplit(".attn.qkv.", 1)
            q, k, v = fused.split([config.q_dim, config.kv_dim, config.kv_dim], dim=0)
            for part, tensor in zip("qkv", (q, k, v)):
                out[f"{prefix}.attn.{part}.{kind}"] = tensor
    if GGUF_PERMUTES_QK[config.arch]:
        for name in list(out):
            m = re.fullmatch(r"layers\.\d+\.attn\.(q|k)(_norm)?\.(weight|bias)", name)
            if not m:
                continue
            t = out[name]
            if m.group(2):
                out[name] = unpermute_from_interleaved_rope(t.reshape(-1), t.shape[0]).reshape(t.shape)
            else:
                heads = config.num_attention_heads if m.group(1) == "q" else config.num_key_value_heads
                out[name] = unpermute_from_interleaved_rope(t, heads)
    return out
