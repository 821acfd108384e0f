"""Token embeddings kept in GGML bytes: only the looked-up rows are dequantized (rows are independent blocks)."""

from __future__ import annotations

import torch
from torch import nn

from .codecs import dequantize
from .tensor import QuantizedWeight


class QuantizedEmbedding(nn.Module):
    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        self.weight = weight
        self.qtype = weight.qtype
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).cpu()
        rows = dequantize(self.weight.data[flat], self.qtype, (flat.numel(), self.embedding_dim))
        return rows.to(device=ids.device, dtype=self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"
