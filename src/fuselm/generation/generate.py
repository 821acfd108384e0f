"""fuselm.generate(): prompt in, a stream of events out."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from ..errors import FuselmError
from .chat import builtin_for, render
from .loop import GenState, LogitsProcessor, decode_tokens
from .sampling import SamplingParams
from .stream import Done, Event, TextDelta, TextStream

# llama.cpp's defaults: a sensible middle ground for chat-tuned and base models alike.
DEFAULT_SAMPLING = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)


def is_chat(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def chat_template_for(model) -> tuple[str, tuple[str, ...]]:
    """The model's own template if it ships one, else a built-in chosen from arch and vocabulary."""
    tok = model.tokenizer
    if tok is not None and tok.chat_template:
        return tok.chat_template, ()
    builtin = builtin_for(model.config.arch, tok.vocab() if tok else {})
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
        text = render(template, list(prompt), bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
        return tok.encode(text, add_special_tokens=False), stops
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        return tok.encode("".join(prompt)), ()
    raise FuselmError("prompt must be a string, a list of strings (and images, for image models), chat messages "
                      "([{'role': ..., 'content': ...}]) or token ids")


def generate(model, prompt, *, max_tokens: int = 256, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
             sampling: SamplingParams | None = None, seed: int | None = 0, stop: Sequence[str] = (),
             stop_token_ids: Sequence[int] | None = None, processors: Sequence[LogitsProcessor] = (),
             **options) -> Iterator[Event]:
    """Stream events for a prompt: TextDelta..., then Done(reason, timings).

    Sampler options override `sampling` (default: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05; temperature
    0 is greedy). Chameleon models also take image options (see fuselm.generation.mixed).
    """
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise FuselmError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    base = sampling or DEFAULT_SAMPLING
    overrides = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                       repetition_penalty=repetition_penalty).items() if v is not None}
    params = SamplingParams(**{**base.__dict__, **overrides}) if overrides else base
    if model.image_tokenizer is not None or options or _has_images(prompt):
        from .mixed import generate_mixed

        chosen = params if (overrides or sampling is not None) else None  # None: the modality's own defaults
        yield from generate_mixed(model, prompt, max_tokens=max_tokens, sampling=chosen, seed=seed, stop=stop,
                                  stop_token_ids=stop_token_ids, processors=processors, **options)
        return
    ids, template_stops = encode_prompt(model, prompt)
    yield from generate_text(model, ids, max_tokens=max_tokens, sampling=params, seed=seed,
                             stop=tuple(stop) + template_stops, stop_token_ids=stop_token_ids, processors=processors)


def _has_images(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and any(not isinstance(p, (str, int, dict)) for p in prompt)


def default_stop_ids(model) -> list[int]:
    ids = list(model.config.eos_token_ids)
    if model.tokenizer is not None and model.tokenizer.eos_id is not None:
        ids.append(model.tokenizer.eos_id)
    return sorted(set(ids))


def generate_text(model, ids: list[int], *, max_tokens: int, sampling: SamplingParams, seed: int | None,
                  stop: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None,
                  processors: Sequence[LogitsProcessor] = ()) -> Iterator[Event]:
    if not ids:
        raise FuselmError("the prompt is empty")
    limit = model.config.max_position_embeddings
    if len(ids) >= limit and not model.config.rope_scaling:
        raise FuselmError(f"prompt of {len(ids)} tokens does not fit the model's context of {limit} tokens")
    stop_ids = default_stop_ids(model) if stop_token_ids is None else list(stop_token_ids)
    decode = model.tokenizer.decode if model.tokenizer is not None else (lambda t: "")
    stream = TextStream(decode, tuple(stop))
    capacity = max(limit, len(ids) + 1) if model.config.rope_scaling else limit
    capacity = min(capacity, len(ids) + max_tokens)
    state = GenState(prompt_len=len(ids), capacity=capacity)
    t0 = time.perf_counter()
    reason = "length"
    prompt = torch.tensor([ids], dtype=torch.long)
    for token in decode_tokens(model.transformer, prompt, max_new_tokens=max_tokens, sampling=sampling,
                               processors=processors, seed=seed, stop_token_ids=stop_ids, capacity=capacity,
                               state=state):
        if token in stop_ids:
            reason = "eos"
            break
        delta = stream.push([token])
        if delta:
            yield TextDelta(delta)
        if stream.stopped:
            reason = "stop"
            break
    else:
        if len(state.generated) < max_tokens:
            reason = "context"
    tail = stream.flush()
    if tail:
        yield TextDelta(tail)
    n = len(state.generated)
    timings = dict(state.timings, total_s=time.perf_counter() - t0)
    if n > 1 and timings.get("decode_s"):
        timings["decode_tok_s"] = (n - 1) / timings["decode_s"]
    if timings.get("prefill_s"):
        timings["prefill_tok_s"] = len(ids) / timings["prefill_s"]
    yield Done(reason, prompt_tokens=len(ids), generated_tokens=n, timings=timings)
