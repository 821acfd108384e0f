"""KV cache with fixed buffers and a length per row, so one batch can hold sequences at different positions.

Row b holds `lengths[b]` filled slots, of which the first `pad[b]` are left padding (never attended to; RoPE
positions count from the row's first real slot). A sequence joins by resetting a free row and prefilling it
alone (`rows=`), and leaves by resetting its row; decode steps then run every row together.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import FuselmError


class LayerCache:
    """One layer's K and V buffers [B, H_kv, capacity, D]."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def write(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None, starts: torch.Tensor,
              uniform: int | None) -> None:
        """Store k, v [n, H, T, D] at each row's own start (the rows of `rows`, or all rows)."""
        T = k.shape[2]
        if uniform is not None and rows is None:
            self.k[:, :, uniform:uniform + T] = k
            self.v[:, :, uniform:uniform + T] = v
            return
        index = torch.arange(self.k.shape[0]) if rows is None else rows
        for i, (row, start) in enumerate(zip(index.tolist(), starts.tolist())):
            self.k[row, :, start:start + T] = k[i]
            self.v[row, :, start:start + T] = v[i]


class KVCache:
    def __init__(self, config: ModelConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if capacity > config.max_position_embeddings * 64:
            raise FuselmError(f"cache capacity {capacity} is unreasonably large for this model")
        shape = (batch, config.num_key_value_heads, capacity, config.head_dim)
        self.capacity, self.batch = capacity, batch
        self.lengths = torch.zeros(batch, dtype=torch.long)
        self.pad = torch.zeros(batch, dtype=torch.long)
        self.layers = [LayerCache(torch.zeros(shape, dtype=dtype, device=device),
                                  torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(config.num_hidden_layers)]

    @property
    def length(self) -> int:
        """The filled length when every row has the same (raises otherwise: use `lengths`)."""
        if self.batch and bool((self.lengths != self.lengths[0]).any()):
            raise FuselmError("internal error: the cache rows have different lengths; read cache.lengths")
        return int(self.lengths[0]) if self.batch else 0

    @length.setter
    def length(self, value: int) -> None:
        self.lengths.fill_(int(value))

    def check_room(self, new_tokens: int, rows: torch.Tensor | None = None) -> None:
        lengths = self.lengths if rows is None else self.lengths[rows]
        longest = int(lengths.max()) + new_tokens if lengths.numel() else new_tokens
        if longest > self.capacity:
            raise FuselmError(f"sequence of {longest} tokens exceeds the cache capacity of {self.capacity}")

    def reset_row(self, row: int, pad: int = 0) -> None:
        """Free a row for a new sequence (its old keys are never read again)."""
        self.lengths[row] = 0
        self.pad[row] = pad
