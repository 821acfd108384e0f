"""The tensor inventory of a config: every internal tensor name and its shape.

Internal tensor names (what model/transformer.py's modules are called):

    embed.weight, norm.{weight,bias}, lm_head.weight
    layers.{i}.attn_norm.{weight,bias}   norm before attention (Falcon-40B: ln_attn)
    layers.{i}.mlp_norm.{weight,bias}    norm before the MLP (after it for swin_norm; Falcon-40B: ln_mlp)
    layers.{i}.attn.{q,k,v,o}.{weight,bias}
    layers.{i}.attn.{q_norm,k_norm}.{weight,bias}   shape (heads or groups, head_dim)
    layers.{i}.mlp.{gate,up,down}.{weight,bias}     gate only for SwiGLU
"""

from __future__ import annotations

import re

from .model import ModelConfig


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
            "attn.q": (c.q_dim, c.hidden_size, c.qkv_bias),
            "attn.k": (c.kv_dim, c.hidden_size, c.qkv_bias),
            "attn.v": (c.kv_dim, c.hidden_size, c.qkv_bias),
            "attn.o": (c.hidden_size, c.q_dim, c.o_bias),
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
