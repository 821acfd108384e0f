"""quants.decode_attention equals torch's scaled_dot_product_attention (float64) for one query position over
a KV cache: float32, fp16 and bf16 caches, grouped-query heads, capacity-sized buffers viewed to length L, and
left padding (positions before pad[b] masked)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fuselm.quants.decode_ops import decode_attention
from fuselm.quants.kernel_build import native_library


def reference(q, k, v, pad):
    mask = (torch.arange(k.shape[2]) >= pad.view(-1, 1)).view(-1, 1, 1, k.shape[2])
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                          enable_gqa=k.shape[1] != q.shape[1])  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 64), (4, 4, 72), (6, 1, 20)])
def test_matches_sdpa(dtype, heads, kv_heads, head_dim):
    if native_library() is None:
        pytest.fail("native kernels missing: tests/test_kernels.py::test_native_kernels_build_here says why")
    gen = torch.Generator().manual_seed(heads * head_dim)
    batch, capacity, length = 3, 50, 37
    k_buf = torch.randn(batch, kv_heads, capacity, head_dim, generator=gen).to(dtype)
    v_buf = torch.randn(batch, kv_heads, capacity, head_dim, generator=gen).to(dtype)
    k, v = k_buf[:, :, :length], v_buf[:, :, :length]  # views, as the cache hands them out
    q = torch.randn(batch, heads, 1, head_dim, generator=gen) * 2
    pad = torch.tensor([0, 5, 36])
    out = decode_attention(q, k, v, pad)
    ref = reference(q, k, v, pad)
    assert out.dtype == torch.float32 and out.shape == (batch, heads, 1, head_dim)
    assert (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_without_padding_equals_plain_sdpa():
    q = torch.randn(2, 4, 1, 64)
    k, v = torch.randn(2, 4, 9, 64), torch.randn(2, 4, 9, 64)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert (decode_attention(q, k, v).double() - ref).abs().max().item() <= 1e-5
