"""Tensor parallelism on torch.distributed: a model's weights split over ranks, Megatron-style (plan.py, shard.py),
the collectives between them (group.py, modules.py), and the ranks kept in step (lockstep.py)."""

from .group import RankLost, Ranks, join, leave, under_torchrun
from .lockstep import follow, leading

__all__ = ["RankLost", "Ranks", "follow", "join", "leading", "leave", "under_torchrun"]
