"""Falcon (rotary): LayerNorm with bias, GELU MLP, parallel attention + MLP, multi-query or grouped KV heads,
and q/k/v fused into one query_key_value tensor whose layout depends on the Falcon generation."""

from __future__ import annotations

import gguf
import torch

from ..config import ModelConfig
from ..errors import FuselmError
from .record import Arch, FusedQKV
from .values import read_bool, read_float, read_int


def _from_hf(cfg, source, common) -> ModelConfig:
    if read_bool(cfg, "alibi", source):
        raise FuselmError(f"{source}: Falcon with alibi=True is not supported (only rotary Falcon models are)")
    alias = {**cfg}
    for ours, old in (("hidden_size", "n_embed"), ("num_attention_heads", "n_head"), ("num_hidden_layers", "n_layer")):
        if alias.get(ours) is None and alias.get(old) is not None:
            alias[ours] = alias[old]
    hidden = read_int(alias, "hidden_size", source, limit="width")
    heads = read_int(alias, "num_attention_heads", source, limit="heads")
    new_arch = read_bool(cfg, "new_decoder_architecture", source)
    if new_arch:
        kv_key = "num_kv_heads" if cfg.get("num_kv_heads") is not None else "n_head_kv"
        kv_heads = read_int(cfg, kv_key, source, heads, limit="heads")
    elif read_bool(cfg, "multi_query", source, True):
        kv_heads = 1
    else:
        kv_heads = heads
    parallel = read_bool(cfg, "parallel_attn", source, True)
    num_ln = read_int(cfg, "num_ln_in_parallel_attn", source, 2 if new_arch else None)
    if new_arch and not parallel:
        raise FuselmError(f"{source}: Falcon new_decoder_architecture with parallel_attn=false is not supported")
    act = cfg.get("activation", "gelu")
    if act != "gelu":
        raise FuselmError(f"{source}: key 'activation' is {act!r}; expected 'gelu' for Falcon")
    bias = read_bool(cfg, "bias", source)
    return ModelConfig(
        arch="falcon",
        vocab_size=read_int(cfg, "vocab_size", source, limit="vocab"),
        hidden_size=hidden,
        intermediate_size=read_int(cfg, "ffn_hidden_size", source, 4 * hidden, limit="width"),
        num_hidden_layers=read_int(alias, "num_hidden_layers", source, limit="layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads or 1,
        max_position_embeddings=read_int(cfg, "max_position_embeddings", source, 2048, limit="context"),
        norm_kind="layer",
        norm_eps=read_float(cfg, "layer_norm_epsilon", source, 1e-5),
        norm_bias=True,
        mlp_kind="gelu",
        block_kind="parallel" if parallel else "pre_norm",
        parallel_norms=2 if (parallel and new_arch and num_ln == 2) else 1,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=read_bool(cfg, "tie_word_embeddings", source, True),
        extra={"new_decoder_architecture": new_arch, "multi_query": not new_arch and kv_heads == 1},
        **common,
    )


def _hf_keys(config: ModelConfig) -> dict:
    new_arch = bool(config.extra.get("new_decoder_architecture", config.parallel_norms == 2))
    return dict(
        new_decoder_architecture=new_arch,
        multi_query=config.num_key_value_heads == 1 and not new_arch,
        num_kv_heads=config.num_key_value_heads,
        parallel_attn=config.block_kind == "parallel",
        num_ln_in_parallel_attn=config.parallel_norms if new_arch else None,
        bias=config.qkv_bias,
        alibi=False,
        layer_norm_epsilon=config.norm_eps,
        ffn_hidden_size=config.intermediate_size,
        activation="gelu",
    )


def _hf_modules(config: ModelConfig) -> dict[str, str]:
    if config.block_kind == "parallel" and config.parallel_norms == 2:
        norms = {"layers.{i}.attn_norm": "transformer.h.{i}.ln_attn", "layers.{i}.mlp_norm": "transformer.h.{i}.ln_mlp"}
    else:
        norms = {"layers.{i}.attn_norm": "transformer.h.{i}.input_layernorm",
                 "layers.{i}.mlp_norm": "transformer.h.{i}.post_attention_layernorm"}
    return {
        "embed": "transformer.word_embeddings",
        "norm": "transformer.ln_f",
        "lm_head": "lm_head",
        **norms,
        "layers.{i}.attn.qkv": "transformer.h.{i}.self_attention.query_key_value",
        "layers.{i}.attn.o": "transformer.h.{i}.self_attention.dense",
        "layers.{i}.mlp.up": "transformer.h.{i}.mlp.dense_h_to_4h",
        "layers.{i}.mlp.down": "transformer.h.{i}.mlp.dense_4h_to_h",
    }


def _split_qkv(config: ModelConfig, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split Falcon's fused query_key_value rows exactly as HF's _split_heads does for each layout."""
    c, d = config, config.head_dim
    rest = fused.shape[1:]
    if c.extra.get("new_decoder_architecture", False):
        per_group = c.num_attention_heads // c.num_key_value_heads
        grouped = fused.reshape(c.num_key_value_heads, per_group + 2, d, *rest)
        q = grouped[:, :per_group].reshape(c.q_dim, *rest)
        return q, grouped[:, -2].reshape(c.kv_dim, *rest), grouped[:, -1].reshape(c.kv_dim, *rest)
    if c.num_key_value_heads == 1:  # multi_query: [q heads..., k, v]
        return fused[: c.q_dim], fused[c.q_dim: c.q_dim + d], fused[c.q_dim + d:]
    per_head = fused.reshape(c.num_attention_heads, 3, d, *rest)  # falcon-rw: per-head [q, k, v]
    return (per_head[:, 0].reshape(c.q_dim, *rest), per_head[:, 1].reshape(c.kv_dim, *rest),
            per_head[:, 2].reshape(c.kv_dim, *rest))


def _fuse_qkv(config: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of _split_qkv."""
    c, d = config, config.head_dim
    rest = q.shape[1:]
    if c.extra.get("new_decoder_architecture", False):
        per_group = c.num_attention_heads // c.num_key_value_heads
        qg = q.reshape(c.num_key_value_heads, per_group, d, *rest)
        kg = k.reshape(c.num_key_value_heads, 1, d, *rest)
        vg = v.reshape(c.num_key_value_heads, 1, d, *rest)
        return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)
    if c.num_key_value_heads == 1:
        return torch.cat([q, k, v], dim=0)
    parts = [t.reshape(c.num_attention_heads, 1, d, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


# llama.cpp's Falcon: attn_norm feeds the MLP (and attention when there is one norm); attn_norm_2 is
# Falcon-40B's ln_attn. q/k/v are one fused attn_qkv tensor laid out as cat(q, k, v).
def _gguf_modules(config: ModelConfig) -> dict[str, str]:
    if config.block_kind != "parallel":
        raise FuselmError("llama.cpp's falcon architecture has no sequential (parallel_attn=false) layout")
    table = {
        "embed": "token_embd",
        "norm": "output_norm",
        "lm_head": "output",
        "layers.{i}.attn.qkv": "blk.{i}.attn_qkv",
        "layers.{i}.attn.o": "blk.{i}.attn_output",
        "layers.{i}.mlp.up": "blk.{i}.ffn_up",
        "layers.{i}.mlp.down": "blk.{i}.ffn_down",
    }
    if config.parallel_norms == 2:
        table["layers.{i}.attn_norm"] = "blk.{i}.attn_norm_2"
        table["layers.{i}.mlp_norm"] = "blk.{i}.attn_norm"
    else:
        table["layers.{i}.attn_norm"] = "blk.{i}.attn_norm"
    return table


def _gguf_fields(get, names: set[str], common: dict) -> dict:
    two_norms = "blk.0.attn_norm_2.weight" in names
    kv_heads = common["num_key_value_heads"]
    new_arch = two_norms or kv_heads > 1  # HF's fused-qkv layout; only matters when writing HF files
    return dict(norm_kind="layer", norm_eps=get(gguf.Keys.Attention.LAYERNORM_EPS, kind="float"), norm_bias=True,
                mlp_kind="gelu", block_kind="parallel", parallel_norms=2 if two_norms else 1,
                extra={"new_decoder_architecture": new_arch, "multi_query": not new_arch and kv_heads == 1})


def _gguf_keys(config: ModelConfig) -> dict:
    return {gguf.Keys.Attention.LAYERNORM_EPS: float(config.norm_eps),
            gguf.Keys.LLM.TENSOR_DATA_LAYOUT: "jploski"}  # q, k, v concatenated (as the converter writes them)


def _problems(c: ModelConfig) -> list[str]:
    problems = []
    if c.norm_kind != "layer" or c.mlp_kind != "gelu" or not c.norm_bias:
        problems.append("falcon needs LayerNorm with bias and a GELU MLP")
    if c.block_kind != "parallel":
        problems.append("llama.cpp's falcon architecture has only the parallel (parallel_attn=true) block")
    if c.qk_norm:
        problems.append("llama.cpp's falcon has no qk-norm")
    if c.qkv_bias or c.o_bias or c.mlp_bias:
        problems.append("llama.cpp's falcon has no linear biases")
    return problems


FALCON = Arch(
    name="falcon",
    hf_model_types=("falcon", "RefinedWeb", "RefinedWebModel"),
    hf_architecture="FalconForCausalLM",
    config_from_hf=_from_hf,
    hf_keys=_hf_keys,
    hf_modules=_hf_modules,
    gguf_arch="falcon",
    gguf_modules=_gguf_modules,
    gguf_fields=_gguf_fields,
    gguf_keys=_gguf_keys,
    gguf_problems=_problems,
    gguf_permutes_qk=False,
    hf_fused_qkv=FusedQKV(split=_split_qkv, fuse=_fuse_qkv),
    gguf_fused_qkv=True,
    gguf_bias_tensors=("blk.0.attn_qkv.bias", "blk.0.attn_output.bias", "blk.0.ffn_up.bias"),
    chat_template="alfred",
)
