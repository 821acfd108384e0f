"""The decoded form of block-scaled GGML data: integer codes plus per-group float scales (and mins)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Unpacked(NamedTuple):
    """Weights as `w = scale * codes - min`, group by group along each row.

    codes: integer tensor [rows, cols]: uint8 for unsigned codes, int8 for signed codes (or IQ4 codebook values).
    scale: float32 [rows, cols // group]: the effective scale of each group (super-block d times its sub-scale).
    min:   float32 [rows, cols // group], or None for symmetric types. For Q4_1/Q5_1 it is -m (their stored m
           is added), so the one formula covers every type.
    group: elements per scale.

    `scale * codes.float() - min` in float32 reproduces gguf-py's dequantize bit for bit.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor | None
    group: int

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        q = self.codes.reshape(rows, cols // self.group, self.group).to(torch.float32)
        w = self.scale.unsqueeze(-1) * q
        if self.min is not None:
            w = w - self.min.unsqueeze(-1)
        return w.reshape(rows, cols)
