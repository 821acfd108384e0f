"""Importance matrices the way llama.cpp's llama-imatrix computes them.

The text is tokenized once (with BOS when the tokenizer adds one) and cut into chunks of `ctx` tokens; each
chunk's first token is replaced by BOS (when the tokenizer adds one) and the chunk runs as one causal forward
with all weights dense in float32. For every matrix the quantizer will see (the `blk.*` weights; output.weight
only with `process_output`) a forward pre-hook adds each token's squared input activations to a per-column sum
and counts the tokens. Matmuls over fewer than 16 tokens are ignored, as in llama-imatrix. The perplexity of each
chunk's second half is reported as llama-imatrix reports it.

Names are the GGUF tensor names llama.cpp uses (archs.gguf_tensor_name); modules that share one GGUF matrix
(Falcon's q/k/v in attn_qkv) share one input, so it is counted once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import archs
from ..errors import FuselmError
from ..formats.imatrix import ImatrixEntry, write_imatrix
from ..quants.kernels import QuantLinear

MIN_TOKENS = 16  # llama-imatrix skips matmuls over fewer tokens


@dataclass(frozen=True)
class ImatrixResult:
    entries: dict[str, ImatrixEntry]
    chunks: int
    chunk_size: int
    chunk_ppl: tuple[float, ...]  # running perplexity after each chunk, as llama-imatrix prints it
    ppl: float
    ppl_error: float


class _Collector:
    """Forward pre-hooks that add x^2 per input column and count tokens, one entry per GGUF weight name."""

    def __init__(self, transformer: torch.nn.Module, name_of: Callable[[str], str | None]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.handles = []
        seen: set[str] = set()
        for path, module in transformer.named_modules():
            if not isinstance(module, (torch.nn.Linear, QuantLinear)):
                continue
            gguf_name = name_of(path)
            if gguf_name is None or gguf_name in seen:
                continue
            seen.add(gguf_name)
            self.handles.append(module.register_forward_pre_hook(self._hook(gguf_name)))

    def _hook(self, name: str):
        def hook(module, inputs):
            x = inputs[0]
            x = x.reshape(-1, x.shape[-1]).float()
            if x.shape[0] < MIN_TOKENS:
                return
            acc = self.sums.get(name)
            sq = (x * x).sum(dim=0)
            self.sums[name] = sq if acc is None else acc + sq
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]
            if not torch.isfinite(self.sums[name]).all():
                raise FuselmError(f"non-finite activations reach {name}; cannot compute an importance matrix")
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def entries(self) -> dict[str, ImatrixEntry]:
        return {n: ImatrixEntry(s.numpy().astype(np.float32).reshape(1, -1), np.array([self.counts[n]], np.int64))
                for n, s in self.sums.items()}


def _gguf_namer(config, process_output: bool) -> Callable[[str], str | None]:
    def name_of(path: str) -> str | None:
        try:
            name = archs.gguf_tensor_name(config, path + ".weight")
        except FuselmError:
            raise FuselmError(f"module {path!r} has no GGUF weight name; load the model with dense weights") from None
        if name.startswith("blk.") or (process_output and name == "output.weight"):
            return name
        return None
    return name_of


def collect_imatrix(model, ids: list[int], *, ctx: int = 512, chunks: int | None = None,
                    process_output: bool = False, progress: bool = True) -> ImatrixResult:
    """Run `model` (a fuselm Model with dense weights) over `ids` in chunks of `ctx` tokens; see the module doc."""
    if ctx < MIN_TOKENS:
        raise FuselmError(f"imatrix --ctx {ctx}: llama-imatrix ignores matmuls over fewer than {MIN_TOKENS} tokens")
    if len(ids) < 2 * ctx:
        raise FuselmError(f"imatrix needs at least {2 * ctx} tokens for a context of {ctx}; the text gives "
                          f"{len(ids)}")
    if chunks is not None and chunks <= 0:
        raise FuselmError(f"imatrix --chunks {chunks}: expected a positive number")
    n_chunk = len(ids) // ctx if chunks is None else min(chunks, len(ids) // ctx)
    tok = model.tokenizer
    bos = tok.bos_id if tok is not None and tok.add_bos else None
    transformer = model.transformer
    collector = _Collector(transformer, _gguf_namer(model.config, process_output))
    tokens = torch.tensor(ids, dtype=torch.long)
    nll = nll2 = 0.0
    count = 0
    running = []
    first = ctx // 2
    try:
        with torch.inference_mode(), tqdm(total=n_chunk, desc="imatrix", unit="chunk", disable=not progress) as bar:
            for i in range(n_chunk):
                chunk = tokens[i * ctx:(i + 1) * ctx].clone()
                if bos is not None:
                    chunk[0] = bos
                logits = transformer(chunk.unsqueeze(0))[0, first:ctx - 1].double()
                targets = tokens[i * ctx + first + 1:(i + 1) * ctx]
                lp = -F.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
                nll += float(lp.sum())
                nll2 += float((lp * lp).sum())
                count += lp.numel()
                running.append(math.exp(nll / count))
                bar.set_postfix(ppl=f"{running[-1]:.4f}")
                bar.update()
                if progress:
                    tqdm.write(f"[{i + 1}]{running[-1]:.4f}")
    finally:
        collector.remove()
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    err = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else float("nan")
    return ImatrixResult(collector.entries(), n_chunk, ctx, tuple(running), ppl, err)


def load_dense(model_path: str | Path):
    """The model with every weight dense in float32 (quantized GGUF weights dequantized)."""
    from ..load import load

    return load(model_path, dtype="float32", dequantize_all=True)


def compute_imatrix(model_path: str | Path, text_path: str | Path, out: str | Path, *, ctx: int = 512,
                    chunks: int | None = None, process_output: bool = False,
                    progress: bool = True) -> ImatrixResult:
    """`fuselm imatrix`: collect over the text file and write OUT in llama.cpp's GGUF imatrix format."""
    text_path = Path(text_path)
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise FuselmError(f"{text_path}: cannot read the text ({err})") from None
    model = load_dense(model_path)
    if model.tokenizer is None:
        raise FuselmError(f"{model_path}: the model has no tokenizer to read {text_path} with")
    result = collect_imatrix(model, model.tokenizer.encode(text), ctx=ctx, chunks=chunks,
                             process_output=process_output, progress=progress)
    write_imatrix(out, result.entries, datasets=(str(text_path),), chunk_count=result.chunks, chunk_size=ctx)
    return result
