"""Little-endian bit fields: unpack bytes into 0/1 flags (packing uses numpy.packbits, bitorder="little")."""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., k] -> uint8 [..., 8k] of 0/1; flag 8j + i is bit i of byte j."""
    return ((packed.unsqueeze(-1) >> _SHIFTS) & 1).reshape(*packed.shape[:-1], -1)
