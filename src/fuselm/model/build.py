"""Build a Transformer from a config and an internal state dict, checking every tensor once.

Weights are assigned, not copied: a tensor already in the target dtype stays a view of its (memory-mapped) file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ..config import ModelConfig, expected_shapes, is_norm_weight
from ..errors import FuselmError
from .transformer import Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise FuselmError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise FuselmError(f"dtype must be one of float32, bfloat16, float16, got {dtype!r}")
    return DTYPES[dtype]


def qk_norm_groups(config: ModelConfig, state_dict: Mapping[str, torch.Tensor],
                   source: str = "model") -> tuple[int, int] | None:
    """(q groups, k groups) read from the weights themselves, never assumed (`source` is named in errors)."""
    if not config.qk_norm:
        return None
    q, k = state_dict.get("layers.0.attn.q_norm.weight"), state_dict.get("layers.0.attn.k_norm.weight")
    if q is None or k is None:
        return None  # reported as missing by check_state_dict
    qg, kg = int(q.shape[0]), int(k.shape[0])
    if q.ndim != 2 or config.num_attention_heads % qg or config.num_key_value_heads % kg:
        raise FuselmError(
            f"{source}: qk-norm weights of shape {tuple(q.shape)} / {tuple(k.shape)} do not divide "
            f"{config.num_attention_heads} query / {config.num_key_value_heads} key heads into groups")
    return qg, kg


def check_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor], source: str,
                     display_name: Callable[[str], str] = str,
                     provided: Iterable[str] = (), scan_values: bool = True) -> dict[str, torch.Tensor]:
    """Validate names, shapes and values; fill FlashNorm-folded norms. Returns the completed state dict.

    `provided` names tensors that arrive as ready-made modules (quantized weights) and are checked there.
    scan_values=False leaves the NaN/Inf scan to the caller (a tensor-parallel rank scans only its share).
    """
    groups = qk_norm_groups(config, state_dict, source)
    expected = expected_shapes(config, groups)
    provided = set(provided)
    out = dict(state_dict)
    for name, shape in expected.items():
        if name in provided:
            continue
        if name not in out:
            if config.flashnorm and is_norm_weight(name):
                fill = torch.ones if name.endswith(".weight") else torch.zeros
                out[name] = fill(shape)
                continue
            hint = (" (norm weights are absent, as in a FlashNorm-folded checkpoint, but the config has no "
                    "flashnorm flag; add \"flashnorm\": true to config.json if it was folded)"
                    if is_norm_weight(name) else "")
            raise FuselmError(f"{source}: missing tensor {display_name(name)!r}{hint}")
        found = tuple(out[name].shape)
        if found != tuple(shape):
            raise FuselmError(f"{source}: tensor {display_name(name)!r} has shape {found}, expected {tuple(shape)}")
    for name in out:
        if name not in expected:
            raise FuselmError(f"{source}: unexpected tensor {display_name(name)!r} for this config")
    for name, t in out.items() if scan_values else ():
        if t.is_floating_point() and not all_finite(t):
            raise FuselmError(f"{source}: tensor {display_name(name)!r} contains NaN or Inf values")
    return out


def all_finite(t: torch.Tensor, chunk_elements: int = 1 << 22) -> bool:
    """isfinite over bounded chunks, so checking a large tensor never allocates a copy of it."""
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), chunk_elements):
        if not bool(torch.isfinite(flat[start:start + chunk_elements]).all()):
            return False
    return True


def build_transformer(config: ModelConfig, state_dict: Mapping[str, torch.Tensor], *, dtype: torch.dtype,
                      device: str | torch.device = "cpu",
                      modules: Mapping[str, nn.Module | None] | None = None) -> Transformer:
    """Instantiate on the meta device, then assign weights (converted to dtype only where needed).

    `modules` replaces whole submodules (for example quantized linears) before weights are assigned; None
    removes one (its weights then live in a stacked module such as `attn.qkv`).
    """
    with torch.device("meta"):
        model = Transformer(config, qk_norm_groups(config, state_dict))
    for path, module in (modules or {}).items():
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    converted = {}
    for name, t in state_dict.items():
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        converted[name] = t.to(device) if t.device != torch.device(device) else t
    missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
    replaced = tuple(f"{path}." for path in modules or {})
    missing = [m for m in missing if not m.startswith(replaced)] if replaced else missing
    if missing or unexpected:
        raise FuselmError(f"internal error: model/state dict mismatch (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    model.compute_dtype = dtype
    model.eval()
    return model
