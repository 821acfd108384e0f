"""Quantized GGUF weights as modules: QuantLinear / QuantizedEmbedding over the file's GGML bytes."""

from __future__ import annotations

import torch

from .. import archs
from ..config import ModelConfig, expected_shapes
from ..errors import FuselmError
from ..model.build import qk_norm_groups


def native_kernels() -> bool:
    from ..quants.kernel_build import native_library

    return native_library() is not None


STACKS = {"attn.qkv": ("attn.q", "attn.k", "attn.v"), "mlp.gate_up": ("mlp.gate", "mlp.up")}


def quantized_weights(config: ModelConfig, state: dict[str, torch.Tensor], qtypes: dict[str, str],
                      row_orders: dict[str, torch.Tensor], source: str = "GGUF"):
    """The GGML byte tensors of `state` as QuantizedWeight (shapes checked against the config), removed from it."""
    from ..quants.ggml_types import row_bytes
    from ..quants.tensor import QuantizedWeight

    expected = expected_shapes(config, qk_norm_groups(config, state, source))
    weights: dict[str, QuantizedWeight] = {}
    for name, qtype in qtypes.items():
        shape, gguf_name = expected.get(name), archs.gguf_tensor_name(config, name)
        if shape is None or len(shape) != 2:
            raise FuselmError(f"{source}: tensor {gguf_name!r} is quantized ({qtype}) but is not a 2-D weight of "
                              "this model")
        data = state.pop(name)
        try:
            want = (shape[0], row_bytes(qtype, shape[1]))
        except FuselmError as err:
            raise FuselmError(f"{source}: tensor {gguf_name!r}: the config gives it shape {tuple(shape)}, which "
                              f"{qtype} cannot hold ({err})") from None
        if tuple(data.shape) != want:
            raise FuselmError(f"{source}: tensor {gguf_name!r} ({qtype}) holds {tuple(data.shape)} rows x bytes; "
                              f"the config's shape {tuple(shape)} needs {want}")
        weights[name] = QuantizedWeight(data.contiguous(), qtype, shape, row_orders.get(name))
    return weights


def quantized_modules(config: ModelConfig, state: dict[str, torch.Tensor], weights: dict,
                      dtype: torch.dtype) -> tuple[dict[str, torch.nn.Module | None], set[str]]:
    """QuantLinear / QuantizedEmbedding modules for the quantized `weights` (internal name -> QuantizedWeight),
    and the state-dict names they took (their biases are removed from `state`).

    A layer's q/k/v (and gate/up) of one type become one QuantLinear over their stacked rows: one kernel call
    instead of three, which saves the fixed per-call cost and keeps the memory stream long."""
    from ..quants.embedding import QuantizedEmbedding
    from ..quants.kernels import QuantLinear

    weights = {name[: -len(".weight")]: w for name, w in weights.items()}
    modules: dict[str, torch.nn.Module | None] = {}
    consumed: set[str] = set()

    def take(path: str):
        consumed.add(path + ".weight")
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
