"""fuselm.load(): read a model source (load/source.py), build the one Transformer, attach the tokenizers."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from .. import archs
from ..config import ModelConfig, normalize_rope_scaling
from ..errors import FuselmError
from ..formats.gguf import companion_path
from ..model.build import build_transformer, check_state_dict, parse_dtype
from ..model.transformer import Transformer
from ..tokenizer import Tokenizer
from .gguf import native_kernels, quantized_modules, quantized_weights
from .source import ModelSource, read_source


class Model:
    """A loaded model: `.config`, `.tokenizer`, `.image_tokenizer` (or None), and `model(tokens) -> logits`."""

    def __init__(self, transformer: Transformer, tokenizer: Tokenizer | None, *, image_tokenizer=None,
                 source: str = "", file_type: str = "", ranks=None):
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.image_tokenizer = image_tokenizer
        self.source = source
        self.file_type = file_type  # e.g. "hf", "gguf Q4_K_M"
        self.ranks = ranks  # fuselm.parallel.Ranks of a tensor-parallel model (None in one process)

    @property
    def config(self) -> ModelConfig:
        return self.transformer.config

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full causal forward without cache: LongTensor [B, T] -> float32 logits [B, T, vocab]. Raw logits."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.long, torch.int32) or tokens.ndim != 2:
            raise FuselmError("model(tokens) expects an integer tensor of shape [batch, tokens]")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise FuselmError(f"token ids must be in [0, {self.config.vocab_size}), got {int(tokens.min())}.."
                              f"{int(tokens.max())}")
        if tokens.shape[1] > self.config.max_position_embeddings and not self.config.rope_scaling:
            raise FuselmError(f"sequence of {tokens.shape[1]} tokens is longer than the model's context of "
                              f"{self.config.max_position_embeddings}")
        with torch.inference_mode():
            return self.transformer(tokens.long())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.transformer.parameters())


def load(path: str | Path | None = None, *, dtype=None, device: str = "cpu", rope_scaling: dict | None = None,
         dequantize_all: bool = False, tensor_parallel: bool = False, group=None) -> Model:
    """Load an HF directory, a .gguf file, a Meta Chameleon checkpoint directory, or "demo" (the bundled model).

    Quantized GGUF matrices run from the file's bytes (and 16-bit ones too, when the native kernels exist);
    dequantize_all=True makes every weight a dense tensor instead.

    tensor_parallel=True (on every rank, e.g. under torchrun): this process holds only its share of the weights
    and computes with the other ranks of `group` (default: the default process group, initialized from torchrun's
    environment when the caller has not). The model behaves as in one process: `model(ids)` returns the whole
    [B, T, vocab] logits on every rank, and generation gives every rank the same events."""
    target = parse_dtype(dtype)
    ranks = None
    if tensor_parallel:
        from ..parallel.group import join

        ranks = join(group)
    sharded = ranks is not None and ranks.world > 1
    # checked once, below (with the quantized weights known): read_source's own check would scan every tensor again
    source = read_source(path, check=False, keep_quantized=not dequantize_all,
                         keep_16bit=not dequantize_all and native_kernels())
    config = source.config
    if rope_scaling is not None:
        config = config.replace(rope_scaling=normalize_rope_scaling(rope_scaling, source="rope_scaling argument"))
    elif config.rope_scaling is not None:
        normalize_rope_scaling(config.rope_scaling, source=str(source.path))
    state, weights = source.state, {}
    if source.kind == "gguf":
        # llama.cpp's accuracy: a float32 residual stream (norms, softmax, KV cache in float32); the kernels round
        # only what enters each quantized dot product. --dtype bfloat16 is the explicit fast mode.
        target = target or torch.float32
    if source.qtypes:
        weights = quantized_weights(config, state, source.qtypes, source.row_orders, str(source.path))
    target = target or _default_dtype(state, source.kind)
    display = partial(_display_name, source)
    state = check_state_dict(config, state, str(source.path), display, provided=weights, scan_values=not sharded)
    if sharded:
        from .sharded import build_sharded

        transformer = build_sharded(config, state, weights, ranks, dtype=target, device=device,
                                    source=str(source.path), display_name=display)
    else:
        modules, _ = quantized_modules(config, state, weights, target)
        transformer = build_transformer(config, state, dtype=target, device=device, modules=modules)
        if ranks is not None:  # one rank: nothing to share, but the same API
            from ..parallel.lockstep import Together

            transformer.coordinator = Together(ranks)
    return Model(transformer, _tokenizer(source), image_tokenizer=_image_tokenizer(source),
                 source=str(source.path), file_type=source.file_type, ranks=ranks)


def _display_name(source: ModelSource, name: str) -> str:
    if source.kind == "gguf":
        return archs.gguf_tensor_name(source.config, name)
    if source.kind == "hf":
        return archs.hf_tensor_name(source.config, name)
    return name


def _default_dtype(state: dict[str, torch.Tensor], kind: str) -> torch.dtype:
    """HF and Meta checkpoints keep their float dtype (so weights stay memory-mapped), float32 if mixed."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _tokenizer(source: ModelSource) -> Tokenizer | None:
    """tokenizer.json beside the file wins (exact HF behaviour); otherwise the source's own tokenizer data."""
    if source.tokenizer_files is not None and (source.tokenizer_files / "tokenizer.json").is_file():
        if source.kind == "hf":
            return Tokenizer.from_dir(source.tokenizer_files)
        return Tokenizer.from_file(source.tokenizer_files / "tokenizer.json",
                                   source.tokenizer_files / "tokenizer_config.json")
    if source.kind == "gguf":
        if "tokenizer.ggml.model" not in source.tokenizer:
            return None
        from ..formats.gguf_vocab import tokenizer_config_from_gguf, tokenizer_from_gguf

        backend = tokenizer_from_gguf(source.tokenizer, source=str(source.path))
        config = tokenizer_config_from_gguf(source.tokenizer, source=str(source.path))
        return Tokenizer(backend, bos_token=config["bos_token"], eos_token=config["eos_token"],
                         chat_template=config.get("chat_template"), add_bos=config["add_bos_token"],
                         source=str(source.path))
    if source.tokenizer is None:
        return None
    cfg = source.tokenizer_config or {}
    return Tokenizer(source.tokenizer, bos_token=cfg.get("bos_token"), eos_token=cfg.get("eos_token"),
                     add_bos=cfg.get("add_bos_token"), source=str(source.path))


def _image_tokenizer(source: ModelSource):
    if source.vqgan is None:
        return None
    from ..vision import ImageTokenizer, VQGANConfig, vqgan_from_hf_state_dict, vqgan_from_state_dict

    vq_config, state = source.vqgan
    if source.kind == "hf":
        return ImageTokenizer(vqgan_from_hf_state_dict(vq_config, state, source=str(source.path)))
    # A GGUF's image tokenizer lives in its companion file: errors name that file.
    where = str(companion_path(source.path)) if source.kind == "gguf" else str(source.path)
    config = VQGANConfig.from_dict(vq_config, source=where)
    return ImageTokenizer(vqgan_from_state_dict(config, state, source=where))
