"""Llama (and Llama-2/3 style checkpoints): the plain pre-norm SwiGLU decoder."""

from __future__ import annotations

from . import llama_family as fam
from .record import Arch

LLAMA = Arch(
    name="llama",
    hf_model_types=("llama",),
    hf_architecture="LlamaForCausalLM",
    config_from_hf=lambda cfg, source, common: fam.config_from_hf(cfg, source, common, arch="llama",
                                                                   default_context=2048, default_eps=1e-6),
    hf_keys=fam.hf_keys,
    hf_modules=fam.hf_modules,
    gguf_arch="llama",
    gguf_modules=fam.gguf_modules,
    gguf_fields=fam.gguf_fields,
    gguf_keys=fam.gguf_keys,
    gguf_problems=fam.gguf_problems,
    gguf_rope_freqs=True,
    chat_template=None,
)
