"""Attention over the KV cache for one forward step: which keys each query sees, per row.

Rows of one batch may sit at different positions (a length per cache row). When every row has the same length
the whole batch runs as one SDPA call with one mask, as a single sequence would; otherwise each row attends
over exactly its own keys, so a row's result never depends on what else is in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quants.decode_ops import decode_attend
from .cache import KVCache, LayerCache


def visible_keys(start: int, T: int, pad: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [B, 1, T, start+T] for queries at slots start.. of rows left-padded by `pad`: causal, minus the
    padding (a padded query sees itself), minus keys further back than the sliding window."""
    keys = torch.arange(start + T, device=pad.device)
    queries = torch.arange(start, start + T, device=pad.device)
    causal = keys[None, :] <= queries[:, None]
    if window is not None:
        causal = causal & (keys[None, :] > queries[:, None] - window)
    not_pad = keys[None, None, :] >= pad[:, None, None]
    itself = keys[None, :] == queries[:, None]
    return ((causal[None] & not_pad) | itself[None])[:, None]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                     gqa: bool) -> torch.Tensor:
    """Full causal self-attention without a cache (banded when the sequence is longer than the window)."""
    T = q.shape[2]
    if window is not None and T > window:
        mask = visible_keys(0, T, torch.zeros(1, dtype=torch.long, device=q.device), window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)


class CacheStep:
    """What every layer of one cached forward needs: the rows, where each row's new tokens go, and the masks."""

    def __init__(self, cache: KVCache, T: int, rows: torch.Tensor | None, window: int | None):
        self.cache, self.T, self.rows, self.window = cache, T, rows, window
        self.starts = cache.lengths if rows is None else cache.lengths[rows]
        self.cache_rows = torch.arange(cache.batch) if rows is None else rows  # each batch row's cache row
        self.pad = cache.pad if rows is None else cache.pad[rows]
        same = bool((self.starts == self.starts[0]).all())
        self.uniform = int(self.starts[0]) if same and rows is None else None
        self.mask = None
        if self.uniform is not None:
            start = self.uniform
            crosses_window = window is not None and start + T > window
            if T > 1 or bool((self.pad > 0).any()) or crosses_window:
                self.mask = visible_keys(start, T, self.pad, window)

    def attend_native(self, layer: LayerCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One new position per row (T = 1), float32: q [B, H, D], k and v [B, G, D] before RoPE; RoPE, the cache
        write and attention over each row's own keys in one native call. Returns [B, H * D]."""
        return decode_attend(q, k, v, cos, sin, layer.k, layer.v, self.cache_rows, self.starts, self.pad,
                             self.window)

    def positions(self) -> torch.Tensor:
        """RoPE positions: [T] when every row starts at the same unpadded position, else [B, T]."""
        offsets = torch.arange(self.T)
        if self.uniform is not None and not bool((self.pad > 0).any()):
            return offsets + self.uniform
        return (self.starts[:, None] + offsets[None, :] - self.pad[:, None]).clamp(min=0)

    @property
    def longest(self) -> int:
        return int(self.starts.max()) + self.T

    def attend(self, layer: LayerCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               gqa: bool) -> torch.Tensor:
        layer.write(k, v, self.rows, self.starts, self.uniform)
        T = self.T
        if self.uniform is not None:
            end = self.uniform + T
            return F.scaled_dot_product_attention(q, layer.k[:, :, :end], layer.v[:, :, :end], attn_mask=self.mask,
                                                  enable_gqa=gqa)
        rows = range(q.shape[0]) if self.rows is None else self.rows.tolist()
        out = []
        for i, row in enumerate(rows):
            start, pad = int(self.starts[i]), int(self.pad[i])
            end = start + T
            if T == 1:  # exactly this row's keys: no mask, the same call as the row decoding alone
                lo, mask = (pad if self.window is None else max(pad, end - self.window)), None
            else:
                lo, mask = 0, visible_keys(start, T, self.pad[i:i + 1], self.window)
            out.append(F.scaled_dot_product_attention(q[i:i + 1], layer.k[row:row + 1, :, lo:end],
                                                      layer.v[row:row + 1, :, lo:end], attn_mask=mask,
                                                      enable_gqa=gqa))
        return torch.cat(out)

    def advance(self) -> None:
        if self.rows is None:
            self.cache.lengths += self.T
        else:
            self.cache.lengths[self.rows] += self.T
