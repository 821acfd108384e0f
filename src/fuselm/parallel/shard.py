"""Cut a model's weights to one rank's share (see plan.py), dense tensors and GGML bytes alike.

Rows are taken as views where they are contiguous (of a memory-mapped file: only this rank's pages are ever
read); column pieces are copies of whole GGML blocks. A quantized o or down weight whose column split would cut
a block is split by output rows instead (`gathered`): correct, never an error, and reported once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..quants.kernel_memory import drop_file_pages
from ..quants.tensor import QuantizedWeight
from .plan import ShardPlan, split_ceil

Weight = torch.Tensor | QuantizedWeight

# internal tensor name -> role; names not listed (norms) are the same on every rank
ROLES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), role) for p, role in (
    (r"(embed|lm_head)\.weight", "vocab"),
    (r"layers\.\d+\.attn\.q\.(weight|bias)", "q"),
    (r"layers\.\d+\.attn\.[kv]\.(weight|bias)", "kv"),
    (r"layers\.\d+\.mlp\.(gate|up)\.(weight|bias)", "ffn"),
    (r"layers\.\d+\.attn\.o\.(weight|bias)", "o"),
    (r"layers\.\d+\.mlp\.down\.(weight|bias)", "down"),
    (r"layers\.\d+\.attn\.q_norm\.(weight|bias)", "q_norm"),
    (r"layers\.\d+\.attn\.k_norm\.(weight|bias)", "k_norm"),
))


def role_of(name: str) -> str:
    for pattern, role in ROLES:
        if pattern.fullmatch(name):
            return role
    return "same"


@dataclass
class Shard:
    state: dict[str, torch.Tensor]  # this rank's dense tensors
    quantized: dict[str, QuantizedWeight]  # this rank's GGML weights
    gathered: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    # ^ module path split by output rows -> (every rank's input width, every rank's output rows)
    fallbacks: list[tuple[str, str, int]] = field(default_factory=list)  # (name, GGML type, block width) of those


def _rows(w: Weight, index: Sequence[int]) -> Weight:
    if isinstance(w, QuantizedWeight):
        return w.take_rows(index)
    if isinstance(index, range) and index.step == 1:
        return w.narrow(0, index.start, len(index))
    return w.index_select(0, torch.as_tensor(list(index), dtype=torch.long))


def _columns(w: Weight, cols: range) -> Weight:
    """These columns: GGML bytes as a strided view (the kernels repack it a few tiles at a time, then drop the
    file's pages), dense ones as a copy. Reading columns maps in every page of the rows (a page holds pieces of
    every rank's columns), so the source's file pages are dropped after the copy."""
    if isinstance(w, QuantizedWeight):
        return w.take_columns(cols.start, cols.stop)
    piece = w.narrow(1, cols.start, len(cols)).contiguous()
    drop_file_pages(w)
    return piece


def _heads(heads: Sequence[int], head_dim: int) -> list[int] | range:
    if isinstance(heads, range):
        return range(heads.start * head_dim, heads.stop * head_dim)
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def _splits_at_blocks(w: Weight, cols: range) -> bool:
    if not isinstance(w, QuantizedWeight):
        return True
    block = w.column_block_size()
    return cols.start % block == 0 and cols.stop % block == 0


def shard_weights(plan: ShardPlan, state: dict[str, torch.Tensor], quantized: dict[str, QuantizedWeight],
                  hidden_size: int) -> Shard:
    """This rank's share of every tensor (internal names; `state` and `quantized` hold the whole model's)."""
    p, hd = plan, plan.head_dim
    out = Shard({}, {})
    q_rows = _heads(p.q_heads, hd)
    kv = list(p.kv_heads)
    run = range(kv[0], kv[0] + len(kv))
    kv_rows = _heads(run if kv == list(run) else kv, hd)
    o_cols = range(p.q_heads.start * hd, p.q_heads.stop * hd)
    out_rows = split_ceil(hidden_size, p.world)
    weights: dict[str, Weight] = {**state, **quantized}
    # o and down: by columns (then one all-reduce) unless that cuts a GGML block
    layout: dict[str, str] = {}
    for name, w in weights.items():
        role = role_of(name)
        if role in ("o", "down") and name.endswith(".weight"):
            cols = o_cols if role == "o" else p.ffn
            if _splits_at_blocks(w, cols):
                layout[name[:-len(".weight")]] = "columns"
            else:
                path = name[:-len(".weight")]
                layout[path] = "rows"
                widths = tuple(len(o_cols) for _ in range(p.world)) if role == "o" else \
                    tuple(len(r) for r in p.ffn_splits)
                out.gathered[path] = (widths, tuple(len(r) for r in out_rows))
                out.fallbacks.append((name, w.qtype, w.column_block_size()))
    for name, w in weights.items():
        role = role_of(name)
        if role == "vocab":
            local = _rows(w, p.vocab)
        elif role == "q":
            local = _rows(w, q_rows)
        elif role == "kv":
            local = _rows(w, kv_rows)
        elif role == "ffn":
            local = _rows(w, p.ffn)
        elif role in ("o", "down"):
            path, _, kind = name.rpartition(".")
            if layout.get(path, "columns") == "rows":
                local = _rows(w, out_rows[p.rank])
            elif kind == "bias":  # added once: after the all-reduce it is in every rank's sum
                local = w if p.rank == 0 else torch.zeros_like(w)
            else:
                local = _columns(w, o_cols if role == "o" else p.ffn)
        elif role == "q_norm":
            local = _rows(w, list(p.q_norm_rows))
        elif role == "k_norm":
            local = _rows(w, list(p.k_norm_rows))
        else:
            local = w
        if isinstance(local, QuantizedWeight):
            out.quantized[name] = local
        else:
            out.state[name] = local
    return out
