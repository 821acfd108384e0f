"""HF transformers checkpoints: config.json to and from ModelConfig, and tensor names, through the Arch records."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..config import ModelConfig
from ..errors import FuselmError
from .names import fuse_qkv, rename_tensors, translate_name
from .registry import HF_MODEL_TYPES, arch_record
from .values import read_bool, read_float, read_int, read_token_ids

FLASHNORM_KEYS = ("flashnorm", "flashnorm_folded", "flash_norm")  # no standard key exists; these three are in use


def _rope_from_hf(cfg: Mapping, source: str) -> tuple[float, dict | None]:
    """HF keeps rope either as legacy rope_theta/rope_scaling or as rope_parameters (transformers >= 5)."""
    params = cfg.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise FuselmError(f"{source}: key 'rope_parameters' must be an object, got {type(params).__name__}")
    params = dict(params)
    theta = read_float(params, "rope_theta", source, None)
    if theta is None:
        theta = read_float(cfg, "rope_theta", source, 10000.0)
    params.pop("rope_theta", None)
    scaling = cfg.get("rope_scaling") or None
    if scaling is not None and not isinstance(scaling, Mapping):
        raise FuselmError(f"{source}: key 'rope_scaling' must be an object, got {type(scaling).__name__}")
    if scaling is None and params:
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = None if kind == "default" else params
    return theta, (dict(scaling) if scaling else None)


def _common_fields(cfg: Mapping, source: str) -> dict:
    theta, scaling = _rope_from_hf(cfg, source)
    return dict(
        bos_token_id=read_int(cfg, "bos_token_id", source, None, minimum=0, limit="vocab"),
        eos_token_ids=read_token_ids(cfg, "eos_token_id", source),
        pad_token_id=read_int(cfg, "pad_token_id", source, None, minimum=0, limit="vocab"),
        rope_theta=theta,
        rope_scaling=scaling,
        flashnorm=any(read_bool(cfg, k, source) for k in FLASHNORM_KEYS),
    )


def config_from_hf(cfg: Mapping, source: str = "config.json") -> ModelConfig:
    """Parse an HF config.json dict. Raises FuselmError naming the missing or bad key."""
    if not isinstance(cfg, Mapping):
        raise FuselmError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type is None:
        raise FuselmError(f"{source}: missing required config key 'model_type'")
    name = HF_MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if name is None:
        raise FuselmError(
            f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(sorted(HF_MODEL_TYPES))}")
    try:
        return arch_record(name).config_from_hf(cfg, source, _common_fields(cfg, source))
    except FuselmError as err:
        message = str(err)
        raise FuselmError(message if message.startswith(source) else f"{source}: {message}") from None


def config_to_hf(config: ModelConfig) -> dict:
    """The HF config.json dict that config_from_hf reads back to the same ModelConfig."""
    record = arch_record(config.arch)
    rope = {"rope_theta": config.rope_theta, **(config.rope_scaling or {"rope_type": "default"})}
    eos = list(config.eos_token_ids)
    out: dict = {
        "model_type": record.hf_model_types[0],
        "architectures": [record.hf_architecture],
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
        **record.hf_keys(config),
    }
    if config.flashnorm:
        out["flashnorm"] = True
    return out


def hf_module_names(config: ModelConfig) -> dict[str, str]:
    """Internal module template -> HF module template ({i} is the layer index)."""
    return arch_record(config.arch).hf_modules(config)


def hf_to_internal(config: ModelConfig, state_dict: Mapping[str, torch.Tensor],
                   source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """HF state dict -> internal names (pure; tensors are views, never copies)."""
    record = arch_record(config.arch)
    table = {hf: ours for ours, hf in hf_module_names(config).items()}
    ignored = re.compile("|".join(f"(?:{p})" for p in record.hf_ignored))
    out = rename_tensors(state_dict, table, source, ignored)
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)  # a tied copy may be stored; embed is the source of truth
    if record.hf_fused_qkv is not None:
        for name in [n for n in out if ".attn.qkv." in n]:
            fused = out.pop(name)
            prefix, kind = name.rsplit(".attn.qkv.", 1)
            try:
                parts = record.hf_fused_qkv.split(config, fused)
            except RuntimeError as err:
                raise FuselmError(
                    f"{source}: tensor {hf_tensor_name(config, name)!r} has shape {tuple(fused.shape)}, which does "
                    f"not split into {config.num_attention_heads} query and {config.num_key_value_heads} key/value "
                    f"heads of size {config.head_dim}") from err
            for part, tensor in zip("qkv", parts):
                out[f"{prefix}.attn.{part}.{kind}"] = tensor
    return out


def internal_to_hf(config: ModelConfig, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Internal names -> HF state dict (for writing HF directories)."""
    record = arch_record(config.arch)
    sd = dict(state_dict)
    if record.hf_fused_qkv is not None:
        fuse_qkv(config, sd, lambda q, k, v: record.hf_fused_qkv.fuse(config, q, k, v))
    out = rename_tensors(sd, hf_module_names(config), "state dict", None)
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def hf_tensor_name(config: ModelConfig, name: str) -> str:
    """The name an internal tensor has in an HF checkpoint (for error messages)."""
    return translate_name(hf_module_names(config), name,
                          fused_qkv=arch_record(config.arch).hf_fused_qkv is not None)
