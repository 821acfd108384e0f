"""Building blocks of the one Transformer: norms, grouped qk-norm, attention, MLP, block.

Module names match the internal tensor names documented in fuselm.archs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..quants import decode_ops
from .attention import CacheStep, causal_attention
from .cache import LayerCache
from .rope import apply_rope

Cached = tuple[CacheStep, LayerCache]  # this forward's cache step and the layer's own buffers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if decode_ops.native_ready(x) and self.weight.dtype == torch.float32:
            return decode_ops.rms_norm(x, self.weight, self.eps)
        # Statistics in float32, as HF Llama does, then back to the activation dtype before the weight.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm_kind == "rms":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return LayerNorm(config.hidden_size, config.norm_eps, config.norm_bias)


class GroupedHeadNorm(nn.Module):
    """Chameleon's qk-norm: LayerNorm over head_dim per head, with weights per head or per group of heads.

    Weights are (groups, head_dim); groups == heads is HF's per-head form, fewer groups is Lumina-mGPT's form
    (each group covers heads/groups consecutive heads, expanded with repeat_interleave).
    """

    def __init__(self, heads: int, groups: int, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.heads_per_group = heads // groups
        self.weight = nn.Parameter(torch.ones(groups, head_dim))
        self.bias = nn.Parameter(torch.zeros(groups, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, H, D]
        w, b = self.weight, self.bias
        if self.heads_per_group > 1:
            w = w.repeat_interleave(self.heads_per_group, dim=0)
            b = b.repeat_interleave(self.heads_per_group, dim=0)
        return F.layer_norm(x, x.shape[-1:], None, None, self.eps) * w + b


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, qk_norm_groups: tuple[int, int] | None):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.window = c.sliding_window
        self.q = nn.Linear(c.hidden_size, c.q_dim, bias=c.qkv_bias)
        self.k = nn.Linear(c.hidden_size, c.kv_dim, bias=c.qkv_bias)
        self.v = nn.Linear(c.hidden_size, c.kv_dim, bias=c.qkv_bias)
        self.o = nn.Linear(c.q_dim, c.hidden_size, bias=c.o_bias)
        # A loader may replace q, k and v by one module over their stacked rows (one quantized matmul, not three).
        self.qkv: nn.Module | None = None
        self.q_norm = self.k_norm = None
        if c.qk_norm:
            qg, kg = qk_norm_groups or (self.n_heads, self.n_kv)
            self.q_norm = GroupedHeadNorm(self.n_heads, qg, self.head_dim, c.qk_norm_eps)
            self.k_norm = GroupedHeadNorm(self.n_kv, kg, self.head_dim, c.qk_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cached | None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv is not None:
            kv = self.n_kv * self.head_dim
            q, k, v = self.qkv(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None and T == 1 and decode_ops.native_ready(q) and cache[1].k.dtype == torch.float32:
            step, layer = cache  # one native call: RoPE, the cache write and attention
            out = step.attend_native(layer, q[:, 0], k[:, 0], v[:, 0], cos, sin)
            return self.o(out.view(B, 1, self.n_heads * self.head_dim))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv != self.n_heads
        if cache is None:
            out = causal_attention(q, k, v, self.window, gqa)
        else:
            step, layer = cache
            out = step.attend(layer, q, k, v, gqa)
        return self.o(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.swiglu = c.mlp_kind == "swiglu"
        self.gate = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias) if self.swiglu else None
        self.up = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.gate_up: nn.Module | None = None  # like Attention.qkv: gate and up rows stacked in one module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate_up = self.gate_up(x)
            if self.swiglu and decode_ops.native_ready(gate_up):
                return self.down(decode_ops.silu_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, qk_norm_groups: tuple[int, int] | None):
        super().__init__()
        self.kind = config.block_kind
        self.attn_norm = make_norm(config)
        self.mlp_norm = None if (self.kind == "parallel" and config.parallel_norms == 1) else make_norm(config)
        self.attn = Attention(config, qk_norm_groups)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cached | None) -> torch.Tensor:
        if self.kind == "pre_norm":
            h = x + self.attn(self.attn_norm(x), cos, sin, cache)
            return h + self.mlp(self.mlp_norm(h))
        if self.kind == "swin_norm":
            h = x + self.attn_norm(self.attn(x, cos, sin, cache))
            return h + self.mlp_norm(self.mlp(h))
        a = self.attn_norm(x)
        m = a if self.mlp_norm is None else self.mlp_norm(x)
        return x + self.attn(a, cos, sin, cache) + self.mlp(m)
