"""The ranks of a tensor-parallel model: PyTorch's own process group (gloo on CPU, NCCL on CUDA), joined from
torchrun's environment or taken as the caller already initialized it, and the few collectives fuselm uses.

A collective that fails (a rank died, or stayed silent past the timeout) raises one RankLost error naming this
rank, instead of gloo's socket error from deep inside, so every surviving rank exits instead of hanging.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import datetime
import os
import pickle
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import FuselmError

TIMEOUT_ENV = "FUSELM_TP_TIMEOUT"  # seconds a rank waits in one collective before giving up
DEFAULT_TIMEOUT_S = 120.0
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankLost(FuselmError):
    """Another rank stopped answering: it died, or it was silent for longer than the timeout."""


def under_torchrun() -> bool:
    """True in a process that torchrun (or an equivalent launcher) started as one of several ranks."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise FuselmError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise FuselmError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return value


# The tensors of the last collectives, kept alive. Gloo's worker thread drops its own references to them a moment
# after the collective completes; if their Python objects are gone by then, that drop needs the GIL, and when it
# comes while the interpreter exits the process aborts ("terminate called without an active exception", seen
# on ranks exiting right after a collective under load).
_recent: collections.deque = collections.deque(maxlen=16)
_lost = threading.Event()  # a collective failed: at exit, no barrier would be met


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks; `group` None means the default process group."""

    rank: int
    world: int
    group: dist.ProcessGroup | None = None

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, in place (x must be contiguous)."""
        self._call("all_reduce", dist.all_reduce, x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x (same shape everywhere) concatenated along `dim`."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self._call("all_gather", dist.all_gather, parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x, written into x on every rank."""
        self._call("broadcast", dist.broadcast, x, src=0, group=self.group)
        return x

    def broadcast_object(self, value=None):
        """Rank 0's picklable `value` (only ever built by our own rank 0: a command's load request), sent in
        tensors of our own (dist.broadcast_object_list's view the pickle's Python bytes; see _recent)."""
        size = torch.zeros(1, dtype=torch.long)
        if self.leader:
            payload = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8).clone()
            size[0] = payload.numel()
        self._call("broadcast", dist.broadcast, size, src=0, group=self.group)
        if not self.leader:
            payload = torch.empty(int(size[0]), dtype=torch.uint8)
        self._call("broadcast", dist.broadcast, payload, src=0, group=self.group)
        return value if self.leader else pickle.loads(payload.numpy().tobytes())

    def all_agree(self, ok: bool) -> bool:
        """True when `ok` holds on every rank."""
        flag = torch.tensor([0 if ok else 1], dtype=torch.long)
        return int(self.all_reduce(flag)[0]) == 0

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        _recent.append(args)
        try:
            fn(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as err:
            _lost.set()
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RankLost(f"tensor parallel rank {self.rank} of {self.world}: {what} failed, another rank died "
                           f"or stopped answering (timeout {timeout_s():g} s, {TIMEOUT_ENV}): {first}") from None


def _exit_with_launcher(every_s: float = 1.0) -> None:
    """torchrun starts each rank in a session of its own, so a launcher that is killed leaves its ranks running
    (a server on rank 0 would serve forever): a rank whose launcher is gone ends itself with SIGTERM."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(every_s)
        print(f"tensor parallel rank {os.environ.get('RANK', '?')}: torchrun (pid {launcher}) is gone; stopping",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="fuselm-tp-launcher-watch").start()


def leave() -> None:
    """Close the default process group (if open); a rank calls it once it has nothing left to exchange."""
    if dist.is_initialized():
        if not _lost.is_set():
            with contextlib.suppress(RuntimeError, dist.DistBackendError):
                dist.barrier()  # every collective before it is complete on every rank
        dist.destroy_process_group()


def join(group: dist.ProcessGroup | None = None) -> Ranks:
    """The ranks to shard over: `group`, else the default process group when the caller initialized one, else
    one initialized now from torchrun's environment (gloo on CPU, NCCL when CUDA is available)."""
    if group is None and not dist.is_initialized():
        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        if missing:
            raise FuselmError("tensor_parallel=True needs an initialized torch.distributed process group or "
                              f"torchrun's environment; {', '.join(missing)} not set (launch with torchrun "
                              "--nproc-per-node N ...)")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
        except (RuntimeError, ValueError, dist.DistError) as err:
            raise FuselmError(f"cannot join the tensor-parallel ranks at {os.environ['MASTER_ADDR']}:"
                              f"{os.environ['MASTER_PORT']} as rank {os.environ['RANK']}: {err}") from None
        # ours to close: a process group still open when the interpreter exits can abort in its destructor
        atexit.register(leave)
        if "TORCHELASTIC_RUN_ID" in os.environ:
            _exit_with_launcher()
    return Ranks(dist.get_rank(group), dist.get_world_size(group), group)
