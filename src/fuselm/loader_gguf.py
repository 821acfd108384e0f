"""Loading a GGUF model (ours or llama.cpp's), with Chameleon's companion image-tokenizer GGUF beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import archs
from .errors import FuselmError
from .formats import gguf as gguf_format
from .model.build import build_transformer, check_state_dict, parse_dtype, qk_norm_groups
from .model.rope import normalize_rope_scaling
from .sources import rope_freqs_tensor
from .tokenizer import Tokenizer

PLAIN_TYPES = ("F32", "F16", "BF16")


def _gguf_tokenizer(path: Path, gf) -> Tokenizer | None:
    """tokenizer.json beside the file wins (exact HF behaviour); otherwise rebuild it from tokenizer.ggml.*."""
    beside = path.with_name("tokenizer.json")
    if beside.is_file():
        return Tokenizer.from_file(beside, path.with_name("tokenizer_config.json"))
    if "tokenizer.ggml.model" not in gf.metadata:
        return None
    from .formats.gguf_vocab import tokenizer_config_from_gguf, tokenizer_from_gguf

    backend = tokenizer_from_gguf(gf.metadata, source=str(path))
    config = tokenizer_config_from_gguf(gf.metadata)
    return Tokenizer(backend, bos_token=config["bos_token"], eos_token=config["eos_token"],
                     chat_template=config.get("chat_template"), add_bos=config["add_bos_token"], source=str(path))


def _image_tokenizer(path: Path):
    companion = gguf_format.companion_path(path)
    if not companion.is_file():
        return None
    from .vision import ImageTokenizer, VQGANConfig, vqgan_from_state_dict

    vq_config, state = gguf_format.read_vqgan_gguf(companion)
    config = VQGANConfig.from_dict(vq_config, source=str(companion))
    return ImageTokenizer(vqgan_from_state_dict(config, state, source=str(companion)))


def load_gguf(path: Path, *, dtype=None, device: str = "cpu", rope_scaling: dict | None = None,
              dequantize_all: bool = False):
    from .loader import Model, _with_rope_override

    path = Path(path)
    gf = gguf_format.read_gguf(path)
    shapes = {name: t.shape for name, t in gf.tensors.items()}
    config = archs.config_from_gguf(gf.metadata, str(path), shapes, rope_freqs=rope_freqs_tensor(gf))
    config = _with_rope_override(config, rope_scaling)
    if config.rope_scaling is not None:
        normalize_rope_scaling(config.rope_scaling, source=str(path))
    types = {t.type_name for t in gf.tensors.values()}
    quantized = sorted(types - set(PLAIN_TYPES))
    # 16-bit matrices also run from the file's bytes when the native kernels exist (no bf16 copy of the model).
    as_bytes = {t.name for t in gf.tensors.values()
                if t.type_name not in PLAIN_TYPES
                or (t.type_name in ("F16", "BF16") and len(t.shape) == 2 and not dequantize_all and _native())}
    tensors: dict[str, torch.Tensor] = {}
    for name, t in gf.tensors.items():
        if name in as_bytes:  # GGML bytes [rows, row_bytes]: row permutations and splits work on them unchanged
            rows = t.data.shape[0] if t.data.ndim > 1 else 1
            tensors[name] = torch.from_numpy(t.data.view(np.uint8)).reshape(rows, -1)
        else:
            tensors[name] = t.to_torch()
    # q/k rows that llama.cpp stores in its rope order go through the conversion as row indices, not bytes:
    # the kernels' repack reads the file's rows in the model's order (no reordered copy of them is kept).
    reordered = _reordered_rows(config, tensors, as_bytes)
    state = archs.gguf_to_internal(config, {**tensors, **reordered}, source=str(path))
    qtypes, row_orders = {}, {}
    for name in state:
        gname = archs.gguf_tensor_name(config, name)
        if gname in reordered:
            row_orders[name] = state[name][:, 0].contiguous()
            state[name] = tensors[gname]
        if gname in as_bytes:
            qtypes[name] = gf.tensors[gname].type_name
    target = parse_dtype(dtype) or (torch.bfloat16 if qtypes else _plain_dtype(state))
    # Quantized weights become modules (their byte shapes are checked by QuantizedWeight against the config).
    modules, consumed = _quantized_modules(config, state, qtypes, row_orders, target, dense=dequantize_all)
    state = check_state_dict(config, state, str(path), lambda n: archs.gguf_tensor_name(config, n),
                             provided=consumed)
    transformer = build_transformer(config, state, dtype=target, device=device, modules=modules)
    file_type = "gguf " + ("+".join(quantized) if quantized else "+".join(sorted(types)))
    return Model(transformer, _gguf_tokenizer(path, gf), image_tokenizer=_image_tokenizer(path), source=str(path),
                 file_type=file_type)


def _reordered_rows(config, tensors: dict[str, torch.Tensor], as_bytes: set[str]) -> dict[str, torch.Tensor]:
    """{gguf name: int64 [rows, 1] row indices} for the byte tensors whose rows the conversion reorders."""
    if not archs.GGUF_PERMUTES_QK[config.arch]:
        return {}
    out = {}
    for layer in range(config.num_hidden_layers):
        for part in "qk":
            gname = archs.gguf_tensor_name(config, f"layers.{layer}.attn.{part}.weight")
            if gname in as_bytes and gname in tensors:
                out[gname] = torch.arange(tensors[gname].shape[0]).unsqueeze(1)
    return out


def _native() -> bool:
    from .quants.kernel_build import native_library

    return native_library() is not None


STACKS = {"attn.qkv": ("attn.q", "attn.k", "attn.v"), "mlp.gate_up": ("mlp.gate", "mlp.up")}


def _quantized_modules(config, state: dict[str, torch.Tensor], qtypes: dict[str, str],
                       row_orders: dict[str, torch.Tensor], dtype: torch.dtype, *,
                       dense: bool) -> tuple[dict[str, torch.nn.Module | None], set[str]]:
    """QuantLinear / QuantizedEmbedding modules for every quantized weight, and the state-dict names they took
    (removed from `state`). dense: dequantize into `state` instead. row_orders: see QuantizedWeight.row_order.

    A layer's q/k/v (and gate/up) of one type become one QuantLinear over their stacked rows: one kernel call
    instead of three, which saves the fixed per-call cost and keeps the memory stream long."""
    from .quants.embedding import QuantizedEmbedding
    from .quants.kernels import QuantLinear
    from .quants.tensor import QuantizedWeight

    expected = archs.expected_shapes(config, qk_norm_groups(config, state))
    weights: dict[str, QuantizedWeight] = {}
    for name, qtype in qtypes.items():
        shape = expected.get(name)
        if shape is None or len(shape) != 2:
            raise FuselmError(f"tensor {archs.gguf_tensor_name(config, name)!r} is quantized ({qtype}) but is not "
                              "a 2-D weight of this model")
        weight = QuantizedWeight(state[name].contiguous(), qtype, shape, row_orders.get(name))
        if dense:
            state[name] = weight.dequantize()
        else:
            weights[name[: -len(".weight")]] = weight
    modules: dict[str, torch.nn.Module | None] = {}
    consumed: set[str] = set()

    def take(path: str) -> tuple[QuantizedWeight, torch.Tensor | None]:
        consumed.add(path + ".weight")
        state.pop(path + ".weight")
        bias = state.pop(path + ".bias", None)
        if bias is not None:
            consumed.add(path + ".bias")
        return weights.pop(path), bias

    for layer in range(config.num_hidden_layers):
        for stacked, members in STACKS.items():
            paths = [f"layers.{layer}.{m}" for m in members]
            if not all(p in weights for p in paths) or len({weights[p].qtype for p in paths}) != 1:
                continue
            if len({(p + ".bias") in state for p in paths}) != 1:
                continue
            parts, biases = zip(*(take(p) for p in paths))
            bias = None if biases[0] is None else torch.cat([b.float() for b in biases])
            modules[f"layers.{layer}.{stacked}"] = QuantLinear(list(parts), bias)
            modules.update({p: None for p in paths})
    for path in list(weights):
        weight, bias = take(path)
        if path == "embed":
            modules["embed"] = QuantizedEmbedding(weight, dtype)
            if config.tie_word_embeddings:
                modules["lm_head"] = QuantLinear(weight)
        else:
            modules[path] = QuantLinear(weight, bias)
    return modules, consumed


def _plain_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for name, t in state.items() if t.is_floating_point() and t.ndim == 2}
    if len(dtypes) != 1:
        return torch.float32
    d = dtypes.pop()
    if d == torch.float16:  # float16 matmuls are slow on CPUs; bfloat16 keeps the range and uses AMX
        return torch.bfloat16
    return d

