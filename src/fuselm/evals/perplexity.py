"""Sliding-window perplexity (Press et al.; the strided method of HF's perplexity guide and YaRN's eval).

Windows of `ctx` tokens start every `stride` tokens. Each window scores only the tokens no earlier window scored,
so every token from the second on is scored exactly once, with up to ctx - stride tokens of context the
previous window already saw. stride == ctx gives disjoint windows (a window's first token has no context and
is not scored); a smaller stride costs more forwards and gives each scored token more context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import FuselmError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood (nats) over the scored tokens
    scored_tokens: int
    windows: int
    ctx: int
    stride: int


def window_starts(n_tokens: int, ctx: int, stride: int) -> list[int]:
    """Start of every window: 0, stride, 2*stride, ... up to the first window that reaches the end."""
    starts = []
    for begin in range(0, n_tokens, stride):
        starts.append(begin)
        if begin + ctx >= n_tokens:
            break
    return starts


def sliding_window_perplexity(model, ids: torch.Tensor | Sequence[int], ctx: int, stride: int | None = None, *,
                              progress: bool = False) -> PerplexityResult:
    """exp(mean NLL) of `ids` (1-D) scored by windows of `ctx` tokens every `stride` (default ctx // 2).

    Runs the transformer directly, so ctx may exceed the model's context: that is what scaling is measured on.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    stride = max(1, ctx // 2) if stride is None else stride
    if not (isinstance(ctx, int) and ctx >= 2):
        raise FuselmError(f"perplexity --ctx is {ctx!r}; expected an integer >= 2")
    if not (isinstance(stride, int) and 1 <= stride <= ctx):
        raise FuselmError(f"perplexity --stride is {stride!r}; expected an integer in [1, ctx={ctx}]")
    if ids.numel() < 2:
        raise FuselmError(f"perplexity needs at least 2 tokens of text, got {ids.numel()}")
    transformer = model.transformer
    device = transformer.embed.weight.device
    starts = window_starts(ids.numel(), ctx, stride)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(starts), desc=f"perplexity ctx {ctx}", unit="window", leave=False, dynamic_ncols=True)
    nll, scored, prev_end = 0.0, 0, 0
    with torch.inference_mode():
        for begin in starts:
            end = min(begin + ctx, ids.numel())
            first = max(prev_end, begin + 1)  # the first token this window scores; it needs one token of context
            if first < end:
                window = ids[begin:end].to(device)
                logits = transformer(window[None])[0]
                # logits at position p predict token p + 1 (positions relative to the window)
                pred = logits[first - 1 - begin:end - 1 - begin].float()
                nll += float(F.cross_entropy(pred, window[first - begin:], reduction="sum").double())
                scored += end - first
            prev_end = end
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    mean = nll / scored
    return PerplexityResult(ppl=math.exp(mean), nll=mean, scored_tokens=scored, windows=len(starts), ctx=ctx,
                            stride=stride)


def encode_text_file(model, path: str | Path) -> torch.Tensor:
    """The file's UTF-8 text as token ids (with BOS when the tokenizer adds one)."""
    path = Path(path)
    if not path.is_file():
        raise FuselmError(f"{path}: no such text file")
    if model.tokenizer is None:
        raise FuselmError(f"{getattr(model, 'source', 'model')}: the model has no tokenizer to read {path} with")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FuselmError(f"{path}: not UTF-8 text ({err})") from None
    ids = model.tokenizer.encode(text)
    if len(ids) < 2:
        raise FuselmError(f"{path}: the text has {len(ids)} tokens; expected at least 2")
    return torch.tensor(ids, dtype=torch.long)
