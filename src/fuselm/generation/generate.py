"""fuselm.generate(): prompt in, a stream of events out."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ..errors import FuselmError, NonFiniteLogits
from .decoder import LogitsProcessor, SequenceRun, run_alone
from .mixed import prepare_mixed
from .prompt import DEFAULT_SAMPLING, encode_prompt, has_images
from .sampling import SamplingParams
from .stream import Event
from .text import TextRun


def prepare_run(model, prompt, *, max_tokens: int = 256, temperature: float | None = None,
                top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                repetition_penalty: float | None = None, sampling: SamplingParams | None = None, seed: int | None = 0,
                stop: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None,
                processors: Sequence[LogitsProcessor] = (), **options) -> SequenceRun:
    """The run for a prompt and options (see generate), ready to decode alone or in the serving engine's batch."""
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise FuselmError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    base = sampling or DEFAULT_SAMPLING
    overrides = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                       repetition_penalty=repetition_penalty).items() if v is not None}
    params = SamplingParams(**{**base.__dict__, **overrides}) if overrides else base
    if model.image_tokenizer is not None or options or has_images(prompt):
        chosen = params if (overrides or sampling is not None) else None  # None: the modality's own defaults
        return prepare_mixed(model, prompt, max_tokens=max_tokens, sampling=chosen, seed=seed, stop=stop,
                             stop_token_ids=stop_token_ids, processors=processors, **options)
    ids, template_stops = encode_prompt(model, prompt)
    return TextRun(model, ids, max_tokens=max_tokens, sampling=params, seed=seed, stop=tuple(stop) + template_stops,
                   stop_token_ids=stop_token_ids, processors=processors)


def generate(model, prompt, **options) -> Iterator[Event]:
    """Stream events for a prompt: TextDelta..., then Done(reason, timings).

    Options: max_tokens (default 256), temperature, top_k, top_p, min_p, repetition_penalty, or a whole
    `sampling` (default: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05; temperature 0 is greedy), seed, stop
    strings, stop_token_ids, processors. Chameleon models also take image options (see fuselm.generation.mixed).
    """
    try:
        yield from run_alone(prepare_run(model, prompt, **options), model.transformer)
    except NonFiniteLogits as err:
        raise NonFiniteLogits(f"{model.source or 'model'}: {err}") from None
