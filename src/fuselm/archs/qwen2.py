"""Qwen2: Llama's layout with biases on q, k and v (none on the output projection), rotate-half RoPE in llama.cpp."""

from __future__ import annotations

from ..errors import FuselmError
from . import llama_family as fam
from .record import Arch
from .values import read_bool


def _from_hf(cfg, source, common):
    if read_bool(cfg, "use_sliding_window", source):
        raise FuselmError(f"{source}: key 'use_sliding_window' is true; fuselm runs Qwen2 with full attention only "
                          "(Qwen2's per-layer window from max_window_layers is not supported)")
    return fam.config_from_hf(cfg, source, common, arch="qwen2", default_context=32768, default_eps=1e-6,
                              qkv_bias=True, o_bias=False)


def _hf_keys(config):
    keys = fam.hf_keys(config)
    del keys["attention_bias"], keys["mlp_bias"]  # Qwen2's biases are fixed by the architecture
    return {**keys, "use_sliding_window": False}


def _problems(config):
    problems = fam.gguf_problems(config, biases=(True, False, False))
    if not config.qkv_bias:
        problems.append("llama.cpp's qwen2 needs q/k/v biases")
    return problems


QWEN2 = Arch(
    name="qwen2",
    hf_model_types=("qwen2",),
    hf_architecture="Qwen2ForCausalLM",
    config_from_hf=_from_hf,
    hf_keys=_hf_keys,
    hf_modules=fam.hf_modules,
    gguf_arch="qwen2",
    gguf_modules=fam.gguf_modules,
    gguf_fields=fam.gguf_fields,
    gguf_keys=fam.gguf_keys,
    gguf_problems=_problems,
    gguf_permutes_qk=False,  # llama.cpp runs qwen2 with NEOX (rotate-half) RoPE: rows stay in HF's order
)
