"""qk-norm layouts: per head (HF, shape (heads, head_dim)) and grouped (Lumina-mGPT, shape (groups, head_dim)).

Chameleon's qk-norm is a LayerNorm over head_dim whose gain and bias were trained once per model-parallel rank,
so the heads of one rank share them. HF copies them to every head, which lets them drift apart during
fine-tuning; Lumina-mGPT keeps one row per group and expands with repeat_interleave at run time.

Group convention (Lumina-mGPT's): group g of the q norm covers the heads g*H/G .. (g+1)*H/G - 1, the heads of
model-parallel rank g. The k norm uses the same G over the key/value heads, capped at num_key_value_heads
(a GQA model with fewer kv heads than groups keeps one k row per kv head). The group counts of a checkpoint are
always read from the weights' first dimension, never assumed: Meta ships the 30B as 4 shards although its card
says 8-way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..config import ModelConfig
from ..errors import FuselmError

HELP_REGROUP_QKNORM = """\
Regroup the qk-norm weights of a Chameleon-style checkpoint.

HF stores one qk-norm gain/bias row per attention head, shape (heads, head_dim). Chameleon was trained with one
row per model-parallel rank, and Lumina-mGPT stores exactly that, shape (groups, head_dim), so fine-tuning cannot
let heads of one group drift apart. This command converts between the two layouts:

  --groups G        heads are split into G consecutive groups (q: num_attention_heads/G heads each; k: the same
                    G over the key/value heads, capped at num_key_value_heads). G must divide the head counts.
  --groups per-head expand grouped weights back to one row per head (exact; loads in stock transformers).

Regrouping refuses when the heads of one group differ, and prints the largest deviation; --average replaces
each group by its mean instead (the model then changes by about that deviation). The round trip
grouped -> per-head -> grouped is exact. Grouped checkpoints load in fuselm and Lumina-mGPT, not in stock
transformers (its Chameleon expects one row per head).

Examples:
  fuselm regroup-qknorm chameleon-7b-hf out/ --groups 1
  fuselm regroup-qknorm lumina-34b out/ --groups per-head
  fuselm regroup-qknorm finetuned-7b out/ --groups 1 --average
"""
HELP_REGROUP_GROUPS = "number of groups G (1 for the 7B, the shard count for larger models), or 'per-head'"
HELP_REGROUP_AVERAGE = "average heads that differ within a group instead of refusing (changes the model slightly)"

_QK_NORM = re.compile(r"layers\.(\d+)\.attn\.(q|k)_norm\.(weight|bias)")


def _heads(config: ModelConfig, which: str) -> int:
    return config.num_attention_heads if which == "q" else config.num_key_value_heads


def _check_rows(name: str, t: torch.Tensor, head_dim: int) -> None:
    if t.dim() != 2 or t.shape[1] != head_dim:
        raise FuselmError(f"tensor {name!r} has shape {list(t.shape)}, expected (heads or groups, {head_dim})")


def expand_heads(t: torch.Tensor, heads: int, *, name: str = "qk-norm") -> torch.Tensor:
    """(groups, head_dim) -> (heads, head_dim); each group's row repeated for its consecutive heads."""
    groups = t.shape[0]
    if groups == 0 or heads % groups:
        raise FuselmError(f"tensor {name!r} has {groups} rows, which do not divide {heads} heads into equal groups")
    return t if groups == heads else t.repeat_interleave(heads // groups, dim=0)


def group_spread(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-group max |difference| between heads of the group, shape (groups,). t is (heads, head_dim)."""
    g = t.float().reshape(groups, t.shape[0] // groups, -1)
    return (g.amax(dim=1) - g.amin(dim=1)).amax(dim=1)


def group_heads(t: torch.Tensor, groups: int, *, name: str = "qk-norm", average: bool = False) -> torch.Tensor:
    """(heads, head_dim) -> (groups, head_dim). Refuses when heads of a group differ, unless average."""
    heads = t.shape[0]
    if groups <= 0 or heads % groups:
        raise FuselmError(f"tensor {name!r}: {heads} heads do not split into {groups} equal groups")
    grouped = t.reshape(groups, heads // groups, *t.shape[1:])
    if average:
        return grouped.float().mean(dim=1).to(t.dtype)
    spread = group_spread(t, groups)
    worst = int(spread.argmax())
    if float(spread[worst]) > 0:
        raise FuselmError(
            f"tensor {name!r}: the heads of group {worst} (heads {worst * (heads // groups)}.."
            f"{(worst + 1) * (heads // groups) - 1}) differ, max deviation {float(spread[worst]):.6g}; "
            f"grouping them would change the model. Pass average=True (--average) to use each group's mean")
    return grouped[:, 0].clone()  # all rows equal: the first is exact


def qknorm_groups(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """(q groups, k groups) read from the qk-norm weights' first dimension; None when there is no qk-norm.

    Every layer and both weight and bias must agree; a mismatch names the tensor.
    """
    found: dict[str, tuple[int, str]] = {}
    for name, t in state_dict.items():
        m = _QK_NORM.fullmatch(name)
        if not m:
            continue
        which = m.group(2)
        if t.dim() != 2:
            raise FuselmError(f"tensor {name!r} has shape {list(t.shape)}, expected (heads or groups, head_dim)")
        rows = int(t.shape[0])
        if which in found and found[which][0] != rows:
            first_rows, first_name = found[which]
            raise FuselmError(f"tensor {name!r} has {rows} rows but {first_name!r} has {first_rows}; "
                              f"all {which}-norm tensors must use the same grouping")
        found.setdefault(which, (rows, name))
    if not found:
        return None
    if set(found) != {"q", "k"}:
        (have, (_, example)), = found.items()
        raise FuselmError(f"state dict has {example!r} but no {'k' if have == 'q' else 'q'}_norm tensors")
    return found["q"][0], found["k"][0]


def expand_qknorm(config: ModelConfig, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any grouping -> one row per head (HF's layout). Exact (rows are copied)."""
    out = dict(state_dict)
    for name, t in state_dict.items():
        m = _QK_NORM.fullmatch(name)
        if m:
            _check_rows(name, t, config.head_dim)
            out[name] = expand_heads(t, _heads(config, m.group(2)), name=name)
    return out


def qknorm_group_counts(config: ModelConfig, groups: int) -> tuple[int, int]:
    """(q groups, k groups) for a requested G: k uses min(G, num_key_value_heads). Both must divide evenly."""
    k_groups = min(groups, config.num_key_value_heads)
    if groups <= 0 or config.num_attention_heads % groups:
        raise FuselmError(f"--groups {groups} must divide num_attention_heads ({config.num_attention_heads})")
    if config.num_key_value_heads % k_groups:
        raise FuselmError(f"--groups {groups} gives {k_groups} key groups, which must divide "
                          f"num_key_value_heads ({config.num_key_value_heads})")
    return groups, k_groups


def qknorm_max_deviation(config: ModelConfig, state_dict: Mapping[str, torch.Tensor], groups: int) -> float:
    """Largest difference between two heads of one group over all qk-norm tensors (0.0: grouping is exact)."""
    counts = dict(zip("qk", qknorm_group_counts(config, groups)))
    worst = 0.0
    for name, t in expand_qknorm(config, state_dict).items():
        m = _QK_NORM.fullmatch(name)
        if m:
            worst = max(worst, float(group_spread(t, counts[m.group(2)]).max()))
    return worst


def regroup_qknorm(config: ModelConfig, state_dict: Mapping[str, torch.Tensor], groups: int, *,
                   average: bool = False) -> dict[str, torch.Tensor]:
    """Any qk-norm layout -> grouped (G, head_dim) for q and (min(G, kv heads), head_dim) for k.

    Refuses (FuselmError with the max deviation) when heads in one group differ, unless average=True.
    """
    if not config.qk_norm:
        raise FuselmError("this model has no qk-norm (only Chameleon-style models do); nothing to regroup")
    counts = dict(zip("qk", qknorm_group_counts(config, groups)))
    out = expand_qknorm(config, state_dict)
    for name in list(out):
        m = _QK_NORM.fullmatch(name)
        if m:
            out[name] = group_heads(out[name], counts[m.group(2)], name=name, average=average)
    return out
