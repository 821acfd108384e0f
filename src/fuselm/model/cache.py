"""KV cache with fixed buffers, written by position: prefill + step decode equals one full forward."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import FuselmError


class LayerCache:
    """One layer's K and V buffers [B, H_kv, capacity, D]; `owner.length` says how many positions are filled."""

    def __init__(self, owner: KVCache, k: torch.Tensor, v: torch.Tensor):
        self.owner, self.k, self.v = owner, k, v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.owner.length
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Per-model cache. `pad` holds each row's count of left-padding positions (for batched prompts of
    different lengths, e.g. classifier-free guidance rows); padded keys are never attended to."""

    def __init__(self, config: ModelConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if capacity > config.max_position_embeddings * 64:
            raise FuselmError(f"cache capacity {capacity} is unreasonably large for this model")
        shape = (batch, config.num_key_value_heads, capacity, config.head_dim)
        self.capacity, self.batch, self.length = capacity, batch, 0
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.layers = [LayerCache(self, torch.zeros(shape, dtype=dtype, device=device),
                                  torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(config.num_hidden_layers)]

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.capacity:
            raise FuselmError(
                f"sequence of {self.length + new_tokens} tokens exceeds the cache capacity of {self.capacity}")

    def rewind(self, length: int) -> None:
        """Forget positions from `length` on (the buffers are reused)."""
        self.length = length

    def select_rows(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.k, layer.v = layer.k[rows], layer.v[rows]
        self.pad = self.pad[rows]
        self.batch = int(rows.numel())
