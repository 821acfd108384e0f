"""Tensor inventory of a config and the rename machinery shared by the name tables."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..config import ModelConfig
from ..errors import FuselmError

# ---------------------------------------------------------------- tensor inventory

def expected_shapes(config: ModelConfig, qk_norm_groups: tuple[int, int] | None = None) -> dict[str, tuple]:
    """Internal tensor name -> shape for a model with this config.

    qk_norm_groups: (q groups, k groups) of the qk-norm weights; None means one row per head.
    Norm weights are listed even for FlashNorm models; the loader decides whether absence is allowed.
    """
    c = config
    shapes: dict[str, tuple] = {"embed.weight": (c.vocab_size, c.hidden_size)}
    norm_keys = ("weight", "bias") if c.norm_bias else ("weight",)
    for k in norm_keys:
        shapes[f"norm.{k}"] = (c.hidden_size,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    qg, kg = qk_norm_groups or (c.num_attention_heads, c.num_key_value_heads)
    has_mlp_norm = not (c.block_kind == "parallel" and c.parallel_norms == 1)
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        for k in norm_keys:
            shapes[p + f"attn_norm.{k}"] = (c.hidden_size,)
            if has_mlp_norm:
                shapes[p + f"mlp_norm.{k}"] = (c.hidden_size,)
        linears = {
            "attn.q": (c.q_dim, c.hidden_size, c.attention_bias),
            "attn.k": (c.kv_dim, c.hidden_size, c.attention_bias),
            "attn.v": (c.kv_dim, c.hidden_size, c.attention_bias),
            "attn.o": (c.hidden_size, c.q_dim, c.attention_bias),
            "mlp.up": (c.intermediate_size, c.hidden_size, c.mlp_bias),
            "mlp.down": (c.hidden_size, c.intermediate_size, c.mlp_bias),
        }
        if c.mlp_kind == "swiglu":
            linears["mlp.gate"] = (c.intermediate_size, c.hidden_size, c.mlp_bias)
        for name, (out_f, in_f, bias) in linears.items():
            shapes[p + name + ".weight"] = (out_f, in_f)
            if bias:
                shapes[p + name + ".bias"] = (out_f,)
        if c.qk_norm:
            for k in ("weight", "bias"):
                shapes[p + f"attn.q_norm.{k}"] = (qg, c.head_dim)
                shapes[p + f"attn.k_norm.{k}"] = (kg, c.head_dim)
    return shapes


def is_norm_weight(name: str) -> bool:
    """Weights that FlashNorm folds away (attn_norm, mlp_norm, final norm; never qk-norm)."""
    return re.fullmatch(r"(layers\.\d+\.(attn_norm|mlp_norm)|norm)\.(weight|bias)", name) is not None



def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + r"\.(?P<kind>weight|bias)$")


def _rename(state_dict: Mapping[str, torch.Tensor], table: dict[str, str], source: str,
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
