"""One tensor-parallel rank's Transformer: the whole model's tensors (memory-mapped, never all read) cut to this
rank's share (fuselm.parallel), built with this rank's shapes, and joined to the other ranks by the collective
modules. It reports the whole model's config and returns the whole model's logits."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import FuselmError
from ..model.build import all_finite, build_transformer, qk_norm_groups
from ..model.transformer import Transformer
from ..parallel.group import Ranks
from ..parallel.lockstep import Together
from ..parallel.modules import GatherRows, ReduceSum, VocabEmbedding, VocabHead
from ..parallel.plan import plan_shards
from ..parallel.shard import shard_weights
from .gguf import quantized_modules


def build_sharded(config: ModelConfig, state: dict[str, torch.Tensor], quantized: dict, ranks: Ranks, *,
                  dtype: torch.dtype, device: str, source: str,
                  display_name: Callable[[str], str] = str) -> Transformer:
    """`state` (dense, checked) and `quantized` (QuantizedWeight by internal name) hold the whole model."""
    from ..quants.kernels import QuantLinear

    downs = [w.column_block_size() for n, w in quantized.items() if n.endswith("mlp.down.weight")]
    plan = plan_shards(config, ranks.rank, ranks.world, qk_norm_groups=qk_norm_groups(config, state),
                       ffn_unit=max(downs, default=1))
    shard = shard_weights(plan, state, quantized, config.hidden_size)
    for name, t in shard.state.items():  # this rank's values only: no rank reads the whole file
        if t.is_floating_point() and not all_finite(t):
            raise FuselmError(f"{source}: tensor {display_name(name)!r} contains NaN or Inf values")
    if shard.fallbacks and ranks.leader:
        name, qtype, block = shard.fallbacks[0]
        print(f"tensor parallel: {len(shard.fallbacks)} weight(s) are split by output rows with a gather, because "
              f"splitting their input over {ranks.world} ranks would cut a GGML block (first: "
              f"{display_name(name)}, {qtype}, {block}-wide blocks)", file=sys.stderr)
    modules: dict[str, nn.Module | None] = {}
    for path, (in_widths, out_widths) in shard.gathered.items():
        inner = QuantLinear(shard.quantized.pop(path + ".weight"), _float(shard.state.pop(path + ".bias", None)))
        modules[path] = GatherRows(inner, ranks, in_widths, out_widths)
    local = plan.config
    quantized_mods, _ = quantized_modules(local, shard.state, shard.quantized, dtype)
    modules.update(quantized_mods)
    model = build_transformer(local, shard.state, dtype=dtype, device=device, modules=modules)
    for i, layer in enumerate(model.layers):
        if f"layers.{i}.attn.o" not in shard.gathered:
            layer.attn.o = ReduceSum(layer.attn.o, ranks)
        if f"layers.{i}.mlp.down" not in shard.gathered:
            layer.mlp.down = ReduceSum(layer.mlp.down, ranks)
    head = model.lm_head
    if head is None:  # tied: this rank's embedding rows are its lm_head rows
        head = nn.Linear(config.hidden_size, len(plan.vocab), bias=False, device="meta")
        head.weight = model.embed.weight
    model.embed = VocabEmbedding(model.embed, ranks, plan.vocab.start, len(plan.vocab))
    model.lm_head = VocabHead(head, ranks, [len(r) for r in plan.vocab_splits])
    model.config, model.shape_config = config, local
    model.coordinator = Together(ranks)
    return model


def _float(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.float()
