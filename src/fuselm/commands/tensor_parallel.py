"""Commands under torchrun: the model is sharded over the ranks; rank 0 runs the command (terminal, HTTP server,
output files) and every forward pass it makes is run by the other ranks too, which do nothing else.

    torchrun --nproc-per-node 2 -m fuselm generate model.gguf -p "..."

Rank 0 sends each load (path and options) to the others, so a command may load more than one model (an
evaluation's probe, then the model with RoPE scaling); every rank must load it, or all of them stop.
"""

from __future__ import annotations

import contextlib
import os
import sys

from ..errors import FuselmError
from ..parallel import Ranks, follow, join, leading, leave, under_torchrun

_ranks: Ranks | None = None
_leading: contextlib.ExitStack | None = None


def quiet_followers() -> None:
    """Only rank 0 writes to stdout (call first thing in main)."""
    if under_torchrun() and os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


def load_for_command(path, **options):
    """fuselm.load for a command. Under torchrun only rank 0 returns; the other ranks load what rank 0 loads and
    follow its forward passes, and exit when it is done (or with an error naming the lost rank)."""
    from .. import load

    global _ranks, _leading
    if not under_torchrun():
        return load(path, **options)
    _ranks = ranks = join()
    if not ranks.leader:
        _follow_commands(ranks)
    _stop_leading()
    ranks.broadcast_object((str(path), options))
    model = _load_on_every_rank(ranks, str(path), options)
    _leading = contextlib.ExitStack()
    _leading.enter_context(leading(model.transformer, ranks))
    return model


def release_followers() -> None:
    """Rank 0, at the end of a command (also after an error): let the followers exit."""
    global _ranks
    if _ranks is None or not _ranks.leader:
        return
    _stop_leading()
    ranks, _ranks = _ranks, None
    with contextlib.suppress(FuselmError):  # a follower already gone has nothing left to release
        ranks.broadcast_object(None)


def _stop_leading() -> None:
    global _leading
    if _leading is not None:
        stack, _leading = _leading, None
        stack.close()


def _load_on_every_rank(ranks: Ranks, path: str, options: dict):
    from .. import load

    model, error = None, None
    try:
        model = load(path, tensor_parallel=True, group=ranks.group, **options)
    except FuselmError as err:
        error = err
    if not ranks.all_agree(error is None):
        if error is not None:
            raise error
        raise FuselmError(f"{path}: another tensor-parallel rank could not load the model (see its error)")
    return model


def _follow_commands(ranks: Ranks) -> None:
    while True:
        request = ranks.broadcast_object()
        if request is None:  # released: close the group, then end without the interpreter's teardown, where a
            leave()  # gloo thread still letting go of a finished collective can abort the process (seen under load)
            sys.stderr.flush()
            os._exit(0)
        path, options = request
        model = _load_on_every_rank(ranks, path, options)
        follow(model.transformer, ranks)
        del model
