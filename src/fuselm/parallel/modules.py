"""The modules where a tensor-parallel rank meets the others: each wraps this rank's piece of one weight.

ReduceSum       o and down split by input columns: every rank's partial product, summed (one all-reduce)
GatherRows      o or down split by output rows (a block-cut fallback): the input gathered, the output gathered
VocabEmbedding  embedding rows split by vocabulary: a rank looks up its own ids, the ranks' vectors summed
VocabHead       lm_head rows split by vocabulary: the full [.., vocab] logits on every rank
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .group import Ranks


def _gather_uneven(ranks: Ranks, x: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
    """Concatenate along the last dim pieces of the given widths (padded to the widest for the collective)."""
    widest = max(widths)
    if x.shape[-1] < widest:
        x = F.pad(x, (0, widest - x.shape[-1]))
    gathered = ranks.all_gather(x, dim=-1)
    if all(w == widest for w in widths):
        return gathered
    return torch.cat([gathered[..., i * widest: i * widest + w] for i, w in enumerate(widths)], dim=-1)


class ReduceSum(nn.Module):
    def __init__(self, inner: nn.Module, ranks: Ranks):
        super().__init__()
        self.inner, self.ranks = inner, ranks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ranks.all_reduce(self.inner(x).contiguous())


class GatherRows(nn.Module):
    def __init__(self, inner: nn.Module, ranks: Ranks, in_widths: Sequence[int], out_widths: Sequence[int]):
        super().__init__()
        self.inner, self.ranks = inner, ranks
        self.in_widths, self.out_widths = tuple(in_widths), tuple(out_widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        whole = _gather_uneven(self.ranks, x, self.in_widths)
        return _gather_uneven(self.ranks, self.inner(whole), self.out_widths)


class VocabEmbedding(nn.Module):
    def __init__(self, inner: nn.Module, ranks: Ranks, start: int, rows: int):
        super().__init__()
        self.inner, self.ranks, self.start, self.rows = inner, ranks, start, rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.rows)
        x = self.inner(torch.where(mine, local, torch.zeros_like(local)))
        x = torch.where(mine[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        return self.ranks.all_reduce(x.contiguous())


class VocabHead(nn.Module):
    def __init__(self, inner: nn.Module, ranks: Ranks, rows: Sequence[int]):
        super().__init__()
        self.inner, self.ranks, self.rows = inner, ranks, tuple(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _gather_uneven(self.ranks, self.inner(x), self.rows)
