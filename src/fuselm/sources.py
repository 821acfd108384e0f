"""Read any model source (HF directory or GGUF) into what the writers need: config, internal state dict,
tokenizer, chat template and Chameleon's image tokenizer weights. Shared by quantize, flashify, regroup-qknorm."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import archs
from .config import ModelConfig
from .errors import FuselmError
from .formats import gguf as gguf_format
from .formats import hf as hf_format
from .model.build import check_state_dict

PLAIN = ("F32", "F16", "BF16")


@dataclass
class ModelSource:
    path: Path
    kind: str  # "hf" | "gguf"
    config: ModelConfig
    state: dict[str, torch.Tensor]  # internal names
    tokenizer: object = None  # tokenizers.Tokenizer (HF) or tokenizer.* metadata dict (GGUF)
    chat_template: str | None = None
    vqgan: tuple[dict, dict] | None = None  # (VQ config dict, VQGAN state dict)


def read_source(src: str | Path, *, check: bool = True) -> ModelSource:
    from .loader import resolve_model_path

    src = resolve_model_path(src)
    if src.is_file() and src.suffix == ".gguf":
        return _read_gguf(src, check)
    if hf_format.is_hf_dir(src):
        return _read_hf(src, check)
    raise FuselmError(f"{src}: expected an HF directory (config.json) or a .gguf file")


def _read_gguf(src: Path, check: bool) -> ModelSource:
    from .quants import dequantize

    gf = gguf_format.read_gguf(src)
    shapes = {n: t.shape for n, t in gf.tensors.items()}
    config = archs.config_from_gguf(gf.metadata, str(src), shapes, rope_freqs=rope_freqs_tensor(gf))
    quantized = sorted({t.type_name for t in gf.tensors.values()} - set(PLAIN))
    if quantized:
        print(f"warning: {src} is quantized ({', '.join(quantized)}); its weights are dequantized, so a new "
              "quantization loses quality twice", file=sys.stderr)
    tensors = {}
    for name, t in gf.tensors.items():
        if t.type_name in PLAIN:
            tensors[name] = t.to_torch()
        else:
            rows = t.data.shape[0] if t.data.ndim > 1 else 1
            tensors[name] = dequantize(torch.from_numpy(t.data).reshape(rows, -1), t.type_name,
                                       (rows, t.shape[-1])).reshape(t.shape)
    state = archs.gguf_to_internal(config, tensors, source=str(src))
    if check:
        state = check_state_dict(config, state, str(src))
    companion = gguf_format.companion_path(src)
    return ModelSource(src, "gguf", config, state,
                       tokenizer={k: v for k, v in gf.metadata.items() if k.startswith("tokenizer.")},
                       chat_template=gf.metadata.get("tokenizer.chat_template"),
                       vqgan=gguf_format.read_vqgan_gguf(companion) if companion.is_file() else None)


def _read_hf(src: Path, check: bool) -> ModelSource:
    cfg = hf_format.read_config(src)
    config = archs.config_from_hf(cfg, source=str(src / "config.json"))
    raw = hf_format.read_weights(src)
    vq_state = {k[len("model.vqmodel."):]: v for k, v in raw.items() if k.startswith("model.vqmodel.")}
    state = archs.hf_to_internal(config, raw, source=str(src))
    if check:
        state = check_state_dict(config, state, str(src), lambda n: archs.hf_tensor_name(config, n))
    tokenizer = template = None
    if (src / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTokenizer

        from .tokenizer import Tokenizer

        tokenizer = HFTokenizer.from_file(str(src / "tokenizer.json"))
        template = Tokenizer.from_dir(src).chat_template
    vq = (cfg.get("vq_config") or {}, vq_state) if vq_state else None
    return ModelSource(src, "hf", config, state, tokenizer, template, vq)


def rope_freqs_tensor(gf):
    """llama.cpp's converter carries Llama-3.1 RoPE scaling only as this tensor."""
    t = gf.tensors.get("rope_freqs.weight")
    return None if t is None else t.data
