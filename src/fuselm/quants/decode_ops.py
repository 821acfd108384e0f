"""Native decode steps the model can call instead of several torch ops (csrc/attention.h).

decode_attention(q, k, v, pad=None) computes what
`F.scaled_dot_product_attention(q, k, v, enable_gqa=True)` does for one query position per sequence over
the cached keys and values, in one native call: float32 scores and softmax, K/V read as they are stored
(float32, fp16 or bf16, views of the cache's capacity-sized buffers need no copy), work handed out per
(sequence, head) on demand. Positions before pad[b] are not attended to (left-padded rows). Without the
native library it falls back to torch's SDPA with the same masking.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fuselm.errors import FuselmError
from fuselm.quants.kernel_build import native_library

_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.ndim != 4 or q.shape[2] != 1:
        raise FuselmError(f"decode_attention: q must be [B, H, 1, D], got {tuple(q.shape)}")
    if k.shape != v.shape or k.ndim != 4 or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise FuselmError(f"decode_attention: k and v must be [B, H_kv, L, D] matching q {tuple(q.shape)}, "
                          f"got {tuple(k.shape)} and {tuple(v.shape)}")  # fmt: skip
    if q.shape[1] % k.shape[1]:
        raise FuselmError(f"decode_attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")


def _torch_attention(q, k, v, pad):
    mask = None
    if pad is not None:
        mask = (torch.arange(k.shape[2]) >= pad.view(-1, 1)).view(-1, 1, 1, k.shape[2])
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                         enable_gqa=k.shape[1] != q.shape[1])  # fmt: skip
    return out


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None = None
) -> torch.Tensor:
    """q [B, H, 1, D]; k, v [B, H_kv, L, D] (each position's D values contiguous, the same strides for k and v);
    pad: int64 [B] or None. Returns float32 [B, H, 1, D]."""
    _check(q, k, v)
    lib = native_library()
    usable = (
        lib is not None and q.device.type == "cpu" and k.dtype in _KINDS and v.dtype == k.dtype
        and k.stride() == v.stride() and k.stride(3) == 1 and k.stride(2) == k.shape[3]
    )  # fmt: skip
    if not usable:
        return _torch_attention(q, k, v, pad)
    B, H, _, D = q.shape
    qf = q.reshape(B, H, D).float().contiguous()
    out = torch.empty(B, H, 1, D, dtype=torch.float32)
    pad_ptr = None
    if pad is not None:
        pad = pad.to(torch.int64).contiguous()
        pad_ptr = pad.data_ptr()
    rc = lib.fq_decode_attention(
        qf.data_ptr(), k.data_ptr(), v.data_ptr(), _KINDS[k.dtype], B, H, k.shape[1], D, k.shape[2],
        k.stride(0), k.stride(1), pad_ptr, 1.0 / math.sqrt(D), out.data_ptr(),
    )  # fmt: skip
    if rc != 0:
        raise FuselmError(f"decode_attention: native kernel failed (code {rc})")
    return out
