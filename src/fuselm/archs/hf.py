"""HF transformers checkpoints: config.json parsing and tensor-name tables."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..config import ModelConfig
from ..errors import FuselmError
from .tensors import _rename, fuse_qkv, translate_name

SUPPORTED_ARCHS = ("llama", "chameleon", "falcon")
# HF model_type values (and old remote-code names) that map onto our archs.
HF_MODEL_TYPES = {
    "llama": "llama",
    "chameleon": "chameleon",
    "falcon": "falcon",
    "RefinedWeb": "falcon",
    "RefinedWebModel": "falcon",
}


# ---------------------------------------------------------------- config.json parsing

def _require(cfg: Mapping, key: str, source: str):
    if key not in cfg or cfg[key] is None:
        raise FuselmError(f"{source}: missing required config key {key!r}")
    return cfg[key]


def _rope_from_hf(cfg: Mapping) -> tuple[float, dict | None]:
    """HF keeps rope either as legacy rope_theta/rope_scaling or as rope_parameters (transformers >= 5)."""
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or None
    if scaling is None and params:
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = None if kind == "default" else params
    return theta, (dict(scaling) if scaling else None)


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _flashnorm_flag(cfg: Mapping) -> bool:
    # No standard key exists; these three are in use.
    return any(bool(cfg.get(k, False)) for k in ("flashnorm", "flashnorm_folded", "flash_norm"))


def config_from_hf(cfg: Mapping, source: str = "config.json") -> ModelConfig:
    """Parse an HF config.json dict. Raises FuselmError naming the missing or bad key."""
    model_type = cfg.get("model_type")
    if model_type is None:
        raise FuselmError(f"{source}: missing required config key 'model_type'")
    arch = HF_MODEL_TYPES.get(model_type)
    if arch is None:
        raise FuselmError(
            f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(sorted(HF_MODEL_TYPES))}")
    theta, scaling = _rope_from_hf(cfg)
    common = dict(
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        pad_token_id=cfg.get("pad_token_id"),
        rope_theta=theta,
        rope_scaling=scaling,
        flashnorm=_flashnorm_flag(cfg),
    )
    if arch in ("llama", "chameleon"):
        hidden = int(_require(cfg, "hidden_size", source))
        heads = int(_require(cfg, "num_attention_heads", source))
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise FuselmError(f"{source}: hidden_act {act!r} is not supported for {arch}; expected 'silu'")
        return ModelConfig(
            arch=arch,
            vocab_size=int(_require(cfg, "vocab_size", source)),
            hidden_size=hidden,
            intermediate_size=int(_require(cfg, "intermediate_size", source)),
            num_hidden_layers=int(_require(cfg, "num_hidden_layers", source)),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096 if arch == "chameleon" else 2048)),
            norm_kind="rms",
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if arch == "llama" else 1e-5)),
            mlp_kind="swiglu",
            block_kind="swin_norm" if cfg.get("swin_norm") else "pre_norm",
            qk_norm=arch == "chameleon",
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            extra={"vocabulary_map": cfg.get("vocabulary_map"), "vq_config": cfg.get("vq_config")}
            if arch == "chameleon" else {},
            **common,
        )
    # falcon
    if cfg.get("alibi"):
        raise FuselmError(f"{source}: Falcon with alibi=True is not supported (only rotary Falcon models are)")
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embed") or _require(cfg, "hidden_size", source))
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or _require(cfg, "num_attention_heads", source))
    new_arch = bool(cfg.get("new_decoder_architecture", False))
    if new_arch:
        kv_heads = int(cfg.get("num_kv_heads") or cfg.get("n_head_kv") or heads)
    elif cfg.get("multi_query", True):
        kv_heads = 1
    else:
        kv_heads = heads
    parallel = bool(cfg.get("parallel_attn", True))
    num_ln = cfg.get("num_ln_in_parallel_attn")
    if new_arch and num_ln is None:
        num_ln = 2
    if new_arch and not parallel:
        raise FuselmError(f"{source}: Falcon new_decoder_architecture with parallel_attn=false is not supported")
    act = cfg.get("activation", "gelu")
    if act != "gelu":
        raise FuselmError(f"{source}: Falcon activation {act!r} is not supported; expected 'gelu'")
    bias = bool(cfg.get("bias", False))
    return ModelConfig(
        arch="falcon",
        vocab_size=int(_require(cfg, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(cfg.get("ffn_hidden_size") or 4 * hidden),
        num_hidden_layers=int(cfg.get("num_hidden_layers") or cfg.get("n_layer")
                              or _require(cfg, "num_hidden_layers", source)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        norm_kind="layer",
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        norm_bias=True,
        mlp_kind="gelu",
        block_kind="parallel" if parallel else "pre_norm",
        parallel_norms=2 if (parallel and new_arch and num_ln == 2) else 1,
        attention_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        extra={"new_decoder_architecture": new_arch, "multi_query": not new_arch and kv_heads == 1},
        **common,
    )


def config_to_hf(config: ModelConfig) -> dict:
    """The HF config.json dict that config_from_hf reads back to the same ModelConfig."""
    rope = {"rope_theta": config.rope_theta, **(config.rope_scaling or {"rope_type": "default"})}
    eos = list(config.eos_token_ids)
    out: dict = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_parameters": rope,
        "torch_dtype": "float32",
    }
    if config.flashnorm:
        out["flashnorm"] = True
    if config.arch in ("llama", "chameleon"):
        out.update(
            model_type=config.arch,
            architectures=["LlamaForCausalLM" if config.arch == "llama" else "ChameleonForConditionalGeneration"],
            intermediate_size=config.intermediate_size,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            rms_norm_eps=config.norm_eps,
            hidden_act="silu",
            attention_bias=config.attention_bias,
            mlp_bias=config.mlp_bias,
        )
        if config.arch == "chameleon":
            out["swin_norm"] = config.block_kind == "swin_norm"
            for key in ("vocabulary_map", "vq_config"):
                if config.extra.get(key) is not None:
                    out[key] = config.extra[key]
        return out
    new_arch = bool(config.extra.get("new_decoder_architecture", config.parallel_norms == 2))
    out.update(
        model_type="falcon",
        architectures=["FalconForCausalLM"],
        new_decoder_architecture=new_arch,
        multi_query=config.num_key_value_heads == 1 and not new_arch,
        num_kv_heads=config.num_key_value_heads,
        parallel_attn=config.block_kind == "parallel",
        num_ln_in_parallel_attn=config.parallel_norms if new_arch else None,
        bias=config.attention_bias,
        alibi=False,
        layer_norm_epsilon=config.norm_eps,
        ffn_hidden_size=config.intermediate_size,
        activation="gelu",
    )
    return out


# ---------------------------------------------------------------- HF name tables

_LLAMA_HF_MODULES = {
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


def _falcon_hf_modules(config: ModelConfig) -> dict[str, str]:
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


def hf_module_names(config: ModelConfig) -> dict[str, str]:
    """Internal module template -> HF module template ({i} is the layer index)."""
    return _falcon_hf_modules(config) if config.arch == "falcon" else dict(_LLAMA_HF_MODULES)


# Tensors in HF checkpoints that carry no weights we need.
_HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq$|^model\.vqmodel\..*")


def _falcon_split_qkv(config: ModelConfig, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _falcon_fuse_qkv(config: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of _falcon_split_qkv."""
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


def hf_to_internal(config: ModelConfig, state_dict: Mapping[str, torch.Tensor],
                   source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """HF state dict -> internal names (pure; tensors are views, never copies)."""
    table = {hf: ours for ours, hf in hf_module_names(config).items()}
    out = _rename(state_dict, table, source, _HF_IGNORED)
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)  # a tied copy may be stored; embed is the source of truth
    if config.arch == "falcon":
        for name in [n for n in out if ".attn.qkv." in n]:
            fused = out.pop(name)
            prefix, kind = name.rsplit(".attn.qkv.", 1)
            try:
                parts = _falcon_split_qkv(config, fused)
            except RuntimeError as err:
                raise FuselmError(
                    f"{source}: tensor {name!r} has shape {tuple(fused.shape)}, which does not split into "
                    f"{config.num_attention_heads} query and {config.num_key_value_heads} key/value heads "
                    f"of size {config.head_dim}") from err
            for part, tensor in zip("qkv", parts):
                out[f"{prefix}.attn.{part}.{kind}"] = tensor
    return out


def internal_to_hf(config: ModelConfig, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Internal names -> HF state dict (for writing HF directories)."""
    sd = dict(state_dict)
    if config.arch == "falcon":
        fuse_qkv(config, sd, lambda q, k, v: _falcon_fuse_qkv(config, q, k, v))
    out = _rename(sd, hf_module_names(config), "state dict", None)
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out




def hf_tensor_name(config: ModelConfig, name: str) -> str:
    """The name an internal tensor has in an HF checkpoint (for error messages)."""
    return translate_name(hf_module_names(config), name, fused_qkv=config.arch == "falcon")
