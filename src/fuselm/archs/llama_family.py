"""What the Llama-style families (llama, chameleon, mistral, qwen2) share: names, config parsing, GGUF keys.

Each family's file builds its Arch from these pieces and says only what differs.
"""

from __future__ import annotations

from collections.abc import Mapping

import gguf

from ..config import ModelConfig
from ..errors import FuselmError
from .values import read_bool, read_float, read_int

HF_MODULES = {
    "embed": "model.embed_tokens",
    "norm": "model.norm",
    "lm_head": "lm_head",
    "layers.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "layers.{i}.mlp_norm": "model.layers.{i}.post_attention_layernorm",
    "layers.{i}.attn.q": "model.layers.{i}.self_attn.q_proj",
    "layers.{i}.attn.k": "model.layers.{i}.self_attn.k_proj",
    "layers.{i}.attn.v": "model.layers.{i}.self_attn.v_proj",
    "layers.{i}.attn.o": "model.layers.{i}.self_attn.o_proj",
    "layers.{i}.attn.q_norm": "model.layers.{i}.self_attn.q_norm",
    "layers.{i}.attn.k_norm": "model.layers.{i}.self_attn.k_norm",
    "layers.{i}.mlp.gate": "model.layers.{i}.mlp.gate_proj",
    "layers.{i}.mlp.up": "model.layers.{i}.mlp.up_proj",
    "layers.{i}.mlp.down": "model.layers.{i}.mlp.down_proj",
}

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


def hf_modules(config: ModelConfig) -> dict[str, str]:
    return dict(HF_MODULES)


def gguf_modules(config: ModelConfig) -> dict[str, str]:
    return dict(GGUF_MODULES)


def config_from_hf(cfg: Mapping, source: str, common: dict, *, arch: str, default_context: int,
                   default_eps: float, qkv_bias: bool | None = None, o_bias: bool | None = None,
                   **fields) -> ModelConfig:
    """A Llama-style config.json (SwiGLU, RMSNorm). qkv_bias / o_bias None: read HF's `attention_bias`."""
    hidden = read_int(cfg, "hidden_size", source, limit="width")
    heads = read_int(cfg, "num_attention_heads", source, limit="heads")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise FuselmError(f"{source}: key 'hidden_act' is {act!r}; expected 'silu' for {arch}")
    attention_bias = read_bool(cfg, "attention_bias", source)
    return ModelConfig(
        arch=arch,
        vocab_size=read_int(cfg, "vocab_size", source, limit="vocab"),
        hidden_size=hidden,
        intermediate_size=read_int(cfg, "intermediate_size", source, limit="width"),
        num_hidden_layers=read_int(cfg, "num_hidden_layers", source, limit="layers"),
        num_attention_heads=heads,
        num_key_value_heads=read_int(cfg, "num_key_value_heads", source, heads, limit="heads"),
        head_dim=read_int(cfg, "head_dim", source, hidden // heads or 1, limit="width"),
        max_position_embeddings=read_int(cfg, "max_position_embeddings", source, default_context, limit="context"),
        norm_kind="rms",
        norm_eps=read_float(cfg, "rms_norm_eps", source, default_eps),
        mlp_kind="swiglu",
        qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
        o_bias=attention_bias if o_bias is None else o_bias,
        mlp_bias=read_bool(cfg, "mlp_bias", source),
        tie_word_embeddings=read_bool(cfg, "tie_word_embeddings", source),
        **common,
        **fields,
    )


def hf_keys(config: ModelConfig) -> dict:
    """config.json keys of a Llama-style family (HF's single attention_bias covers q, k, v and o)."""
    return dict(
        intermediate_size=config.intermediate_size,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps,
        hidden_act="silu",
        attention_bias=config.qkv_bias,
        mlp_bias=config.mlp_bias,
    )


def gguf_fields(get, names: set[str], common: dict) -> dict:
    return dict(norm_kind="rms", norm_eps=get(gguf.Keys.Attention.LAYERNORM_RMS_EPS, kind="float"),
                mlp_kind="swiglu")


def gguf_keys(config: ModelConfig) -> dict:
    return {gguf.Keys.Attention.LAYERNORM_RMS_EPS: float(config.norm_eps)}


def gguf_problems(config: ModelConfig, *, qk_norm: bool = False, swin_norm: bool = False,
                  biases: tuple[bool, bool, bool] = (True, True, True)) -> list[str]:
    """What llama.cpp's Llama-style graphs cannot run. `biases`: whether the graph takes q/k/v, o, MLP biases."""
    c, problems = config, []
    if c.norm_kind != "rms" or c.mlp_kind != "swiglu" or c.norm_bias:
        problems.append(f"{c.arch} needs RMSNorm without bias and a SwiGLU MLP")
    if c.block_kind == "parallel" or (c.block_kind == "swin_norm" and not swin_norm):
        problems.append(f"llama.cpp's graph for {c.arch} has no {c.block_kind} block")
    if c.qk_norm != qk_norm:
        problems.append(f"llama.cpp's graph for {c.arch} {'needs' if qk_norm else 'has no'} qk-norm")
    for present, allowed, what in zip((c.qkv_bias, c.o_bias, c.mlp_bias), biases, ("q/k/v", "output", "MLP")):
        if present and not allowed:
            problems.append(f"llama.cpp's graph for {c.arch} has no {what} biases")
    return problems


def read_qk_norm_eps(get) -> float:
    return get(QK_NORM_EPS_KEY, 1e-5, kind="float", arch_key=False)


QK_NORM_EPS_KEY = "fuselm.qk_norm_epsilon"  # when it is not llama.cpp's hard-coded 1e-5
