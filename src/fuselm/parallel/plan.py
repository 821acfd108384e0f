"""Which part of each weight a tensor-parallel rank holds (Megatron's split), from the config alone.

- q rows by query heads; k and v rows by the KV heads those queries read (split when the KV heads divide over the
  ranks, otherwise each rank holds the ones it needs: Falcon-7B's single KV head on every rank);
- o and down by input columns (one all-reduce after each); when a quantized tensor's column split would cut a
  GGML block, that tensor is split by output rows instead, with its input and output gathered;
- gate and up rows by feed-forward features, on block boundaries of the down weights where possible;
- embedding and lm_head rows by vocabulary; norms everywhere;
- qk-norm rows by the heads they cover: with G groups over G ranks a rank holds exactly its group's row.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import FuselmError


def split_even(total: int, parts: int, unit: int = 1) -> list[range]:
    """`total` items (a multiple of `unit`) in `parts` consecutive ranges of whole units, as even as possible."""
    units = total // unit
    base, extra = divmod(units, parts)
    out, start = [], 0
    for p in range(parts):
        size = (base + (p < extra)) * unit
        out.append(range(start, start + size))
        start += size
    return out


def split_ceil(total: int, parts: int) -> list[range]:
    """Consecutive ranges of ceil(total/parts) (the last ones shorter or empty): equal pieces to gather."""
    size = -(-total // parts)
    return [range(min(p * size, total), min((p + 1) * size, total)) for p in range(parts)]


def _group_rows(heads: list[int], total_heads: int, groups: int) -> list[int]:
    """The qk-norm weight rows for these heads: one per group they span when each group is covered alike
    (a rank of G ranks over G groups holds exactly its group's row), else one per head."""
    per_group = total_heads // groups
    of_head = [h // per_group for h in heads]
    unique = list(dict.fromkeys(of_head))
    run = len(heads) // len(unique)
    if len(heads) % len(unique) == 0 and of_head == [g for g in unique for _ in range(run)]:
        return unique
    return of_head


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    world: int
    q_heads: range  # this rank's query heads
    kv_heads: tuple[int, ...]  # the KV heads this rank holds, in its local order
    ffn: range  # this rank's feed-forward features (gate/up rows, down columns)
    ffn_splits: tuple[range, ...]  # every rank's, for gathering uneven pieces
    vocab: range  # this rank's embedding / lm_head rows
    vocab_splits: tuple[range, ...]
    q_norm_rows: tuple[int, ...]  # rows of the (groups, head_dim) qk-norm weights
    k_norm_rows: tuple[int, ...]
    config: ModelConfig  # this rank's shapes

    @property
    def head_dim(self) -> int:
        return self.config.head_dim


def plan_shards(config: ModelConfig, rank: int, world: int, *, qk_norm_groups: tuple[int, int] | None = None,
                ffn_unit: int = 1) -> ShardPlan:
    """The plan for `rank` of `world`. ffn_unit: feed-forward features are split in whole multiples of it (the
    largest GGML block of the down weights) when there are at least `world` of them."""
    c = config
    if world < 1 or not 0 <= rank < world:
        raise FuselmError(f"tensor parallel: rank {rank} of {world} is not a valid rank")
    H, KV = c.num_attention_heads, c.num_key_value_heads
    if H % world:
        raise FuselmError(f"tensor parallel: the model's {H} attention heads do not split over {world} ranks; "
                          f"use a number of ranks that divides {H}")
    h = H // world
    q_heads = range(rank * h, (rank + 1) * h)
    # the KV heads these queries read, each once when they share them evenly (GQA kept), else one per query head
    kv_heads = tuple(_group_rows(list(q_heads), H, KV))
    unit = ffn_unit if c.intermediate_size // max(ffn_unit, 1) >= world and c.intermediate_size % ffn_unit == 0 \
        else 1
    ffn_splits = tuple(split_even(c.intermediate_size, world, unit))
    if any(len(r) == 0 for r in ffn_splits):
        raise FuselmError(f"tensor parallel: a feed-forward width of {c.intermediate_size} does not split over "
                          f"{world} ranks")
    vocab_splits = tuple(split_ceil(c.vocab_size, world))
    if any(len(r) == 0 for r in vocab_splits):
        raise FuselmError(f"tensor parallel: a vocabulary of {c.vocab_size} does not split over {world} ranks")
    q_rows = k_rows = ()
    if c.qk_norm:
        qg, kg = qk_norm_groups or (H, KV)
        q_rows = tuple(_group_rows(list(q_heads), H, qg))
        k_rows = tuple(_group_rows(list(kv_heads), KV, kg))
    local = c.replace(num_attention_heads=h, num_key_value_heads=len(kv_heads),
                      intermediate_size=len(ffn_splits[rank]), vocab_size=len(vocab_splits[rank]))
    return ShardPlan(rank=rank, world=world, q_heads=q_heads, kv_heads=kv_heads, ffn=ffn_splits[rank],
                     ffn_splits=ffn_splits, vocab=vocab_splits[rank], vocab_splits=vocab_splits,
                     q_norm_rows=q_rows, k_norm_rows=k_rows, config=local)
