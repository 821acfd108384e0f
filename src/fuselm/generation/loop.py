"""The decoding loop: prefill, then one token a step through a fixed KV cache.

Logits processors are small callables `(state, logits[B, V]) -> logits[B or 1, V]`. Returning one row merges the
batch (classifier-free guidance); the sampled token is then fed to every row. Modality masks and CFG plug in here
without changing the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import FuselmError
from ..model.cache import KVCache
from ..model.transformer import Transformer
from .sampling import SamplingParams, sample


@dataclass
class GenState:
    prompt_len: int  # unpadded length of row 0's prompt
    capacity: int  # total positions available (prompt + generated)
    generated: list[int] = field(default_factory=list)
    history: torch.Tensor | None = None  # [1, L] ids used for repetition penalty (prompt + generated)
    timings: dict = field(default_factory=dict)

    @property
    def position(self) -> int:
        """Position of the token about to be sampled (row 0)."""
        return self.prompt_len + len(self.generated)

    @property
    def remaining(self) -> int:
        return self.capacity - self.position


LogitsProcessor = Callable[[GenState, torch.Tensor], torch.Tensor]


def decode_tokens(model: Transformer, prompt: torch.Tensor, *, max_new_tokens: int,
                  sampling: SamplingParams | Callable[[GenState], SamplingParams],
                  processors: Sequence[LogitsProcessor] = (), seed: int | None = 0,
                  stop_token_ids: Sequence[int] = (), pad: torch.Tensor | None = None,
                  capacity: int | None = None, state: GenState | None = None) -> Iterator[int]:
    """Yield sampled token ids one by one (a stop token is yielded, then the loop ends).

    prompt: [B, T] ids, rows left-padded by `pad[b]` positions (B > 1 only for guidance rows).
    """
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise FuselmError(f"prompt must be a non-empty [batch, tokens] tensor, got shape {tuple(prompt.shape)}")
    config = model.config
    B, T = prompt.shape
    limit = config.max_position_embeddings
    capacity = capacity or min(limit * 64, T + max_new_tokens)
    if T > limit and not config.rope_scaling:
        raise FuselmError(f"prompt of {T} tokens is longer than the model's context of {limit} tokens")
    if T >= capacity:
        raise FuselmError(f"prompt of {T} tokens leaves no room to generate (capacity {capacity})")
    pad = torch.zeros(B, dtype=torch.long) if pad is None else pad
    state = state or GenState(prompt_len=T - int(pad[0]), capacity=capacity - int(pad[0]))
    state.history = prompt[:1, int(pad[0]):]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = KVCache(config, B, capacity, dtype=model.dtype, device=model.device)
    cache.pad = pad.to(cache.pad.device)
    stops = set(int(s) for s in stop_token_ids)

    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = model(prompt, cache=cache, last_only=True)[:, -1]
        state.timings["prefill_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(max_new_tokens):
            if cache.length >= capacity:
                break
            for p in processors:
                logits = p(state, logits)
            params = sampling(state) if callable(sampling) else sampling
            token = int(sample(logits[:1], params, generator, state.history)[0])
            state.generated.append(token)
            state.history = torch.cat([state.history, torch.tensor([[token]])], dim=1)
            state.timings["decode_s"] = time.perf_counter() - t1
            yield token
            if token in stops or len(state.generated) >= max_new_tokens or cache.length >= capacity:
                break
            nxt = torch.full((B, 1), token, dtype=torch.long, device=prompt.device)
            logits = model(nxt, cache=cache)[:, -1]
        state.timings["decode_s"] = time.perf_counter() - t1
