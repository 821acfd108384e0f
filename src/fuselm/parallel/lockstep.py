"""Keeping the ranks' forward passes in step, two ways.

Together (fuselm.load(..., tensor_parallel=True) from Python): every rank's program makes the same calls, so the
collectives meet by themselves; sampled tokens are rank 0's, broadcast (`agree`).

Leader / follow (the commands under torchrun): rank 0 runs the command alone, with all its I/O, and announces
each forward pass; the other ranks run `follow`, doing exactly those passes over mirrors of rank 0's KV caches
(each rank's own heads). A message is two broadcasts: a fixed header, then the lengths, tokens and rows. While
rank 0 is idle (a server waiting for requests, a chat waiting for its user) it sends a heartbeat, so a follower
tells a quiet leader from a dead one within the collective timeout.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Iterator

import torch

from ..model.cache import KVCache
from ..model.transformer import Forward, Transformer
from .group import Ranks

NOOP, FORWARD, STOP = 0, 1, 2
HEADER = 8  # op, cache key (-1: none), batch, capacity, B, T, flags, live cache keys
HAS_ROWS, LAST_ONLY = 1, 2
HEARTBEAT_S = 10.0


class Together:
    def __init__(self, ranks: Ranks):
        self.ranks = ranks

    def forward(self, run: Forward, tokens: torch.Tensor, cache: KVCache | None, last_only: bool,
                rows: torch.Tensor | None) -> torch.Tensor:
        return run(tokens, cache, last_only, rows)

    def agree(self, token: int) -> int:
        return int(self.ranks.broadcast(torch.tensor([token], dtype=torch.long))[0])


class Leader:
    def __init__(self, ranks: Ranks, heartbeat_s: float = HEARTBEAT_S):
        self.ranks = ranks
        self.lock = threading.Lock()
        self.keys: weakref.WeakKeyDictionary[KVCache, int] = weakref.WeakKeyDictionary()
        self.next_key = 0
        self.last_sent = time.monotonic()
        self.stopped = threading.Event()
        self.heartbeat = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                          name="fuselm-tp-heartbeat")
        self.heartbeat.start()

    def forward(self, run: Forward, tokens: torch.Tensor, cache: KVCache | None, last_only: bool,
                rows: torch.Tensor | None) -> torch.Tensor:
        with self.lock:
            self._send(FORWARD, tokens, cache, last_only, rows)
            return run(tokens, cache, last_only, rows)

    def agree(self, token: int) -> int:
        return token  # the followers never sample

    def stop(self) -> None:
        """Release the followers (they return from `follow`); safe to call twice."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        with self.lock:
            self._send(STOP)

    def _beat(self, interval: float) -> None:
        while not self.stopped.wait(interval / 4):
            if time.monotonic() - self.last_sent < interval:
                continue
            with self.lock:
                if self.stopped.is_set():
                    return
                try:
                    self._send(NOOP)
                except Exception:  # noqa: BLE001 (the main thread's next collective reports the lost rank)
                    return

    def _send(self, op: int, tokens: torch.Tensor | None = None, cache: KVCache | None = None,
              last_only: bool = False, rows: torch.Tensor | None = None) -> None:
        header = torch.zeros(HEADER, dtype=torch.long)
        header[0] = op
        payload: list[torch.Tensor] = []
        if op == FORWARD:
            B, T = tokens.shape
            header[4], header[5] = B, T
            header[6] = (HAS_ROWS if rows is not None else 0) | (LAST_ONLY if last_only else 0)
            if cache is not None:
                if cache not in self.keys:
                    self.keys[cache], self.next_key = self.next_key, self.next_key + 1
                live = sorted(self.keys.values())
                header[1], header[2], header[3], header[7] = self.keys[cache], cache.batch, cache.capacity, len(live)
                payload += [cache.lengths, cache.pad, torch.tensor(live, dtype=torch.long)]
            else:
                header[1] = -1
            payload.append(tokens.reshape(-1).long().cpu())
            if rows is not None:
                payload.append(torch.as_tensor(rows, dtype=torch.long).reshape(-1))
        self.ranks.broadcast(header)
        if payload:
            self.ranks.broadcast(torch.cat(payload))
        self.last_sent = time.monotonic()


def follow(transformer: Transformer, ranks: Ranks) -> None:
    """Run rank 0's forward passes until it stops (a follower rank's whole job under a command)."""
    mirrors: dict[int, KVCache] = {}
    while True:
        header = ranks.broadcast(torch.zeros(HEADER, dtype=torch.long)).tolist()
        op, key, batch, capacity, B, T, flags, n_live = header
        if op == STOP:
            return
        if op != FORWARD:
            continue
        size = B * T + (B if flags & HAS_ROWS else 0) + (2 * batch + n_live if key >= 0 else 0)
        payload = ranks.broadcast(torch.zeros(size, dtype=torch.long))
        cache = None
        if key >= 0:
            lengths, pad, live = payload[:batch], payload[batch:2 * batch], payload[2 * batch:2 * batch + n_live]
            payload = payload[2 * batch + n_live:]
            for gone in set(mirrors) - set(live.tolist()):
                del mirrors[gone]
            cache = mirrors.get(key)
            if cache is None:
                cache = mirrors[key] = transformer.new_cache(batch, capacity)
            cache.lengths.copy_(lengths)
            cache.pad.copy_(pad)
        tokens = payload[:B * T].reshape(B, T).to(transformer.device)
        rows = payload[B * T:] if flags & HAS_ROWS else None
        with torch.inference_mode():
            transformer.run(tokens, cache, bool(flags & LAST_ONLY), rows)


@contextlib.contextmanager
def leading(transformer: Transformer, ranks: Ranks) -> Iterator[None]:
    """Rank 0 of a command: inside the block, every forward pass is announced to the followers."""
    before = transformer.coordinator
    leader = Leader(ranks)
    transformer.coordinator = leader
    try:
        yield
    finally:
        transformer.coordinator = before
        leader.stop()
