"""Text generation for one sequence through the decoder: token ids in, TextDelta events and Done out."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from ..errors import FuselmError
from .decoder import LogitsProcessor, decode_ids, new_state
from .prompt import default_stop_ids
from .sampling import SamplingParams
from .stream import Done, Event, TextDelta, TextStream


def generate_text(model, ids: list[int], *, max_tokens: int, sampling: SamplingParams, seed: int | None,
                  stop: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None,
                  processors: Sequence[LogitsProcessor] = ()) -> Iterator[Event]:
    if not ids:
        raise FuselmError("the prompt is empty")
    limit = model.config.max_position_embeddings
    if len(ids) >= limit and not model.config.rope_scaling:
        raise FuselmError(f"prompt of {len(ids)} tokens does not fit the model's context of {limit} tokens")
    stop_ids = set(default_stop_ids(model) if stop_token_ids is None else [int(s) for s in stop_token_ids])
    decode = model.tokenizer.decode if model.tokenizer is not None else (lambda t: "")
    stream = TextStream(decode, tuple(stop))
    capacity = max(limit, len(ids) + 1) if model.config.rope_scaling else limit
    capacity = min(capacity, len(ids) + max_tokens)
    t0 = time.perf_counter()
    state = new_state(ids, capacity, model.transformer.device)
    reason = "length"
    for token in decode_ids(model.transformer, ids, max_new_tokens=max_tokens, sampling=sampling,
                            processors=processors, seed=seed, stop_ids=stop_ids, capacity=capacity, state=state):
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
        reason = state.finish_reason or reason
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
