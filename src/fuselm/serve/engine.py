"""The engine: requests in, fuselm events out, with a bounded queue and cancellation.

Interface (the HTTP layer relies on nothing else):
  engine = Engine(model, parallel=4, queue_size=64, metrics=None)
  stream = await engine.submit(EngineRequest(prompt, options, top_logprobs=None))   # EngineBusy when full
  async for event in stream: ...    # Sampled, then the fuselm events (TextDelta, ImageStart, ImageProgress,
                                    # ImageDone), and last Done; a failed request raises its error here
  stream.cancel()                   # also done by `aclose()`; the request stops costing compute at its next step
  engine.close()                    # cancel everything; open streams raise EngineShutdown

Continuous batching: one worker thread decodes up to `parallel` requests together over one KV cache with a
length per row (fuselm.generation.decoder). Each step is one batched forward over every running sequence's row
(plus its guidance rows while a picture is drawn); requests join between steps, a long prompt is prefilled one
chunk per step so running streams keep flowing, and a finished, cancelled or disconnected request leaves at once.
Each row attends over exactly its own keys, so a request's tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import FuselmError
from ..generation.decoder import Decoder, SequenceRun, SequenceState
from ..generation.generate import prepare_run
from ..generation.stream import Done

log = logging.getLogger("fuselm.serve")


@dataclass
class EngineRequest:
    prompt: Any  # what fuselm.generate takes: a string, token ids, chat messages, or strings and PIL images
    options: dict = field(default_factory=dict)  # fuselm.generate keyword arguments (max_tokens, seed, images, ...)
    top_logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's logprob and the k best


@dataclass(frozen=True)
class Sampled:
    """Tokens sampled since the previous event (it comes before the event they produced)."""
    ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None = None  # log-softmax of the model's logits at the sampled id
    top: tuple[tuple[tuple[int, float], ...], ...] | None = None  # per token: the k best (id, logprob)


class EngineBusy(Exception):
    """The queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy (queue full); retry in {retry_after} s")
        self.retry_after = retry_after


class EngineShutdown(Exception):
    """The server is shutting down; the request was ended early."""


class _Cancelled(Exception):
    pass


_END = object()


class _Recorder:
    """A logits processor that ends a cancelled request between steps and records the sampled tokens (and, when
    asked, their logprobs). It runs last, on the logits the sampler sees before temperature and top-k/p."""

    def __init__(self, cancelled: threading.Event, top_logprobs: int | None):
        self.cancelled = cancelled
        self.top = top_logprobs
        self.state: SequenceState | None = None
        self.rows: list[torch.Tensor] = []  # log-softmax per step not yet taken (only with logprobs)
        self.sent = 0

    def __call__(self, state: SequenceState, logits: torch.Tensor) -> torch.Tensor:
        if self.cancelled.is_set():
            raise _Cancelled
        self.state = state
        if self.top is not None:
            self.rows.append(torch.log_softmax(logits[0].float(), dim=-1))
        return logits

    def take(self) -> Sampled | None:
        ids = list(self.state.generated[self.sent:]) if self.state is not None else []
        if not ids:
            return None
        self.sent += len(ids)
        if self.top is None:
            return Sampled(tuple(ids))
        # one row per sampled token, in order; rows are dropped once taken (they are vocabulary-sized)
        rows, self.rows = self.rows[:len(ids)], self.rows[len(ids):]
        logprobs = tuple(float(row[t]) for row, t in zip(rows, ids))
        top = []
        for row in rows:
            values, idx = torch.topk(row, min(self.top, row.numel()))
            top.append(tuple((int(i), float(v)) for i, v in zip(idx, values)))
        return Sampled(tuple(ids), logprobs, tuple(top))


class Stream:
    """One submitted request as seen by its caller: an async iterator of events."""

    def __init__(self, request: EngineRequest, loop: asyncio.AbstractEventLoop, on_cancel):
        self.request = request
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.joined: float | None = None  # when it started decoding
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._on_cancel = on_cancel
        self._finished = False

    # --- worker side (any thread)
    def put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (process exit): nobody is listening
            pass

    # --- caller side (the event loop)
    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        return item

    def cancel(self) -> None:
        """Stop the request (queued or running); safe to call more than once and after the end."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self._on_cancel(self)

    async def aclose(self) -> None:
        self.cancel()


class Engine:
    """Requests in, event streams out (see the module docstring for the contract)."""

    def __init__(self, model, parallel: int = 4, queue_size: int = 64, metrics=None):
        if parallel < 1 or queue_size < 0:
            raise FuselmError(f"parallel must be >= 1 and queue_size >= 0, got {parallel} and {queue_size}")
        self.model = model
        self.parallel = parallel
        self.queue_size = queue_size
        self.metrics = metrics
        self._scheduler = _Scheduler(self)

    async def submit(self, request: EngineRequest) -> Stream:
        stream = Stream(request, asyncio.get_running_loop(), self._scheduler.cancel)
        self._scheduler.add(stream)
        return stream

    @property
    def running(self) -> int:
        return self._scheduler.running

    @property
    def waiting(self) -> int:
        return self._scheduler.waiting

    @property
    def closed(self) -> bool:
        return self._scheduler.closing

    def close(self, timeout: float = 10.0) -> None:
        self._scheduler.close(timeout)


PREFILL_CHUNK = 256  # prompt tokens a joining sequence feeds per step (running streams wait at most that long)


@dataclass
class _Active:
    stream: Stream
    run: SequenceRun
    recorder: _Recorder
    first: bool = True


class _Scheduler:
    """Which requests run when: up to `parallel` at once, decoded together step by step on one worker thread."""

    def __init__(self, engine: Engine):
        self.engine = engine
        model = engine.model
        self.rows_per_sequence = 3 if model.image_tokenizer is not None else 1  # Meta guidance adds two rows
        capacity = model.config.max_position_embeddings
        self.decoder = Decoder(model.transformer, engine.parallel * self.rows_per_sequence, capacity)
        self.queue: deque[Stream] = deque()
        self.active: list[_Active] = []
        self.closing = False
        self.lock = threading.Condition()
        self.recent_seconds: deque[float] = deque(maxlen=16)  # durations, for Retry-After
        self.thread = threading.Thread(target=self._work, name="fuselm-engine", daemon=True)
        self.thread.start()

    @property
    def running(self) -> int:
        return len(self.active)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def add(self, stream: Stream) -> None:
        with self.lock:
            if self.closing:
                raise EngineShutdown("the server is shutting down")
            if len(self.queue) >= self.engine.queue_size:
                raise EngineBusy(self._retry_after())
            self.queue.append(stream)
            self._report()
            self.lock.notify()

    def _retry_after(self) -> int:
        typical = sorted(self.recent_seconds)[len(self.recent_seconds) // 2] if self.recent_seconds else 1.0
        return max(1, round(typical * (len(self.queue) + 1) / self.engine.parallel))

    def cancel(self, stream: Stream) -> None:
        with self.lock:
            if stream in self.queue:  # never started: end it now
                self.queue.remove(stream)
                stream.put(_END)
                self._count_cancelled()
                self._report()
            self.lock.notify()
        # a running request leaves before the next step

    def close(self, timeout: float) -> None:
        with self.lock:
            self.closing = True
            waiting, self.queue = list(self.queue), deque()
            self.lock.notify_all()
        for stream in waiting:
            stream.put(EngineShutdown("the server is shutting down"))
        self.thread.join(timeout)
        self._report()

    def _report(self) -> None:
        m = self.engine.metrics
        if m is not None:
            m.set_load(waiting=len(self.queue), running=self.running, parallel=self.engine.parallel)

    def _count_cancelled(self) -> None:
        if self.engine.metrics is not None:
            self.engine.metrics.cancelled.inc()

    # ---- the worker ------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.queue and not self.active and not self.closing:
                    self.lock.wait()
                if self.closing:
                    for a in list(self.active):
                        self._leave(a, EngineShutdown("the server is shutting down"))
                    return
                joining = []
                while self.queue and len(self.active) + len(joining) < self.engine.parallel:
                    joining.append(self.queue.popleft())
                self._report()
            for stream in joining:
                self._join(stream)
            try:
                self._step()
            except Exception as err:  # a bug in the batch: end every request with it, keep serving
                log.exception("decode step failed")
                for a in list(self.active):
                    self._leave(a, RuntimeError(f"internal error: {type(err).__name__}: {err}"))

    def _join(self, stream: Stream) -> None:
        request = stream.request
        recorder = _Recorder(stream.cancelled, request.top_logprobs)
        try:
            run = prepare_run(self.engine.model, request.prompt, processors=[recorder], **request.options)
            if run.capacity > self.decoder.capacity:
                raise FuselmError(f"the request needs {run.capacity} positions; the server's cache holds "
                                  f"{self.decoder.capacity} per sequence")
            active = _Active(stream, run, recorder)
            stream.joined = time.perf_counter()
            self._emit(active, run.join(self.decoder))
        except FuselmError as err:
            stream.put(err)
            stream.put(_END)
            return
        with self.lock:
            self.active.append(active)
            self._report()

    def _step(self) -> None:
        decoder = self.decoder
        for a in list(self.active):
            if a.stream.cancelled.is_set():
                self._leave(a, None)
        if not self.active:
            return
        rows = []
        for a in self.active:
            a.run.before_feed(decoder)
            prefilling = [r for r in a.run.rows if len(decoder.pending.get(r, ())) > 1]
            rows += prefilling or a.run.rows  # a sequence samples only once all its rows are in
        fed = decoder.feed(rows, chunk=PREFILL_CHUNK)
        for a in list(self.active):
            if not all(r in fed for r in a.run.rows):
                continue
            try:
                events = a.run.after_feed(fed, decoder)
            except _Cancelled:
                self._leave(a, None)
                continue
            except FuselmError as err:
                self._leave(a, err)
                continue
            self._emit(a, events)
            if a.run.done:
                self._leave(a, _END)

    def _emit(self, a: _Active, events: list) -> None:
        metrics = self.engine.metrics
        sampled = a.recorder.take()
        if sampled is not None:
            if a.first and metrics is not None:
                metrics.time_to_first_token.observe(time.perf_counter() - a.stream.submitted)
            a.first = False
            a.stream.put(sampled)
        for event in events:
            a.stream.put(event)
            if isinstance(event, Done) and metrics is not None:
                metrics.tokens.labels("prompt").inc(event.prompt_tokens)
                metrics.tokens.labels("completion").inc(event.generated_tokens)

    def _leave(self, a: _Active, outcome) -> None:
        """Free the request's rows and end its stream: _END (finished), None (cancelled) or an exception."""
        self.decoder.release(a.run.rows)
        with self.lock:
            if a in self.active:
                self.active.remove(a)
            self._report()
        if outcome is None:
            self._count_cancelled()
        elif outcome is not _END:
            if isinstance(outcome, Exception) and not isinstance(outcome, (FuselmError, EngineShutdown)):
                log.error("request failed: %s", outcome)
            a.stream.put(outcome)
        self.recent_seconds.append(time.perf_counter() - (a.stream.joined or a.stream.submitted))
        a.stream.put(_END)
