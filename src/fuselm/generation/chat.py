"""Chat templates (jinja2, rendered as HF does) and the built-in templates for models that ship none."""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import FuselmError


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str  # jinja2 text
    stop_strings: tuple[str, ...] = ()


# Chameleon / Lumina-mGPT: each turn is its text followed by <reserved08706>, no role text.
CHAMELEON = ChatTemplate(
    "chameleon",
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}<reserved08706>{% endfor %}",
    ("<reserved08706>",),
)
# LightOn's Alfred (Falcon-40B fine-tune) format.
ALFRED = ChatTemplate(
    "alfred",
    "{% for m in messages %}{% if m['role'] == 'system' %}<start_system>{{ m['content'] }}<end_message>"
    "{% elif m['role'] == 'user' %}<start_user>{{ m['content'] }}<end_message>"
    "{% else %}<start_assistant>{{ m['content'] }}<end_message>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_assistant>{% endif %}",
    ("<end_message>",),
)
LLAMA3 = ChatTemplate(
    "llama3",
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    ("<|eot_id|>",),
)
BUILTIN = {t.name: t for t in (CHAMELEON, ALFRED, LLAMA3)}


def builtin_for(default: str | None, vocab: dict[str, int]) -> ChatTemplate | None:
    """Pick a built-in template from the tokens the vocabulary really has, else the architecture's `default`
    (the name of a BUILTIN template, from its archs record)."""
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        return LLAMA3
    if default in BUILTIN:
        return BUILTIN[default]
    if "<reserved08706>" in vocab:
        return CHAMELEON
    if "<end_message>" in vocab:
        return ALFRED
    return None


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def render(template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True, **extra) -> str:
    """Render an HF-style chat template (sandboxed, trim_blocks + lstrip_blocks as transformers does)."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise FuselmError(f"chat message {i} must be a dict with 'role' and 'content', got {m!r}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template).render(messages=messages, bos_token=bos_token or "",
                                                eos_token=eos_token or "",
                                                add_generation_prompt=add_generation_prompt, **extra)
    except jinja2.exceptions.TemplateError as err:
        raise FuselmError(f"chat template failed: {err}") from None
