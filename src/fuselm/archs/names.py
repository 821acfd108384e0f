"""The rename machinery shared by the name tables: module templates with {i} for the layer index."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..config import ModelConfig
from ..errors import FuselmError


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + r"\.(?P<kind>weight|bias)$")


def rename_tensors(state_dict: Mapping[str, torch.Tensor], table: dict[str, str], source: str,
            ignored: re.Pattern | None) -> dict[str, torch.Tensor]:
    """Rename by module table (src template -> dst template). Unknown names are an error."""
    patterns = [(_template_regex(src), dst) for src, dst in table.items()]
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        for regex, dst in patterns:
            m = regex.match(name)
            if m:
                target = dst.replace("{i}", m.group("i") or "") if m.groupdict().get("i") else dst
                out[f"{target}.{m.group('kind')}"] = tensor
                break
        else:
            if ignored is None or not ignored.match(name):
                raise FuselmError(f"{source}: unexpected tensor {name!r} (not part of this architecture)")
    return out


def translate_name(table: dict[str, str], name: str, *, fused_qkv: bool = False) -> str:
    """One internal tensor name through a module table (internal template -> other template).

    With fused_qkv, attn.q/k/v map to the fused attn.qkv tensor they live in (Falcon). Unknown names pass through.
    """
    if fused_qkv:
        name = re.sub(r"\.attn\.[qkv]\.", ".attn.qkv.", name)
    for ours, theirs in table.items():
        m = re.fullmatch(re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)") + r"\.(weight|bias)", name)
        if m:
            i = m.groupdict().get("i")
            return (theirs.replace("{i}", i) if i else theirs) + "." + m.group(m.lastindex)
    return name


def fuse_qkv(config: ModelConfig, state_dict: dict[str, torch.Tensor], fuse) -> None:
    """Replace each layer's attn.q/k/v (weight and bias) by one attn.qkv tensor, `fuse(q, k, v)`, in place."""
    for i in range(config.num_hidden_layers):
        for kind in ("weight", "bias"):
            names = [f"layers.{i}.attn.{p}.{kind}" for p in "qkv"]
            if all(n in state_dict for n in names):
                state_dict[f"layers.{i}.attn.qkv.{kind}"] = fuse(*(state_dict.pop(n) for n in names))


def map_qk_rows(config: ModelConfig, state_dict: dict[str, torch.Tensor], permute) -> None:
    """Apply a per-head row permutation `permute(t, n_heads)` to q/k weights, biases and qk-norm rows, in place.

    qk-norm tensors are (heads or groups, head_dim): they are permuted within head_dim.
    """
    for name in list(state_dict):
        m = re.fullmatch(r"layers\.\d+\.attn\.(q|k)(_norm)?\.(weight|bias)", name)
        if not m:
            continue
        t = state_dict[name]
        if m.group(2):
            state_dict[name] = permute(t.reshape(-1), t.shape[0]).reshape(t.shape)
        else:
            heads = config.num_attention_heads if m.group(1) == "q" else config.num_key_value_heads
            state_dict[name] = permute(t, heads)
