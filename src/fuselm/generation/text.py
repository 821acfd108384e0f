"""Text generation: a TokenRun whose tokens become TextDelta events (stop strings included), then Done."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from ..errors import FuselmError
from .decoder import LogitsProcessor, TokenRun, run_alone
from .prompt import default_stop_ids
from .sampling import SamplingParams
from .stream import Done, Event, TextDelta, TextStream


class TextRun(TokenRun):
    def __init__(self, model, ids: list[int], *, max_tokens: int, sampling: SamplingParams, seed: int | None,
                 stop: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None,
                 processors: Sequence[LogitsProcessor] = ()):
        if not ids:
            raise FuselmError("the prompt is empty")
        limit = model.config.max_position_embeddings
        if len(ids) >= limit and not model.config.rope_scaling:
            raise FuselmError(f"prompt of {len(ids)} tokens does not fit the model's context of {limit} tokens")
        stop_ids = default_stop_ids(model) if stop_token_ids is None else [int(s) for s in stop_token_ids]
        capacity = max(limit, len(ids) + 1) if model.config.rope_scaling else limit
        super().__init__(model.transformer.device, ids, max_new_tokens=max_tokens,
                         capacity=min(capacity, len(ids) + max_tokens), sampling=sampling, processors=processors,
                         seed=seed, stop_ids=stop_ids)
        decode = model.tokenizer.decode if model.tokenizer is not None else (lambda t: "")
        self.stream = TextStream(decode, tuple(stop))
        self.started = time.perf_counter()

    def on_token(self, token: int) -> list[Event]:
        state, events = self.state, []
        if state.finish_reason != "eos":
            delta = self.stream.push([token])
            if delta:
                events.append(TextDelta(delta))
            if self.stream.stopped:
                state.finish_reason = "stop"
        if state.finish_reason is not None:
            tail = self.stream.flush()
            if tail:
                events.append(TextDelta(tail))
            events.append(self._done())
        return events

    def _done(self) -> Done:
        state, n = self.state, len(self.state.generated)
        timings = dict(state.timings, total_s=time.perf_counter() - self.started)
        if n > 1 and timings.get("decode_s"):
            timings["decode_tok_s"] = (n - 1) / timings["decode_s"]
        if timings.get("prefill_s"):
            timings["prefill_tok_s"] = len(self.prompt) / timings["prefill_s"]
        return Done(state.finish_reason, prompt_tokens=len(self.prompt), generated_tokens=n, timings=timings)


def generate_text(model, ids: list[int], *, max_tokens: int, sampling: SamplingParams, seed: int | None,
                  stop: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None,
                  processors: Sequence[LogitsProcessor] = ()) -> Iterator[Event]:
    run = TextRun(model, ids, max_tokens=max_tokens, sampling=sampling, seed=seed, stop=stop,
                  stop_token_ids=stop_token_ids, processors=processors)
    yield from run_alone(run, model.transformer)
