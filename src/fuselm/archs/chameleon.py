"""Chameleon: Llama's layout plus qk-norm (LayerNorm over head_dim per head or per group), optional swin-norm,
and a VQGAN image tokenizer (HF: model.vqmodel.*; GGUF: a -vqgan companion file)."""

from __future__ import annotations

import gguf

from ..config import ModelConfig
from . import llama_family as fam
from .record import Arch
from .values import read_bool


def _from_hf(cfg, source, common):
    return fam.config_from_hf(
        cfg, source, common, arch="chameleon", default_context=4096, default_eps=1e-5,
        block_kind="swin_norm" if read_bool(cfg, "swin_norm", source) else "pre_norm", qk_norm=True,
        extra={"vocabulary_map": cfg.get("vocabulary_map"), "vq_config": cfg.get("vq_config")})


def _hf_keys(config: ModelConfig) -> dict:
    keys = {**fam.hf_keys(config), "swin_norm": config.block_kind == "swin_norm"}
    for key in ("vocabulary_map", "vq_config"):
        if config.extra.get(key) is not None:
            keys[key] = config.extra[key]
    return keys


def _gguf_fields(get, names, common):
    tokens = get(gguf.Keys.Tokenizer.LIST, None, kind="list", arch_key=False)
    return {
        **fam.gguf_fields(get, names, common),
        "block_kind": "swin_norm" if get(gguf.Keys.LLM.SWIN_NORM, False, kind="bool") else "pre_norm",
        "qk_norm": True,
        "qk_norm_eps": fam.read_qk_norm_eps(get),
        # HF's config carries the token -> id map (image tokens are the IMGIMG* names); rebuild it from the vocab.
        "extra": {"vocabulary_map": {str(t): i for i, t in enumerate(tokens)} if tokens is not None else None,
                  "vq_config": None},
    }


def _gguf_keys(config: ModelConfig) -> dict:
    keys = {**fam.gguf_keys(config), gguf.Keys.LLM.SWIN_NORM: config.block_kind == "swin_norm"}
    if config.qk_norm_eps != 1e-5:
        keys[fam.QK_NORM_EPS_KEY] = float(config.qk_norm_eps)
    return keys


CHAMELEON = Arch(
    name="chameleon",
    hf_model_types=("chameleon",),
    hf_architecture="ChameleonForConditionalGeneration",
    config_from_hf=_from_hf,
    hf_keys=_hf_keys,
    hf_modules=fam.hf_modules,
    gguf_arch="chameleon",
    gguf_modules=fam.gguf_modules,
    gguf_fields=_gguf_fields,
    gguf_keys=_gguf_keys,
    gguf_problems=lambda c: fam.gguf_problems(c, qk_norm=True, swin_norm=True, biases=(False, False, False)),
    chat_template="chameleon",
    image_tokenizer=True,
    hf_ignored=(r".*rotary_emb\.inv_freq$", r"^model\.vqmodel\..*"),
)
