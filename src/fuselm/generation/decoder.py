"""The one decoding loop: sequences with their own state share one KV cache with a length per row.

A `SequenceState` is one sequence being decoded: its tokens, where it is, its sampler, its stop state, and the
cache rows it owns (a main row, plus guidance rows while classifier-free guidance runs). `Decoder.feed` runs
what the rows still need (prompts prefilled alone, in chunks; then one batched forward for every row that takes
a single token), and `next_token` turns a sequence's logits into its next token through the logits processors
(modality masks, guidance, user processors) and the sampler. Text generation, mixed-modal generation and the
serving engine all drive these two.

Logits processors are callables `(state, logits[rows, V]) -> logits[rows or 1, V]`; returning one row merges the
sequence's rows (guidance). Sequences may join and leave between steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import FuselmError, NonFiniteLogits
from ..model.transformer import Transformer
from .sampling import SamplingParams, sample


@dataclass
class SequenceState:
    prompt_len: int  # length of the prompt
    capacity: int  # total positions the sequence may use (prompt + generated)
    generated: list[int] = field(default_factory=list)
    history: torch.Tensor | None = None  # [1, L] ids for the repetition penalty (prompt + generated)
    timings: dict = field(default_factory=dict)
    rows: list[int] = field(default_factory=list)  # cache rows: the sequence's own first, then guidance rows
    finish_reason: str | None = None  # "eos", "stop", "length", "context", "cancelled", ... once it has ended

    @property
    def position(self) -> int:
        """Position of the token about to be sampled."""
        return self.prompt_len + len(self.generated)

    @property
    def remaining(self) -> int:
        return self.capacity - self.position


LogitsProcessor = Callable[[SequenceState, torch.Tensor], torch.Tensor]


class Decoder:
    """One model, one cache of `rows` rows of `capacity` positions each, and the rows' pending tokens."""

    def __init__(self, model: Transformer, rows: int, capacity: int, *, prefill_chunk: int | None = None):
        self.model, self.prefill_chunk = model, prefill_chunk
        self.cache = model.new_cache(rows, capacity)
        self.free = list(range(rows))
        self.pending: dict[int, list[int]] = {}

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def take_row(self, tokens: Sequence[int] = ()) -> int:
        """A free row for a new sequence (or guidance context), with `tokens` waiting to be fed."""
        if not self.free:
            raise FuselmError(f"internal error: all {self.cache.batch} cache rows are in use")
        row = self.free.pop(0)
        self.cache.reset_row(row)
        self.pending[row] = [int(t) for t in tokens]
        return row

    def release(self, rows: Sequence[int]) -> None:
        for row in rows:
            self.pending.pop(row, None)
            if row not in self.free:
                self.free.append(row)
        self.free.sort()

    def length(self, row: int) -> int:
        return int(self.cache.lengths[row])

    def feed(self, rows: Sequence[int], *, chunk: int | None = None) -> dict[int, torch.Tensor]:
        """Feed each row's pending tokens; the logits [V] after each row's last token.

        Rows with several tokens are prefilled alone; the rows left with one token then run as one batched forward,
        each row attending over exactly its own keys. With `chunk`, a row takes at most that many tokens this call
        and gives no logits until its prompt is in (so long prompts never stall the rows that are decoding). A
        single-row cache takes every pending token in one forward, exactly as one sequence decoding alone."""
        out: dict[int, torch.Tensor] = {}
        singles: list[tuple[int, int]] = []
        with torch.inference_mode():
            for row in rows:
                tokens = self.pending.get(row) or []
                if not tokens:
                    raise FuselmError(f"internal error: cache row {row} has no token to feed")
                if chunk is not None and len(tokens) > chunk:
                    self.pending[row] = tokens[chunk:]
                    self._forward_alone(row, tokens[:chunk])
                    continue
                self.pending[row] = []
                if len(tokens) > 1 or self.cache.batch == 1:
                    out[row] = self._forward_alone(row, tokens)
                else:
                    singles.append((row, tokens[0]))
            if singles:
                index = torch.tensor([row for row, _ in singles])
                ids = torch.tensor([[token] for _, token in singles], dtype=torch.long, device=self.model.device)
                logits = self.model(ids, cache=self.cache, rows=index)[:, -1]
                out.update({row: logits[i] for i, (row, _) in enumerate(singles)})
        return out

    def _forward_alone(self, row: int, tokens: list[int]) -> torch.Tensor:
        whole = self.cache.batch == 1  # the cache's only row: no row index, the single-sequence path
        chunk = self.prefill_chunk or len(tokens)
        logits = None
        for start in range(0, len(tokens), chunk):
            part = torch.tensor([tokens[start:start + chunk]], dtype=torch.long, device=self.model.device)
            logits = self.model(part, cache=self.cache, last_only=True,
                                rows=None if whole else torch.tensor([row]))[0, -1]
        return logits

    def push(self, rows: Sequence[int], tokens: Sequence[int]) -> None:
        """Queue tokens to be fed to each of `rows` (a sampled token goes to every row of its sequence)."""
        for row in rows:
            self.pending.setdefault(row, []).extend(int(t) for t in tokens)


def next_token(state: SequenceState, logits: torch.Tensor, processors: Sequence[LogitsProcessor],
               sampling: SamplingParams | Callable[[SequenceState], SamplingParams],
               generator: torch.Generator | None, agree: Callable[[int], int] = int) -> int:
    """Run the processors over a sequence's logits [rows, V], sample one token, and record it.

    `agree` makes the token the same on every rank of a tensor-parallel model (Transformer.agree)."""
    if not float(logits[:1].max()) < float("inf"):  # max is NaN with any NaN: one reduction finds both
        raise NonFiniteLogits(f"the model's logits hold NaN or +Inf at generated token {len(state.generated)}: "
                              "its weights overflow float32 (corrupt or out-of-range values)")
    for p in processors:
        logits = p(state, logits)
    params = sampling(state) if callable(sampling) else sampling
    token = agree(int(sample(logits[:1], params, generator, state.history)[0]))
    state.generated.append(token)
    state.history = torch.cat([state.history, state.history.new_tensor([[token]])], dim=1)
    return token


def new_state(prompt: Sequence[int], capacity: int, device) -> SequenceState:
    if not prompt:
        raise FuselmError("the prompt is empty")
    if len(prompt) >= capacity:
        raise FuselmError(f"prompt of {len(prompt)} tokens leaves no room to generate (capacity {capacity})")
    state = SequenceState(prompt_len=len(prompt), capacity=capacity)
    state.history = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    return state


class SequenceRun:
    """One sequence driven by a Decoder, alone (run_alone) or among others (the serving engine).

    The driver calls join() once, then before_feed(), Decoder.feed over `rows`, and after_feed() with the logits
    of those rows, until `done`. Each call returns the events it produced. Subclasses: TokenRun (ids), TextRun
    (text events), the mixed-modal run (text and pictures)."""

    rows_needed = 1  # cache rows the run may hold at once (guidance adds rows)
    capacity: int
    state: SequenceState

    @property
    def rows(self) -> list[int]:
        return self.state.rows

    @property
    def done(self) -> bool:
        return self.state.finish_reason is not None

    def join(self, decoder: Decoder) -> list:
        raise NotImplementedError

    def before_feed(self, decoder: Decoder) -> None:
        """Rows to add or change before the next forward (guidance rows join here)."""

    def after_feed(self, logits: dict[int, torch.Tensor], decoder: Decoder) -> list:
        raise NotImplementedError


class TokenRun(SequenceRun):
    """Sample ids after a prompt until a stop id (which is kept), max_new_tokens, or a full cache."""

    def __init__(self, device, prompt: Sequence[int], *, max_new_tokens: int, capacity: int,
                 sampling: SamplingParams | Callable[[SequenceState], SamplingParams],
                 processors: Sequence[LogitsProcessor] = (), seed: int | None = 0, stop_ids: Sequence[int] = ()):
        self.prompt, self.max_new_tokens, self.capacity = list(prompt), max_new_tokens, capacity
        self.sampling, self.processors = sampling, list(processors)
        self.generator, self.stop_ids = generator_for(seed), {int(s) for s in stop_ids}
        self.state = new_state(self.prompt, capacity, device)
        self._t0 = self._t1 = None

    def join(self, decoder: Decoder) -> list:
        self._t0 = time.perf_counter()
        self.state.rows = [decoder.take_row(self.prompt)]
        return []

    def after_feed(self, logits: dict[int, torch.Tensor], decoder: Decoder) -> list:
        state = self.state
        if self._t1 is None:
            self._t1 = time.perf_counter()
            state.timings["prefill_s"] = self._t1 - self._t0
        token = next_token(state, logits[state.rows[0]][None], self.processors, self.sampling, self.generator,
                           decoder.model.agree)
        state.timings["decode_s"] = time.perf_counter() - self._t1
        if token in self.stop_ids:
            state.finish_reason = "eos"
        elif len(state.generated) >= self.max_new_tokens:
            state.finish_reason = "length"
        elif state.position - 1 >= self.capacity:  # the cache is full: nothing more can be fed
            state.finish_reason = "context"
        else:
            decoder.push(state.rows, [token])
        return self.on_token(token)

    def on_token(self, token: int) -> list:
        """Events for a sampled token (none at this level)."""
        return []


def run_alone(run: SequenceRun, model: Transformer) -> Iterator:
    """Drive one run over a cache of its own; yield its events."""
    decoder = Decoder(model, run.rows_needed, run.capacity)
    yield from run.join(decoder)
    while not run.done:
        run.before_feed(decoder)
        yield from run.after_feed(decoder.feed(run.rows), decoder)


def decode_ids(model: Transformer, prompt: Sequence[int], *, max_new_tokens: int,
               sampling: SamplingParams | Callable[[SequenceState], SamplingParams],
               processors: Sequence[LogitsProcessor] = (), seed: int | None = 0, stop_ids: Sequence[int] = (),
               capacity: int | None = None) -> Iterator[int]:
    """One sequence alone: yield sampled ids one by one (a stop id is yielded, then the loop ends)."""
    run = TokenRun(model.device, prompt, max_new_tokens=max_new_tokens,
                   capacity=capacity or len(prompt) + max_new_tokens, sampling=sampling, processors=processors,
                   seed=seed, stop_ids=stop_ids)
    decoder = Decoder(model, 1, run.capacity)
    run.join(decoder)
    while not run.done:
        run.after_feed(decoder.feed(run.rows), decoder)
        yield run.state.generated[-1]


def generator_for(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None
