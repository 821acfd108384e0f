"""The native decode-step ops (quants.decode_ops) against float64 computations of their definitions.

- rms_norm: HF Llama's RMSNorm; silu_mul: F.silu(gate) * up;
- decode_attend: HF's rotate-half RoPE on q and k, the rotated k and v written at each row's slot of the cache,
  then scaled_dot_product_attention over that row's positions from its first real slot (left padding) and
  within the sliding window: grouped-query, multi-query and multi-head, head sizes that are not a multiple of 16,
  partial rotary dims, rows at different positions, batch rows mapped to other cache rows, one RoPE table for
  every row or one per row, the views a fused q/k/v matmul hands out.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fuselm.quants import decode_ops
from fuselm.quants.kernel_build import native_library


@pytest.fixture(autouse=True)
def native():
    if native_library() is None:
        pytest.fail("native kernels missing: tests/test_kernels.py::test_native_kernels_build_here says why")


def rope64(x, cos, sin):
    """HF rotate-half RoPE in float64 on the first R dims of x [..., D]."""
    r = cos.shape[-1]
    rot = x[..., :r]
    half = torch.cat((-rot[..., r // 2:], rot[..., :r // 2]), dim=-1)
    return torch.cat((rot * cos + half * sin, x[..., r:]), dim=-1)


def test_rms_norm_matches_hf_formula():
    gen = torch.Generator().manual_seed(0)
    for d in (2048, 72, 20):
        x = torch.randn(3, 5, d, generator=gen) * 3
        w = torch.randn(d, generator=gen)
        with torch.inference_mode():
            out = decode_ops.rms_norm(x, w, 1e-5)
        x64 = x.double()
        ref = w.double() * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5))
        assert out.shape == x.shape and out.dtype == torch.float32
        assert (out.double() - ref).abs().max().item() <= 2e-6 * ref.abs().max().item()


def test_rms_norm_reads_strided_rows():
    x = torch.randn(4, 100)[:, :64]  # rows 100 apart
    w = torch.rand(64)
    ref = w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(decode_ops.rms_norm(x, w, 1e-6), ref, rtol=2e-6, atol=1e-6)


def test_silu_mul_matches_torch():
    gen = torch.Generator().manual_seed(1)
    for f in (5632, 37):
        gu = torch.randn(2, 1, 2 * f, generator=gen) * 6
        gu[0, 0, :4] = torch.tensor([-120.0, 95.0, 0.0, -0.0])  # exp's clamped range and zero
        out = decode_ops.silu_mul(gu)
        g, u = gu.double().chunk(2, dim=-1)
        ref = F.silu(g) * u
        assert out.shape == (2, 1, f)
        assert (out.double() - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


def reference_attend(q, k, v, cos, sin, k_cache, v_cache, rows, starts, pads, window):
    """The definition, in float64: returns the output [B, H * D] and the caches after the write."""
    k_cache, v_cache = k_cache.double().clone(), v_cache.double().clone()
    B, H, D = q.shape
    G = k.shape[1]
    cos64 = cos.double().reshape(-1, cos.shape[-1])
    sin64 = sin.double().reshape(-1, sin.shape[-1])
    out = []
    for b in range(B):
        c, s = cos64[b % cos64.shape[0]], sin64[b % sin64.shape[0]]
        row, start, pad = int(rows[b]), int(starts[b]), int(pads[b])
        k_cache[row, :, start] = rope64(k[b].double(), c, s)
        v_cache[row, :, start] = v[b].double()
        lo = pad if window is None else max(pad, start + 1 - window)
        keys, values = k_cache[row, :, lo:start + 1], v_cache[row, :, lo:start + 1]
        qb = rope64(q[b].double(), c, s)[:, None]  # [H, 1, D]
        o = F.scaled_dot_product_attention(qb[None], keys[None], values[None], enable_gqa=G != H)
        out.append(o[0, :, 0].reshape(H * D))
    return torch.stack(out), k_cache, v_cache


@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary", [(8, 2, 64, 64), (4, 4, 72, 72), (6, 1, 20, 20),
                                                            (8, 2, 64, 32)])
@pytest.mark.parametrize("per_row_rope", [False, True])
@pytest.mark.parametrize("window", [None, 7])
def test_decode_attend_matches_definition(heads, kv_heads, head_dim, rotary, per_row_rope, window):
    gen = torch.Generator().manual_seed(heads * head_dim + rotary)
    B, cache_rows, capacity = 3, 4, 50
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(B, 1, width, generator=gen)  # as a fused q/k/v matmul hands them out: views of one row
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(B, 1, heads, head_dim)[:, 0]
    k = k.view(B, 1, kv_heads, head_dim)[:, 0]
    v = v.view(B, 1, kv_heads, head_dim)[:, 0]
    angles = torch.rand(B if per_row_rope else 1, 1, rotary // 2, generator=gen) * 6
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if not per_row_rope:
        cos, sin = cos[0], sin[0]
    k_cache = torch.randn(cache_rows, kv_heads, capacity, head_dim, generator=gen)
    v_cache = torch.randn(cache_rows, kv_heads, capacity, head_dim, generator=gen)
    rows, starts, pads = torch.tensor([2, 0, 3]), torch.tensor([0, 19, 37]), torch.tensor([0, 5, 30])
    ref, ref_k, ref_v = reference_attend(q, k, v, cos, sin, k_cache, v_cache, rows, starts, pads, window)
    with torch.inference_mode():
        out = decode_ops.decode_attend(q, k, v, cos, sin, k_cache, v_cache, rows, starts, pads, window)
    assert out.shape == (B, heads * head_dim) and out.dtype == torch.float32
    assert (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert (k_cache.double() - ref_k).abs().max().item() <= 1e-6 * ref_k.abs().max().item()
    assert torch.equal(v_cache.double(), ref_v)


def test_decode_attend_refuses_padding_past_the_slot():
    q, k = torch.randn(1, 2, 16), torch.randn(1, 1, 16)
    cache = torch.zeros(1, 1, 8, 16)
    cos = sin = torch.ones(1, 16)
    with pytest.raises(Exception, match="decode_attend"):
        decode_ops.decode_attend(q, k, k.clone(), cos, sin, cache, cache.clone(), torch.tensor([0]),
                                 torch.tensor([2]), torch.tensor([5]), None)  # fmt: skip
