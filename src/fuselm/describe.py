"""`fuselm inspect`: what a checkpoint is, without running it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .load import DEMO_DIR


def _fmt_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def describe(path: str | Path, verbose: bool = False) -> str:
    from . import load

    model = load(path)
    c = model.config
    lines = [
        f"model:        {model.source}",
        f"file type:    {model.file_type}",
        f"architecture: {c.arch} ({c.block_kind}, {c.norm_kind} norm, {c.mlp_kind} MLP"
        f"{', qk-norm' if c.qk_norm else ''}{', FlashNorm-folded' if c.flashnorm else ''})",
        f"layers:       {c.num_hidden_layers}, hidden {c.hidden_size}, MLP {c.intermediate_size}",
        f"heads:        {c.num_attention_heads} query, {c.num_key_value_heads} key/value, head_dim {c.head_dim}",
        f"vocab:        {c.vocab_size}, context {c.max_position_embeddings}, rope theta {c.rope_theta:g}"
        f"{', scaling ' + str(c.rope_scaling) if c.rope_scaling else ''}",
        f"embeddings:   {'tied' if c.tie_word_embeddings else 'untied'}",
        f"parameters:   {_fmt_count(model.num_parameters())}",
    ]
    kinds = Counter()
    tensors = []
    for name, p in model.transformer.state_dict().items():
        kinds[str(p.dtype).replace("torch.", "")] += p.numel()
        tensors.append((name, tuple(p.shape), str(p.dtype).replace("torch.", "")))
    lines.append("dtypes:       " + ", ".join(f"{k} {_fmt_count(v)}" for k, v in kinds.most_common()))
    if model.image_tokenizer is not None:
        it = model.image_tokenizer
        lines.append(f"images:       {it.size}x{it.size} -> {it.grid[0]}x{it.grid[1]} codes, "
                     f"codebook {it.vqgan.config.num_embeddings}, decoder {'yes' if it.can_decode else 'no'}")
    if model.tokenizer is not None:
        lines.append(f"tokenizer:    {model.tokenizer.vocab_size} tokens, chat template "
                     f"{'yes' if model.tokenizer.chat_template else 'built-in'}")
    if verbose:
        lines.append("tensors:")
        lines += [f"  {n:<48} {str(s):<16} {t}" for n, s, t in sorted(tensors)]
    return "\n".join(lines)


__all__ = ["describe", "DEMO_DIR"]
