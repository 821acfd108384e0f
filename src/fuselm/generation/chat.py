"""Chat templates (jinja2, rendered as HF does) and the built-in templates for models that ship none."""

from __future__ import annotations

from dataclasses import dataclass

import jinja2

from ..errors import FuselmError
from .template_sandbox import LimitedEnvironment, TemplateLimit, TemplateLimits


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


class TemplateRaised(jinja2.exceptions.TemplateError):
    """raise_exception() called by the template itself (HF's convention for unsupported conversations)."""


def _raise(message: str):
    raise TemplateRaised(str(message))


def render(template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True, source: str = "chat template",
           limits: TemplateLimits | None = None, **extra) -> str:
    """Render an HF-style chat template (trim_blocks + lstrip_blocks as transformers does) in a sandbox with
    limits on time, memory, loop ranges and output (template_sandbox). `source` names where the template came
    from (a file and key) in errors: any failure is one FuselmError naming it."""
    if not isinstance(template, str):
        raise FuselmError(f"{source}: chat template must be a string, got {type(template).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise FuselmError(f"chat message {i} must be a dict with 'role' and 'content', got {m!r}")
    limits = limits or _limits_for(messages)
    env = LimitedEnvironment(limits, trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    out: list[str] = []
    size = 0
    try:
        compiled = env.compile_limited(template)
        for piece in compiled.generate(messages=messages, bos_token=bos_token or "", eos_token=eos_token or "",
                                       add_generation_prompt=add_generation_prompt, **extra):
            env.tick()
            size += len(piece)
            if size > limits.max_chars:
                raise TemplateLimit(f"output longer than {limits.max_chars} characters")
            out.append(piece)
    except TemplateRaised as err:
        raise FuselmError(f"{source}: the chat template refused these messages: {err}") from None
    except TemplateLimit as err:
        raise FuselmError(f"{source}: chat template stopped: {err}") from None
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise FuselmError(f"{source}: chat template has a syntax error at line {err.lineno}: {err.message}") from None
    except RecursionError:
        raise FuselmError(f"{source}: chat template nests or recurses too deeply") from None
    except MemoryError:
        raise FuselmError(f"{source}: chat template ran out of memory") from None
    except Exception as err:  # the template is untrusted code: whatever it raises is its failure, not ours
        raise FuselmError(f"{source}: chat template failed ({err.__class__.__name__}: {str(err)[:200]})") from None
    return "".join(out)


def _limits_for(messages: list[dict]) -> TemplateLimits:
    """Default limits, with room for the conversation itself (a long document fits, with 4x for markup)."""
    text = sum(len(m["content"]) if isinstance(m["content"], str) else 0 for m in messages)
    base = TemplateLimits()
    return TemplateLimits(max_chars=max(base.max_chars, 4 * text), budget_chars=max(base.budget_chars, 16 * text))
