"""Mistral: Llama's layout with sliding-window attention (each query sees the last `sliding_window` keys).

llama.cpp's converter writes Mistral as its `llama` architecture and its llama graph attends to every key, so a
llama.cpp-made Mistral GGUF loads here as llama (full attention, as llama.cpp runs it). Files fuselm writes keep
the family and the window under fuselm.* keys, which llama.cpp ignores.
"""

from __future__ import annotations

from . import llama_family as fam
from .record import Arch
from .values import read_int

ARCH_KEY = "fuselm.architecture"
WINDOW_KEY = "fuselm.sliding_window"


def _from_hf(cfg, source, common):
    window = read_int(cfg, "sliding_window", source, None, limit="context")
    return fam.config_from_hf(cfg, source, common, arch="mistral", default_context=4096 * 32, default_eps=1e-6,
                              sliding_window=window)


def _hf_keys(config):
    return {**fam.hf_keys(config), "sliding_window": config.sliding_window}


def _gguf_fields(get, names, common):
    return {**fam.gguf_fields(get, names, common), "sliding_window": get(WINDOW_KEY, None, kind="int", arch_key=False)}


def _gguf_keys(config):
    keys = {**fam.gguf_keys(config), ARCH_KEY: "mistral"}
    if config.sliding_window is not None:
        keys[WINDOW_KEY] = config.sliding_window
    return keys


MISTRAL = Arch(
    name="mistral",
    hf_model_types=("mistral",),
    hf_architecture="MistralForCausalLM",
    config_from_hf=_from_hf,
    hf_keys=_hf_keys,
    hf_modules=fam.hf_modules,
    gguf_arch="llama",
    gguf_modules=fam.gguf_modules,
    gguf_fields=_gguf_fields,
    gguf_keys=_gguf_keys,
    gguf_problems=fam.gguf_problems,
    gguf_rope_freqs=True,
)
