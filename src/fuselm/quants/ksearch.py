"""The per-group scale searches of ggml's K-quant reference quantizers, vectorized over groups.

Layout: x [n, G] holds G groups of n elements with the element index first, so that the C loops
`for (i = 0; i < n; ++i) sum += ...` become n additions of contiguous [G] (or [candidates, G]) slices in the
same order. Where the trial scales of a search are independent they are evaluated at once along a
candidate dimension and only the choice among them, a comparison against a running best, is replayed step
by step.
"""

from __future__ import annotations

import numpy as np
import torch

from fuselm.quants.cfloat import GROUP_MAX_EPS, nearest_int, rdiv, seq_sum, signed_absmax


def _pick(t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """t [n, C, G], k [G] -> t[:, k[g], g]."""
    return t.gather(1, k[None, None].expand(t.shape[0], 1, -1)).squeeze(1)


def make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric search (Q2_K, Q4_K, Q5_K). x, w [n, G] -> (scale [G], -min [G], L [n, G] in 0..nmax).

    The trial scales are not independent: each accepted one moves `min`, which the next trials start from,
    so the nstep + 1 trials run one after another, each over all groups.
    """
    n, G = x.shape
    mx = x.amax(0)
    mn = x.amin(0)
    sum_w = seq_sum(w, from_zero=False)
    sum_x = seq_sum(w * x, from_zero=False)
    mn = torch.where(mn > 0, 0.0, mn)
    flat = mx == mn

    def error(diff: torch.Tensor) -> torch.Tensor:
        return seq_sum(w * (diff.abs() if use_mad else diff * diff))

    iscale = rdiv(nmax, mx - mn)
    scale = 1.0 / iscale
    L = nearest_int(iscale * (x - mn)).clamp_(0, nmax)
    best = error(scale * L + mn - x)

    terms = torch.empty((n, 3, G), dtype=torch.float32)
    steps = np.float32(rmin) + np.float32(rdelta) * np.arange(nstep + 1, dtype=np.float32) + np.float32(nmax)
    # remember which trial won and the min it started from; its L is rebuilt once at the end
    won = torch.zeros(G, dtype=torch.bool)
    won_step = torch.zeros(G)
    won_from = mn
    for step in steps.tolist():  # float32 values, exact as Python floats
        isc = rdiv(step, mx - mn)
        laux = nearest_int(isc * (x - mn)).clamp_(0, nmax)
        wl = torch.mul(w, laux, out=terms[:, 0])
        torch.mul(wl, laux, out=terms[:, 1])
        torch.mul(wl, x, out=terms[:, 2])
        sum_l, sum_l2, sum_xl = seq_sum(terms)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clip = this_min > 0
        this_min = torch.where(clip, 0.0, this_min)
        this_scale = torch.where(clip, sum_xl / sum_l2, this_scale)
        cur = error(this_scale * laux + this_min - x)
        better = (D > 0) & (cur < best)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        won |= better
        won_step = torch.where(better, step, won_step)
        won_from = torch.where(better, mn, won_from)
        mn = torch.where(better, this_min, mn)
    isc = torch.where(won, won_step, float(nmax)) / (mx - won_from)
    L = torch.where(won, nearest_int(isc * (x - won_from)).clamp_(0, nmax), L)
    return torch.where(flat, 0.0, scale), -mn, torch.where(flat, 0.0, L)


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric search with weights x^2 (make_qx_quants rmse_type 1, no imatrix; Q6_K).

    x [n, G] -> (scale [G], L [n, G] in 0..2*nmax-1; all zero for groups with max |x| < 1e-15).
    """
    amax, mx = signed_absmax(x, 0)
    # is = 0 gives the starting iscale -nmax/max; then is = -9..9 in C's order
    order = [0] + [i for i in range(-9, 10) if i != 0]
    consts = -(np.float32(nmax) + np.float32(0.1) * np.array(order, dtype=np.float32))
    isc = torch.from_numpy(consts)[:, None] / mx[None]
    l = nearest_int(isc[None] * x[:, None]).clamp_(-nmax, nmax - 1)
    w = x * x
    n, C, G = l.shape
    terms = torch.empty((n, 2, C, G), dtype=torch.float32)
    torch.mul((w * x)[:, None], l, out=terms[:, 0])
    torch.mul(torch.mul(w[:, None], l), l, out=terms[:, 1])
    sumlx, suml2 = seq_sum(terms)
    del terms

    scale = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], 0.0)
    best = scale * sumlx[0]
    k = torch.zeros(G, dtype=torch.int64)
    for c in range(1, C):
        slx, sl2 = sumlx[c], suml2[c]
        better = (sl2 > 0) & (slx * slx > best * sl2)
        scale = torch.where(better, slx / sl2, scale)
        best = torch.where(better, scale * slx, best)
        k = torch.where(better, c, k)
    L = _pick(l, k) + nmax
    zero = amax < GROUP_MAX_EPS
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, L)


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric search with coordinate descent (make_q3_quants with do_rmse; Q3_K).

    x [n, G] -> (scale [G], L [n, G] in 0..2*nmax-1; all zero for groups with max |x| < 1e-15).
    """
    amax, mx = signed_absmax(x, 0)
    n, G = x.shape
    L = nearest_int(rdiv(-nmax, mx) * x).clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = seq_sum(wx * L)
    suml2 = seq_sum(w * L * L)

    # up to 5 passes of coordinate descent; each pass only revisits groups that changed in the last one
    active = torch.arange(G)
    for _ in range(5):
        if active.numel() == 0:
            break
        xa, wa, wxa, La = x[:, active], w[:, active], wx[:, active], L[:, active]
        slx_a, sl2_a = sumlx[active], suml2[active]
        changed = torch.zeros(active.numel(), dtype=torch.bool)
        for i in range(n):
            li = La[i]
            slx = slx_a - wxa[i] * li
            sl2 = sl2_a - wa[i] * li * li
            new = nearest_int(xa[i] * sl2 / slx).clamp_(-nmax, nmax - 1)
            slx_new = slx + wxa[i] * new
            sl2_new = sl2 + wa[i] * new * new
            ok = (slx > 0) & (new != li) & (sl2_new > 0) & (slx_new * slx_new * sl2_a > slx_a * slx_a * sl2_new)
            La[i] = torch.where(ok, new, li)
            slx_a = torch.where(ok, slx_new, slx_a)
            sl2_a = torch.where(ok, sl2_new, sl2_a)
            changed |= ok
        L[:, active] = La
        sumlx[active] = slx_a
        suml2[active] = sl2_a
        active = active[changed]
        print("active", active.numel())

    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    zero = amax < GROUP_MAX_EPS
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, L + nmax)
