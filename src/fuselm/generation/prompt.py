"""Prompts to token ids: strings, chat messages (through the model's chat template), ids; default stop ids."""

from __future__ import annotations

import torch
from PIL import Image

from ..archs import arch_record
from ..errors import FuselmError
from .chat import builtin_for, render
from .sampling import SamplingParams

# llama.cpp's defaults: a sensible middle ground for chat-tuned and base models alike.
DEFAULT_SAMPLING = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)


def has_images(prompt) -> bool:
    """A prompt given as a list of parts with at least one PIL image among them."""
    return isinstance(prompt, (list, tuple)) and any(isinstance(p, Image.Image) for p in prompt)


def is_chat(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def chat_template_for(model) -> tuple[str, tuple[str, ...]]:
    """The model's own template if it ships one, else a built-in chosen from arch and vocabulary."""
    tok = model.tokenizer
    if tok is not None and tok.chat_template:
        return tok.chat_template, ()
    builtin = builtin_for(arch_record(model.config.arch).chat_template, tok.vocab() if tok else {})
    if builtin is None:
        raise FuselmError(f"{model.source}: the model ships no chat template and none of the built-in templates "
                          "(chameleon, alfred, llama3) matches its vocabulary")
    return builtin.source, builtin.stop_strings


def encode_prompt(model, prompt) -> tuple[list[int], tuple[str, ...]]:
    """Token ids for a prompt (string, chat messages, or ids) and the stop strings its template implies."""
    tok = model.tokenizer
    if isinstance(prompt, torch.Tensor):
        return [int(t) for t in prompt.reshape(-1)], ()
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt), ()
    if tok is None:
        raise FuselmError(f"{model.source}: the model has no tokenizer, so prompts must be token ids")
    if isinstance(prompt, str):
        return tok.encode(prompt), ()
    if is_chat(prompt):
        template, stops = chat_template_for(model)
        text = render(template, list(prompt), bos_token=tok.bos_token or "", eos_token=tok.eos_token or "",
                      source=tok.template_source if tok.chat_template else "built-in chat template")
        return tok.encode(text, add_special_tokens=False), stops
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        return tok.encode("".join(prompt)), ()
    raise FuselmError("prompt must be a string, a list of strings (and images, for image models), chat messages "
                      "([{'role': ..., 'content': ...}]) or token ids")


def default_stop_ids(model) -> list[int]:
    ids = list(model.config.eos_token_ids)
    if model.tokenizer is not None and model.tokenizer.eos_id is not None:
        ids.append(model.tokenizer.eos_id)
    return sorted(set(ids))
