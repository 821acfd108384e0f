"""The one reader of a model source: an HF directory, a GGUF (with its -vqgan companion) or a Meta checkpoint.

`read_source` gives what every user needs as data: config, internal state dict, tokenizer, chat template and
the image tokenizer's weights. `fuselm.load`, quantize, flashify, regroup-qknorm, convert and the evals all
read through it. GGUF tensors are either dequantized (writers) or kept as GGML bytes for the kernels (load).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import archs
from ..config import ModelConfig, expected_shapes
from ..errors import FuselmError
from ..formats import gguf as gguf_format
from ..formats import hf as hf_format
from .paths import resolve_model_path

PLAIN = ("F32", "F16", "BF16")
# Internal names of the weights that run as matmuls (or embedding lookups): the only ones kept as GGML bytes.
LINEAR = re.compile(r"(embed|lm_head|layers\.\d+\.(attn\.[qkvo]|mlp\.(gate|up|down)))\.weight")
VQ_PREFIX = "model.vqmodel."  # where HF keeps Chameleon's VQGAN; the only place the prefix is handled


@dataclass
class ModelSource:
    path: Path
    kind: str  # "hf" | "gguf" | "meta"
    config: ModelConfig
    state: dict[str, torch.Tensor]  # internal names; GGML bytes [rows, row_bytes] for names in `qtypes`
    tokenizer: object = None  # tokenizers.Tokenizer (HF, Meta) or tokenizer.* metadata dict (GGUF)
    tokenizer_config: dict | None = None  # HF tokenizer_config.json values (bos/eos tokens, add_bos...)
    chat_template: str | None = None
    vqgan: tuple[dict, dict] | None = None  # (VQ config dict, VQGAN state dict)
    qtypes: dict[str, str] = field(default_factory=dict)  # internal name -> GGML type of byte tensors
    row_orders: dict[str, torch.Tensor] = field(default_factory=dict)  # q/k rows to read in the model's order
    file_type: str = ""  # e.g. "hf", "gguf Q4_K_M", "meta"
    tokenizer_files: Path | None = None  # a folder with tokenizer.json (+ config) to use as is


def read_source(src: str | Path | None, *, check: bool = True, keep_quantized: bool = False,
                keep_16bit: bool = False) -> ModelSource:
    """Read a model. keep_quantized: quantized GGUF matrices stay GGML bytes (else they are dequantized, with a
    warning that requantizing loses quality twice); keep_16bit: F16/BF16 GGUF matrices stay bytes too."""
    src = resolve_model_path(src)
    if src.is_file() and src.suffix == ".gguf":
        return _read_gguf(src, check, keep_quantized, keep_16bit)
    if hf_format.is_hf_dir(src):
        return _read_hf(src, check)
    if src.is_dir() and (src / "params.json").is_file():
        return _read_meta(src, check)
    raise FuselmError(f"{src}: not a model: expected an HF directory (config.json), a .gguf file, or a Meta "
                      f"checkpoint directory (params.json + consolidated*.pth)")


def _check(config: ModelConfig, state: dict, source: str, display=str, provided=()) -> dict:
    from ..model.build import check_state_dict  # the tensor inventory check shared with the model builder

    return check_state_dict(config, state, source, display, provided=provided)


def _read_hf(src: Path, check: bool) -> ModelSource:
    cfg = hf_format.read_config(src)
    config = archs.config_from_hf(cfg, source=str(src / "config.json"))
    raw = hf_format.read_weights(src)
    vq_state = {k[len(VQ_PREFIX):]: v for k, v in raw.items() if k.startswith(VQ_PREFIX)}
    state = archs.hf_to_internal(config, raw, source=str(src))
    if check:
        state = _check(config, state, str(src), lambda n: archs.hf_tensor_name(config, n))
    tokenizer = None
    if (src / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tokenizer = HFTokenizer.from_file(str(src / "tokenizer.json"))
        except Exception as err:  # the tokenizers library raises its own exception types
            raise FuselmError(f"{src / 'tokenizer.json'}: not a tokenizer file: {err}") from None
    vq_config = cfg.get("vq_config") or {}
    vq = (vq_config, vq_state) if vq_state and archs.arch_record(config.arch).image_tokenizer else None
    return ModelSource(src, "hf", config, state, tokenizer, tokenizer_files=src, vqgan=vq, file_type="hf")


def _read_meta(src: Path, check: bool) -> ModelSource:
    """Meta's original Chameleon release, converted in memory (shards merged, q/k permuted)."""
    from tokenizers import Tokenizer as HFTokenizer

    from .meta import convert_meta

    conv = convert_meta(src)
    state = _check(conv.config, conv.state_dict, str(src)) if check else conv.state_dict
    tokenizer = None
    if conv.tokenizer_json:
        try:
            tokenizer = HFTokenizer.from_str(json.dumps(conv.tokenizer_json))
        except Exception as err:  # the tokenizers library raises a bare Exception on a bad tokenizer
            raise FuselmError(f"{src}: tokenizer/text_tokenizer.json is not a valid tokenizer ({err})") from None
    vq = ((conv.config.extra.get("vq_config") or {}), conv.vqgan_state_dict) if conv.vqgan_state_dict else None
    return ModelSource(src, "meta", conv.config, state, tokenizer, tokenizer_config=conv.tokenizer_config,
                       vqgan=vq, file_type="meta")


def _read_gguf(src: Path, check: bool, keep_quantized: bool, keep_16bit: bool) -> ModelSource:
    gf = gguf_format.read_gguf(src)
    shapes = {name: t.shape for name, t in gf.tensors.items()}
    config = archs.config_from_gguf(gf.metadata, str(src), shapes, rope_freqs=_rope_freqs(gf))
    types = {t.type_name for t in gf.tensors.values()}
    quantized = sorted(types - set(PLAIN))
    if quantized and not keep_quantized:
        print(f"warning: {src} is quantized ({', '.join(quantized)}); its weights are dequantized, so a new "
              "quantization loses quality twice", file=sys.stderr)
    # Tensors are recognized by name and role, never by rank and dtype: only linear weights run from GGML bytes
    # (a 16-bit qk-norm bias is a norm parameter, whatever its storage type).
    linear = {archs.gguf_tensor_name(config, name) for name in expected_shapes(config) if LINEAR.fullmatch(name)}
    as_bytes = {t.name for t in gf.tensors.values() if t.name in linear and (
        (keep_quantized and t.type_name not in PLAIN) or (keep_16bit and t.type_name in ("F16", "BF16")))}
    misplaced = sorted(t.name for t in gf.tensors.values() if t.type_name not in PLAIN and t.name not in linear)
    if misplaced:
        raise FuselmError(f"{src}: tensor {misplaced[0]!r} is stored as {gf.tensors[misplaced[0]].type_name}; "
                          "only the linear weights of a model may be quantized (norms and biases are F32/F16/BF16)")
    tensors: dict[str, torch.Tensor] = {}
    for name, t in gf.tensors.items():
        if t.data.size == 0:  # legal in the format, never in a model (and ambiguous to reshape)
            raise FuselmError(f"{src}: tensor {name!r} has shape {list(t.shape)}: no elements")
        if name in as_bytes:  # GGML bytes [rows, row_bytes]: row permutations and splits work on them unchanged
            rows = t.data.shape[0] if t.data.ndim > 1 else 1
            tensors[name] = torch.from_numpy(t.data.view(np.uint8)).reshape(rows, -1)
        elif t.type_name in PLAIN:
            tensors[name] = t.to_torch()
        else:
            from ..quants import dequantize

            rows = t.data.shape[0] if t.data.ndim > 1 else 1
            tensors[name] = dequantize(torch.from_numpy(t.data).reshape(rows, -1), t.type_name,
                                       (rows, t.shape[-1])).reshape(t.shape)
    # q/k rows that llama.cpp stores in its rope order go through the conversion as row indices, not bytes:
    # the kernels' repack reads the file's rows in the model's order (no reordered copy of them is kept).
    reordered = _reordered_rows(config, tensors, as_bytes)
    state = archs.gguf_to_internal(config, {**tensors, **reordered}, source=str(src))
    qtypes, row_orders = {}, {}
    for name in state:
        gname = archs.gguf_tensor_name(config, name)
        if gname in reordered:
            row_orders[name] = state[name][:, 0].contiguous()
            state[name] = tensors[gname]
        if gname in as_bytes:
            qtypes[name] = gf.tensors[gname].type_name
    if check and not qtypes:
        state = _check(config, state, str(src), lambda n: archs.gguf_tensor_name(config, n))
    vq = gguf_format.read_companion(gf)  # refuses a companion missing or left by another write
    tokenizer_files = src.parent if src.with_name("tokenizer.json").is_file() else None
    file_type = "gguf " + ("+".join(quantized) if quantized else "+".join(sorted(types)))
    return ModelSource(src, "gguf", config, state,
                       tokenizer={k: v for k, v in gf.metadata.items() if k.startswith("tokenizer.")},
                       chat_template=gf.metadata.get("tokenizer.chat_template"), vqgan=vq, qtypes=qtypes,
                       row_orders=row_orders, file_type=file_type, tokenizer_files=tokenizer_files)


def _reordered_rows(config, tensors: dict[str, torch.Tensor], as_bytes: set[str]) -> dict[str, torch.Tensor]:
    """{gguf name: int64 [rows, 1] row indices} for the byte tensors whose rows the conversion reorders."""
    if not archs.arch_record(config.arch).gguf_permutes_qk:
        return {}
    out = {}
    for layer in range(config.num_hidden_layers):
        for part in "qk":
            gname = archs.gguf_tensor_name(config, f"layers.{layer}.attn.{part}.weight")
            if gname in as_bytes and gname in tensors:
                out[gname] = torch.arange(tensors[gname].shape[0]).unsqueeze(1)
    return out


def _rope_freqs(gf):
    """llama.cpp's converter carries Llama-3.1 RoPE scaling only as this tensor."""
    t = gf.tensors.get("rope_freqs.weight")
    return None if t is None else t.data
