"""One place that sets how many CPU threads torch uses (the --threads option of every command)."""

from __future__ import annotations

import torch

from .errors import FuselmError


def set_threads(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise FuselmError(f"--threads must be a positive integer, got {n!r}")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only settable before the first parallel op; intra-op threads are what matter
        pass
