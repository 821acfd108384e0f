"""Little-endian bit fields: pack 0/1 flags into bytes and back."""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """flags [..., 8k] of 0/1 -> uint8 [..., k]; bit i of byte j is flags[..., 8j + i]."""
    f = flags.to(torch.uint8).reshape(*flags.shape[:-1], -1, 8)
    return (f << _SHIFTS).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., k] -> uint8 [..., 8k] of 0/1, the inverse of pack_bits."""
    return ((packed.unsqueeze(-1) >> _SHIFTS) & 1).reshape(*packed.shape[:-1], -1)
