"""Checkpoint transforms: pure functions over (ModelConfig, internal state dict).

flashnorm.py     FlashNorm fold (`fuselm flashify`) and the loader's rule for missing norm weights
qknorm.py        qk-norm per-head <-> grouped (`fuselm regroup-qknorm`)
"""

from .flashnorm import HELP_FLASHIFY, HELP_FLASHIFY_STRICT, check_flashnorm_state, flashify, fold_plan
from .qknorm import (
    HELP_REGROUP_AVERAGE,
    HELP_REGROUP_GROUPS,
    HELP_REGROUP_QKNORM,
    expand_qknorm,
    qknorm_group_counts,
    qknorm_groups,
    qknorm_max_deviation,
    regroup_qknorm,
)

__all__ = [
    "HELP_FLASHIFY", "HELP_FLASHIFY_STRICT", "HELP_REGROUP_AVERAGE", "HELP_REGROUP_GROUPS", "HELP_REGROUP_QKNORM",
    "check_flashnorm_state", "expand_qknorm", "flashify", "fold_plan", "qknorm_group_counts", "qknorm_groups",
    "qknorm_max_deviation", "regroup_qknorm",
]
