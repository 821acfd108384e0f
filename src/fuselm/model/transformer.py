"""The one Transformer for llama, chameleon and falcon, switched by ModelConfig. It never parses files."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from ..config import ModelConfig
from ..config.rope import RopeSpec, normalize_rope_scaling, rope_frequencies
from .attention import CacheStep
from .cache import KVCache
from .layers import Block, make_norm
from .rope import rope_cos_sin

Forward = Callable[..., torch.Tensor]  # Transformer.run


class Coordinator(Protocol):
    """How one rank of a tensor-parallel model keeps in step with the others (fuselm.parallel implements it)."""

    def forward(self, run: Forward, tokens: torch.Tensor, cache: KVCache | None, last_only: bool,
                rows: torch.Tensor | None) -> torch.Tensor: ...

    def agree(self, token: int) -> int: ...


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, qk_norm_groups: tuple[int, int] | None = None):
        super().__init__()
        self.config = config  # the model's config (a tensor-parallel rank still reports the whole model's)
        self.shape_config = config  # this process's shapes: fewer heads and features on a tensor-parallel rank
        self.coordinator: Coordinator | None = None  # set on tensor-parallel ranks
        # On the meta device (the loaders) the random init is skipped: there normal_() imports torch._dynamo,
        # ~70 MB of resident memory. Elsewhere it stays, so seeded training draws the same numbers.
        shape = (config.vocab_size, config.hidden_size)
        meta = torch.empty(0).is_meta
        self.embed = nn.Embedding(*shape, _weight=torch.empty(shape) if meta else None)
        self.layers = nn.ModuleList(Block(config, qk_norm_groups) for _ in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.rope = RopeSpec(head_dim=config.head_dim, base=config.rope_theta,
                             max_position_embeddings=config.max_position_embeddings,
                             scaling=normalize_rope_scaling(config.rope_scaling))
        self._rope_cache: tuple[int | None, torch.Tensor, float] | None = None
        self.compute_dtype: torch.dtype = torch.float32  # activations and KV cache; set by model.build

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def _frequencies(self, seq_len: int) -> tuple[torch.Tensor, float]:
        # Only dynamic NTK depends on the length; everything else is computed once.
        dynamic = (self.rope.scaling or {}).get("rope_type") == "dynamic"
        key = seq_len if dynamic else None
        if self._rope_cache is None or self._rope_cache[0] != key:
            inv_freq, factor = rope_frequencies(self.rope, seq_len if dynamic else None)
            self._rope_cache = (key, inv_freq, factor)
        return self._rope_cache[1], self._rope_cache[2]

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty KV cache for `batch` rows of `capacity` positions, in this process's shapes and dtype."""
        return KVCache(self.shape_config, batch, capacity, dtype=self.compute_dtype, device=self.device)

    def agree(self, token: int) -> int:
        """A sampled token, made the same on every tensor-parallel rank (rank 0's); itself in one process."""
        return token if self.coordinator is None else self.coordinator.agree(token)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> float32 logits [B, T, vocab] (or [B, 1, vocab] with last_only).

        Without a cache this is a full causal forward. With one, row b's tokens continue the sequence in cache row
        `rows[b]` (default: row b) at that row's own length; rows may sit at different positions.
        """
        if self.coordinator is None:
            return self.run(tokens, cache, last_only, rows)
        if cache is not None:  # refused here, before any rank starts a pass that this one would not finish
            cache.check_room(tokens.shape[1], None if rows is None else torch.as_tensor(rows).reshape(-1))
        return self.coordinator.forward(self.run, tokens, cache, last_only, rows)

    def run(self, tokens: torch.Tensor, cache: KVCache | None, last_only: bool,
            rows: torch.Tensor | None) -> torch.Tensor:
        """The forward pass itself (on a tensor-parallel rank, its collectives must run on every rank at once)."""
        B, T = tokens.shape
        step = None
        if cache is not None:
            if rows is not None:
                rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
            cache.check_room(T, rows)
            step = CacheStep(cache, T, rows, self.config.sliding_window)
            positions = step.positions().to(tokens.device)
            inv_freq, attn_factor = self._frequencies(step.longest)
        else:
            positions = torch.arange(T, device=tokens.device)
            inv_freq, attn_factor = self._frequencies(T)
        x = self.embed(tokens)
        cos, sin = rope_cos_sin(inv_freq.to(tokens.device), positions, attn_factor, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if step is None else (step, cache.layers[i]))
        if step is not None:
            step.advance()
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if self.lm_head is None:
            logits = x @ self.embed.weight.T
        else:
            logits = self.lm_head(x)
        return logits.float()
