"""CPU threads: how many (the --threads option of every command) and how an idle one waits.

torch's intra-op pool and fuselm's kernels share one OpenMP runtime (libgomp). By default a libgomp thread
that runs out of work spins for a while before it sleeps. On a machine where another process holds a core,
the spinning thread competes with that process for the core, the scheduler stops favouring it, and every
parallel region then waits a time slice for it: decode fell 10-25x with 2 threads (see DESIGN.md). Passive
waiting (sleep at once) lets a woken thread run as soon as it has work, and the kernels hand out work in small
chunks on demand, so the thread on the busy core simply takes less. libgomp reads its settings once, when it
is loaded, so `configure_openmp()` must run before torch is imported: fuselm/__init__.py calls it first.
A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT always wins.
"""

from __future__ import annotations

import os
import sys

from .errors import FuselmError

WAIT_POLICY = "PASSIVE"
USER_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def configure_openmp() -> bool:
    """Set passive OpenMP waiting for this process unless the user chose a policy. True when set here; False
    when the user's choice stands or torch (and with it libgomp) is already loaded, where it would not apply."""
    if any(k in os.environ for k in USER_KNOBS) or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    return True


def set_threads(n: int) -> None:
    import torch

    if not isinstance(n, int) or n < 1:
        raise FuselmError(f"--threads must be a positive integer, got {n!r}")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only settable before the first parallel op; intra-op threads are what matters
        pass
