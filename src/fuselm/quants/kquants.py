"""K-quants Q2_K..Q6_K (256-element super-blocks), as ggml's quantize_row_q*_K_ref writes them.

quantize_*: float32 blocks [N, 256] -> bytes [N, type_size]. unpack_*: bytes -> codes and per-group scales.
Each super-block searches a float scale per sub-block (ksearch), quantizes those scales to 4/6/8 bits under
an fp16 super-scale, then re-derives every code from the fp16-rounded scales, as the C code does.
"""

from __future__ import annotations

import numpy as np
import torch

from fuselm.quants import qweights
from fuselm.quants.bits import unpack_bits
from fuselm.quants.cfloat import (
    F32,
    GROUP_MAX_EPS,
    fp16_bytes,
    fp16_round,
    nearest_int,
    positive_max,
    rdiv,
    seq_sum,
    signed_absmax,
)
from fuselm.quants.ksearch import make_q3_quants, make_qkx2_quants, make_qp_quants, make_qx_quants
from fuselm.quants.unpacked import Unpacked

QK_K = 256
_SHIFT2 = np.array([0, 2, 4, 6], dtype=np.uint8)


def _groups(x: np.ndarray, n: int) -> np.ndarray:
    """[N, 256] -> [n, N*256/n], element index first (the layout ksearch works in)."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _blocks(L: np.ndarray) -> np.ndarray:
    """Inverse of _groups for the integer codes: [n, G] -> uint8 [N, 256]."""
    return L.T.reshape(-1, QK_K).astype(np.uint8)


def _to_u8(a: np.ndarray) -> np.ndarray:
    """C's int -> uint8_t store: keep the low 8 bits."""
    return (a.astype(np.int32) & 0xFF).astype(np.uint8)


def _requantize(x: np.ndarray, L: np.ndarray, d: np.ndarray, offset: np.ndarray | None,
                lo: int, hi: int, shift: int) -> np.ndarray:
    """`if (d) L = clamp(nearest_int((x + offset)/d), lo, hi) + shift`, per group, from the stored fp16 scales.

    x, L [n, G]; d, offset [G]. Groups with d == 0 keep the search's L.
    """
    v = x if offset is None else x + offset
    with np.errstate(divide="ignore", invalid="ignore"):
        new = np.clip(nearest_int(v / d), lo, hi) + F32(shift)
    np.copyto(L, new, where=d != 0)
    return L


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """qs[32h + l] = L[128h + l] | L[128h + l + 32] << 2 | ... << 4 | ... << 6, L uint8 [N, 256] in 0..3."""
    q = L.reshape(-1, 2, 4, 32) << _SHIFT2.reshape(1, 1, 4, 1)
    return np.bitwise_or.reduce(q, axis=2).reshape(-1, 64)


def _pack_nibbles64(L: np.ndarray) -> np.ndarray:
    """qs[32c + l] = L[64c + l] | L[64c + 32 + l] << 4, L uint8 [N, 256] in 0..15."""
    q = L.reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _pack_bits32(flags: np.ndarray) -> np.ndarray:
    """flags [N, 256] -> [N, 32]: element 32k + j sets bit k of byte j."""
    return np.packbits(flags.reshape(-1, 8, 32).transpose(0, 2, 1), axis=-1, bitorder="little").reshape(-1, 32)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    q = qs.reshape(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    return (q & 3).reshape(-1, QK_K)


def _unpack_nibbles64(qs: torch.Tensor) -> torch.Tensor:
    q = qs.reshape(-1, 4, 1, 32)
    return torch.cat([q & 0xF, q >> 4], dim=2).reshape(-1, QK_K)


def _unpack_bits32(b: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack_bits32: uint8 [N, 32] -> 0/1 [N, 256]."""
    return unpack_bits(b).reshape(-1, 32, 8).transpose(1, 2).reshape(-1, QK_K)


def _fp16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32).reshape(-1)


# ---------------------------------------------------------------- Q4_K / Q5_K: 8 x 32, 6-bit scales and mins


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """12 bytes from 8 six-bit scales and mins (get_scale_min_k4's layout)."""
    lo = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6)], axis=1)
    return np.concatenate([lo, (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], axis=1)


def _unpack_scales_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, m, md = s[:, :4], s[:, 4:8], s[:, 8:]
    sc = torch.cat([d & 63, (md & 0xF) | ((d >> 6) << 4)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 6) << 4)], dim=1)
    return sc, mn


def _quantize_k45_weighted(x: np.ndarray, qw: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q4_K_impl / q5_K_impl: make_qkx3_quants per 32 with the importance weights, then the
    scales and mins searched by make_qp_quants weighted by each group's total weight."""
    w = qweights.superblock_weights(x, qw)
    N = w.shape[0]
    xs, ws = _groups(x.reshape(-1, QK_K), 32), _groups(w, 32)
    scales, mins, L = make_qkx2_quants(xs, ws, nmax, -0.9, 0.05, 36, use_mad=False)
    sw = seq_sum(ws).reshape(N, 8).T
    d, Ls = make_qp_quants(np.ascontiguousarray(scales.reshape(N, 8).T), 63, sw)
    dmin, Lm = make_qp_quants(np.ascontiguousarray(mins.reshape(N, 8).T), 63, sw)
    ls, lm = Ls.T.astype(np.uint8), Lm.T.astype(np.uint8)
    if nmax == 31:  # only Q5_K clamps
        ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    packed = _pack_scales_k4(ls, lm)
    sc, mn = (t.numpy().astype(F32) for t in _unpack_scales_k4(torch.from_numpy(packed)))
    dj = (fp16_round(d)[:, None] * sc).reshape(-1)
    mj = (fp16_round(dmin)[:, None] * mn).reshape(-1)
    L = _blocks(_requantize(xs, L, dj, mj, 0, nmax, 0))
    return np.concatenate([fp16_bytes(d), fp16_bytes(dmin), packed], axis=1), L


def quantize_q4_k_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    head, L = _quantize_k45_weighted(x, qw, 15)
    return np.concatenate([head, _pack_nibbles64(L)], axis=1).reshape(x.shape[0], -1)


def quantize_q5_k_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    head, L = _quantize_k45_weighted(x, qw, 31)
    out = np.concatenate([head, _pack_bits32(L >> 4), _pack_nibbles64(L & 0xF)], axis=1)
    return out.reshape(x.shape[0], -1)


def _quantize_k45(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    N = x.shape[0]
    xs = _groups(x, 32)
    av_x = np.sqrt(seq_sum(xs * xs) / F32(32))
    scales, mins, L = make_qkx2_quants(xs, av_x + np.abs(xs), nmax, rmin, 0.1, nstep, use_mad=False)
    scales, mins = scales.reshape(N, 8), mins.reshape(N, 8)
    max_scale = positive_max(scales, 1)
    max_min = positive_max(mins, 1)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, rdiv(63, max_scale), F32(0))
        inv_min = np.where(max_min > 0, rdiv(63, max_min), F32(0))
    ls = np.minimum(_to_u8(nearest_int(inv_scale[:, None] * scales)), 63)
    lm = np.minimum(_to_u8(nearest_int(inv_min[:, None] * mins)), 63)
    d = max_scale / F32(63)
    dmin = max_min / F32(63)
    dj = (fp16_round(d)[:, None] * ls.astype(F32)).reshape(-1)
    mj = (fp16_round(dmin)[:, None] * lm.astype(F32)).reshape(-1)
    L = _blocks(_requantize(xs, L, dj, mj, 0, nmax, 0))
    head = np.concatenate([fp16_bytes(d), fp16_bytes(dmin), _pack_scales_k4(ls, lm)], axis=1)
    return head, L


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    head, L = _quantize_k45(x, 15, -1.0, 20)
    return np.concatenate([head, _pack_nibbles64(L)], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    head, L = _quantize_k45(x, 31, -0.5, 15)
    return np.concatenate([head, _pack_bits32(L >> 4), _pack_nibbles64(L & 0xF)], axis=1)


def _unpack_k45(b: torch.Tensor, codes: torch.Tensor) -> Unpacked:
    sc, mn = _unpack_scales_k4(b[:, 4:16])
    d, dmin = _fp16(b[:, :2]), _fp16(b[:, 2:4])
    return Unpacked(codes, d[:, None] * sc, dmin[:, None] * mn, 32)


def unpack_q4_k(b: torch.Tensor) -> Unpacked:
    """codes uint8 0..15, scale d*sc and min dmin*m per 32."""
    return _unpack_k45(b, _unpack_nibbles64(b[:, 16:]))


def unpack_q5_k(b: torch.Tensor) -> Unpacked:
    """codes uint8 0..31, scale d*sc and min dmin*m per 32."""
    return _unpack_k45(b, _unpack_nibbles64(b[:, 48:]) | (_unpack_bits32(b[:, 16:48]) << 4))


# ---------------------------------------------------------------- Q2_K: 16 x 16, 4-bit scales and mins


def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    N = x.shape[0]
    xs = _groups(x, 16)
    scales, mins, L = make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.reshape(N, 16), mins.reshape(N, 16)
    max_scale = positive_max(scales, 1)
    max_min = positive_max(mins, 1)
    has_scale, has_min = max_scale > 0, max_min > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where(has_scale[:, None], nearest_int(rdiv(15, max_scale)[:, None] * scales), 0)
        lm = np.where(has_min[:, None], nearest_int(rdiv(15, max_min)[:, None] * mins), 0)
    sc = _to_u8(ls.astype(np.int32) | (lm.astype(np.int32) << 4))
    d = np.where(has_scale, max_scale / F32(15), F32(0))
    dmin = np.where(has_min, max_min / F32(15), F32(0))
    dj = (fp16_round(d)[:, None] * (sc & 0xF).astype(F32)).reshape(-1)
    mj = (fp16_round(dmin)[:, None] * (sc >> 4).astype(F32)).reshape(-1)
    L = _blocks(_requantize(xs, L, dj, mj, 0, 3, 0))
    return np.concatenate([sc, _pack_2bit(L), fp16_bytes(d), fp16_bytes(dmin)], axis=1)


def quantize_q2_k_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """quantize_row_q2_K_impl: make_qkx3_quants per 16, scales and mins by make_qp_quants."""
    w = qweights.superblock_weights(x, qw, scale=1.0)
    N = w.shape[0]
    xs, ws = _groups(x.reshape(-1, QK_K), 16), _groups(w, 16)
    scales, mins, L = make_qkx2_quants(xs, ws, 3, -0.9, 0.05, 36, use_mad=False)
    sw = seq_sum(ws).reshape(N, 16).T
    d, Ls = make_qp_quants(np.ascontiguousarray(scales.reshape(N, 16).T), 15, sw)
    dmin, Lm = make_qp_quants(np.ascontiguousarray(mins.reshape(N, 16).T), 15, sw)
    sc = _to_u8(Ls.T.astype(np.int32) | (Lm.T.astype(np.int32) << 4))
    dj = (fp16_round(d)[:, None] * (sc & 0xF).astype(F32)).reshape(-1)
    mj = (fp16_round(dmin)[:, None] * (sc >> 4).astype(F32)).reshape(-1)
    L = _blocks(_requantize(xs, L, dj, mj, 0, 3, 0))
    out = np.concatenate([sc, _pack_2bit(L), fp16_bytes(d), fp16_bytes(dmin)], axis=1)
    return out.reshape(x.shape[0], -1)


def unpack_q2_k(b: torch.Tensor) -> Unpacked:
    """codes uint8 0..3, scale d*(sc & 15) and min dmin*(sc >> 4) per 16."""
    sc = b[:, :16]
    d, dmin = _fp16(b[:, 80:82]), _fp16(b[:, 82:84])
    return Unpacked(_unpack_2bit(b[:, 16:80]), d[:, None] * (sc & 0xF), dmin[:, None] * (sc >> 4), 16)


# ---------------------------------------------------------------- Q3_K: 16 x 16, 6-bit signed scales


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    N = x.shape[0]
    xs = _groups(x, 16)
    scales, L = make_q3_quants(xs, 4)
    scales = scales.reshape(N, 16)
    _, max_scale = signed_absmax(scales, 1)
    nonzero = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = rdiv(-32, max_scale)
        l8 = nearest_int(iscale[:, None] * scales)
        l8 = np.where(nonzero[:, None], l8, 0).astype(np.int32)
    l8 = ((l8 + 128) & 0xFF) - 128  # the int8_t store
    l = np.where(nonzero[:, None], np.clip(l8, -32, 31) + 32, 0)
    with np.errstate(divide="ignore"):
        d = np.where(nonzero, F32(1) / iscale, F32(0))
    return _finish_q3_k(xs, L, l, d)


def _finish_q3_k(xs: np.ndarray, L: np.ndarray, l: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Pack the 6-bit scales l [N, 16] (0..63, i.e. sc + 32) and fp16 d, re-derive the codes from them."""
    N = l.shape[0]
    high = np.bitwise_or.reduce((l >> 4).reshape(N, 4, 4) << np.array([0, 2, 4, 6]).reshape(1, 4, 1), axis=1)
    packed = np.concatenate([(l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4), high], axis=1).astype(np.uint8)
    dj = (fp16_round(d)[:, None] * (l - 32).astype(F32)).reshape(-1)
    L = _blocks(_requantize(xs, L, dj, None, -4, 3, 4))
    return np.concatenate([_pack_bits32(L > 3), _pack_2bit(L & 3), packed, fp16_bytes(d)], axis=1)


def quantize_q3_k_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """quantize_row_q3_K_impl: make_qx_quants per 16 with the importance weights, the 16 scales by
    make_qx_quants weighted by each group's total weight."""
    w = qweights.superblock_weights(x, qw)
    N = w.shape[0]
    xs, ws = _groups(x.reshape(-1, QK_K), 16), _groups(w, 16)
    scales, L = make_qx_quants(xs, 4, ws)
    sw = seq_sum(ws).reshape(N, 16).T
    d, Ls = make_qx_quants(np.ascontiguousarray(scales.reshape(N, 16).T), 32, np.ascontiguousarray(sw))
    return _finish_q3_k(xs, L, Ls.T.astype(np.int32), d).reshape(x.shape[0], -1)


def unpack_q3_k(b: torch.Tensor) -> Unpacked:
    """codes int8 -4..3, scale d*(sc - 32) per 16."""
    hbit = _unpack_bits32(b[:, :32])
    codes = _unpack_2bit(b[:, 32:96]).to(torch.int8) - 4 * (1 - hbit.to(torch.int8))
    s = b[:, 96:108]
    low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)
    high = (s[:, 8:].reshape(-1, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 4, 1)) & 3
    sc = (low | (high.reshape(-1, 16) << 4)).to(torch.float32) - 32
    return Unpacked(codes, _fp16(b[:, 108:110])[:, None] * sc, None, 16)


# ---------------------------------------------------------------- Q6_K: 16 x 16, int8 scales


def quantize_q6_k_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_impl: the importance vector itself is the weight (no sigma2 term)."""
    qwb = qweights.tile(qw, x.shape[0], QK_K)
    return quantize_q6_k(x.reshape(-1, QK_K), _groups(qwb, 16)).reshape(x.shape[0], -1)


def quantize_q6_k(x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    N = x.shape[0]
    xs = _groups(x, 16)
    scales, L = make_qx_quants(xs, 32, w)
    scales = scales.reshape(N, 16)
    amax, max_scale = signed_absmax(scales, 1)
    zero = amax < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = rdiv(-128, max_scale)
        sc = np.minimum(nearest_int(iscale[:, None] * scales), 127)
        sc = np.where(zero[:, None], 0, sc).astype(np.int32)
        d = F32(1) / iscale
    dj = (fp16_round(d)[:, None] * sc.astype(F32)).reshape(-1)
    L = _blocks(_requantize(xs, L, dj, None, -32, 31, 32)).reshape(N, 2, 4, 32)
    lo, hi = L & 0xF, L >> 4
    ql = (lo[:, :, :2] | (lo[:, :, 2:] << 4)).reshape(N, 128)
    qh = np.bitwise_or.reduce(hi << _SHIFT2.reshape(1, 1, 4, 1), axis=2).reshape(N, 64)
    out = np.concatenate([ql, qh, _to_u8(sc), fp16_bytes(d)], axis=1)
    out[zero] = 0
    return out


def unpack_q6_k(b: torch.Tensor) -> Unpacked:
    """codes int8 -32..31, scale d*sc per 16."""
    N = b.shape[0]
    ql = b[:, :128].reshape(N, 2, 1, 64)
    lo = torch.cat([ql & 0xF, ql >> 4], dim=2).reshape(N, 2, 4, 32)
    qh = b[:, 128:192].reshape(N, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    codes = (lo | ((qh & 3) << 4)).reshape(N, QK_K).to(torch.int8) - 32
    sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    return Unpacked(codes, _fp16(b[:, 208:210])[:, None] * sc, None, 16)
