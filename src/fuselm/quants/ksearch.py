"""The per-group scale searches of ggml's K-quant reference quantizers, vectorized over groups (numpy).

Layout: x [n, G] holds G groups of n elements with the element index first, so that the C loops
`for (i = 0; i < n; ++i) sum += ...` become a row-by-row reduction in the same order (cfloat.seq_sum).
Where the trial scales of a search are independent they are evaluated at once along a candidate axis and
only the choice among them, a comparison against a running best, is replayed step by step.
"""

from __future__ import annotations

import numpy as np

from fuselm.quants.cfloat import (
    F32,
    GROUP_MAX_EPS,
    first_extreme,
    nearest_int,
    rdiv,
    select,
    seq_sum,
    signed_absmax,
)


def make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric search (Q2_K, Q4_K, Q5_K). x, w [n, G] -> (scale [G], -min [G], L [n, G] in 0..nmax).

    The trial scales are not independent: each accepted one moves `min`, which the next trials start from,
    so the nstep + 1 trials run one after another, each over all groups.
    """
    n, G = x.shape
    mx = x.max(axis=0)
    mn = first_extreme(x, 0, largest=False)  # the sign of a zero min reaches Q4_1/Q5_1's stored m
    sum_w = seq_sum(w, from_zero=False)
    sum_x = seq_sum(w * x, from_zero=False)
    mn = np.where(mn > 0, F32(0), mn)
    flat = mx == mn
    buf = np.empty((n, G), dtype=F32)
    terms = np.empty((n, 3, G), dtype=F32)
    laux = np.empty((n, G), dtype=F32)

    def codes(iscale: np.ndarray, start: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.subtract(x, start, out=out)
        np.multiply(iscale, out, out=out)
        nearest_int(out, out=out)
        return np.clip(out, 0, nmax, out=out)

    def error(scale: np.ndarray, L: np.ndarray, start: np.ndarray) -> np.ndarray:
        d = np.multiply(scale, L, out=buf)
        d += start
        d -= x
        if use_mad:
            np.abs(d, out=d)
        else:
            np.multiply(d, d, out=d)
        d *= w
        return seq_sum(d)

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = rdiv(nmax, mx - mn)
        scale = F32(1) / iscale
        L = codes(iscale, mn, np.empty((n, G), dtype=F32))
        best = error(scale, L, mn)

        steps = F32(rmin) + F32(rdelta) * np.arange(nstep + 1, dtype=F32) + F32(nmax)
        # remember which trial won and the min it started from; its L is rebuilt once at the end
        won = np.zeros(G, dtype=bool)
        won_step = np.zeros(G, dtype=F32)
        won_from = mn.copy()
        for step in steps:
            codes(step / (mx - mn), mn, laux)
            wl = np.multiply(w, laux, out=terms[:, 0])
            np.multiply(wl, laux, out=terms[:, 1])
            np.multiply(wl, x, out=terms[:, 2])
            sum_l, sum_l2, sum_xl = seq_sum(terms)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clip = this_min > 0
            this_min = select(clip, 0.0, this_min)
            this_scale = select(clip, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, laux, this_min)
            better = (D > 0) & (cur < best)
            best = select(better, cur, best)
            scale = select(better, this_scale, scale)
            won |= better
            won_step = select(better, step, won_step)
            won_from = select(better, mn, won_from)
            mn = select(better, this_min, mn)
        np.copyto(L, codes(won_step / (mx - won_from), won_from, laux), where=won)
    L[:, flat] = 0
    return np.where(flat, F32(0), scale), -mn, L


SLICE = 2048  # groups per pass over a [n, candidates, groups] block: keeps it in cache


def make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric search (make_qx_quants rmse_type 1) with weights w [n, G], x^2 when None (Q6_K, and with
    importance weights Q3_K, Q4_0, Q5_0).

    x [n, G] -> (scale [G], L [n, G] in 0..2*nmax-1; all zero for groups with max |x| < 1e-15).
    The 19 trial scales only differ in iscale, so their sums are computed together ([n, 19, groups] at a
    time); the choice among them then replays C's running comparison.
    """
    amax, mx = signed_absmax(x, 0)
    n, G = x.shape
    # is = 0 is the starting iscale -nmax/max; then is = -9..9 in C's order
    order = np.array([0] + [i for i in range(-9, 10) if i != 0], dtype=F32)
    consts = -(F32(nmax) + F32(0.1) * order)
    C = consts.size
    with np.errstate(divide="ignore", invalid="ignore"):
        isc = consts[:, None] / mx[None]  # [C, G]
        w = x * x if w is None else w
        wx = w * x
        sumlx = np.empty((C, G), dtype=F32)
        suml2 = np.empty((C, G), dtype=F32)
        for g0 in range(0, G, SLICE):
            g = slice(g0, g0 + SLICE)
            l = np.multiply(isc[None, :, g], x[:, None, g])
            np.clip(nearest_int(l, out=l), -nmax, nmax - 1, out=l)
            terms = np.empty((n, 2, *l.shape[1:]), dtype=F32)
            np.multiply(wx[:, None, g], l, out=terms[:, 0])
            np.multiply(w[:, None, g], l, out=terms[:, 1])
            terms[:, 1] *= l
            sumlx[:, g], suml2[:, g] = seq_sum(terms)

        scale = np.where(suml2[0] != 0, sumlx[0] / suml2[0], F32(0))
        best = scale * sumlx[0]
        k = np.zeros(G, dtype=np.intp)
        for c in range(1, C):
            slx, sl2 = sumlx[c], suml2[c]
            better = (sl2 > 0) & (slx * slx > best * sl2)
            scale = select(better, slx / sl2, scale)
            best = select(better, scale * slx, best)
            k[better] = c
        # rebuild the winner's levels rather than keep all candidates'
        L = np.clip(nearest_int(isc[k, np.arange(G)] * x), -nmax, nmax - 1) + F32(nmax)
    zero = amax < GROUP_MAX_EPS
    L[:, zero] = 0
    return np.where(zero, F32(0), scale), L


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric search with coordinate descent (make_q3_quants with do_rmse; Q3_K).

    x [n, G] -> (scale [G], L [n, G] in 0..2*nmax-1; all zero for groups with max |x| < 1e-15).

    C visits the elements one by one (up to 5 passes) and accepts a new level for element i only if it
    improves the fit, updating the running sums. Accepted changes are rare, so each round evaluates every
    remaining element of a group against the current sums at once: up to the first acceptance this is
    exactly what the sequential loop computes. That change is applied and the next round resumes after it.
    """
    amax, mx = signed_absmax(x, 0)
    n, G = x.shape
    with np.errstate(divide="ignore", invalid="ignore"):
        L = np.clip(nearest_int(rdiv(-nmax, mx) * x), -nmax, nmax - 1)
        w = x * x
        wx = w * x
        wxL = wx * L  # each element's terms of sumlx and suml2, kept current as L changes
        wLL = w * L * L
        sumlx = seq_sum(wxL)
        suml2 = seq_sum(wLL)

        # the rounds gather whole groups, so they work on [G, n] copies (a group is one contiguous row)
        xT, wT, wxT, LT, wxLT, wLLT = (np.ascontiguousarray(a.T) for a in (x, w, wx, L, wxL, wLL))
        pos = np.zeros(G, dtype=np.intp)  # next element to visit in the current pass
        passes = np.zeros(G, dtype=np.intp)
        changed = np.zeros(G, dtype=bool)
        active = np.arange(G)
        cols = np.arange(n)
        while active.size:
            if active.size == G:  # every group (the first round): views, all updates come after their use
                xa, La, wxLa, wLLa, slx_a, sl2_a = xT, LT, wxLT, wLLT, sumlx, suml2
            else:
                xa, La, wxLa, wLLa = xT[active], LT[active], wxLT[active], wLLT[active]
                slx_a, sl2_a = sumlx[active], suml2[active]
            slx = slx_a[:, None] - wxLa
            sl2 = sl2_a[:, None] - wLLa
            new = np.clip(nearest_int(xa * sl2 / slx), -nmax, nmax - 1)
            cand = (new != La) & (slx > 0)
            if pos.any():
                cand &= cols >= pos[active][:, None]
            # few elements propose a new level: finish the test on those only
            flat = np.flatnonzero(cand)  # by group, then element
            a, i = flat // n, flat % n
            g = active[a]
            new_c = new[a, i]
            wx_new = wxT[g, i] * new_c
            wll_new = wT[g, i] * new_c * new_c
            slx_new = slx[a, i] + wx_new
            sl2_new = sl2[a, i] + wll_new
            ok = (sl2_new > 0) & (slx_new * slx_new * sl2_a[a] > slx_a[a] * slx_a[a] * sl2_new)
            a, i, g = a[ok], i[ok], g[ok]
            win = np.ones(a.size, dtype=bool)  # the first accepted element of each group
            win[1:] = a[1:] != a[:-1]
            hit = np.zeros(active.size, dtype=bool)
            hit[a] = True

            g, j = g[win], i[win]
            LT[g, j] = new_c[ok][win]
            wxLT[g, j] = wx_new[ok][win]
            wLLT[g, j] = wll_new[ok][win]
            sumlx[g] = slx_new[ok][win]
            suml2[g] = sl2_new[ok][win]
            pos[g] = j + 1
            changed[g] = True

            # groups with nothing left to accept in this pass: next pass if it changed something
            g = active[~hit]
            again = changed[g] & (passes[g] < 4)
            passes[g[again]] += 1
            pos[g] = 0
            changed[g] = False
            active = np.concatenate([active[hit], g[again]])
        L = np.ascontiguousarray(LT.T)

        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    L += F32(nmax)
    zero = amax < GROUP_MAX_EPS
    L[:, zero] = 0
    return np.where(zero, F32(0), scale), L


def _u8(a: np.ndarray) -> np.ndarray:
    """A C int stored in uint8_t and read back as a number: its low 8 bits."""
    return (a.astype(np.int64) & 0xFF).astype(F32)


def make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive-scale search with coordinate descent (make_qp_quants; the super-block scales of the K-quants
    with importance weights). x, w [n, G] -> (scale [G], L [n, G], the uint8_t codes as floats 0..255).

    The descent visits element i of every group at once (groups are independent; C's order within a group is
    kept), up to 5 passes, a group stopping after a pass without change. L is C's uint8_t array, so a negative
    level (only possible for a negative x) wraps there as it does in C.
    """
    n, G = x.shape
    mx = np.maximum(x.max(axis=0), F32(0))
    zero = mx < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(nmax) / mx
        L0 = nearest_int(iscale * x)
        diff = x - (F32(1) / iscale) * _u8(L0)
        best = seq_sum(w * diff * diff)
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            isc = (F32(0.1) * F32(step) + F32(nmax)) / mx
            l = np.minimum(nearest_int(isc * x), F32(nmax))
            diff = x - (F32(1) / isc) * l
            mse = seq_sum(w * diff * diff)
            better = mse < best
            best = select(better, mse, best)
            iscale = select(better, isc, iscale)
        l = np.minimum(nearest_int(iscale * x), F32(nmax))
        wx = w * x
        sumlx = seq_sum(wx * l)  # the sums take the int level, the array keeps its uint8_t store
        suml2 = seq_sum(w * l * l)
        L = _u8(l)
        active = np.ones(G, dtype=bool)
        for _ in range(5):
            changed = np.zeros(G, dtype=bool)
            for i in range(n):
                slx = sumlx - wx[i] * L[i]
                sl2 = suml2 - w[i] * L[i] * L[i]
                new = np.minimum(nearest_int(x[i] * sl2 / slx), F32(nmax))
                cand = active & (slx > 0) & (sl2 > 0) & (new != L[i])
                slx = slx + wx[i] * new
                sl2 = sl2 + w[i] * new * new
                ok = cand & (slx * slx * suml2 > sumlx * sumlx * sl2)
                L[i] = np.where(ok, _u8(new), L[i])
                sumlx = select(ok, slx, sumlx)
                suml2 = select(ok, sl2, suml2)
                changed |= ok
            active &= changed
            if not active.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    L[:, zero] = 0
    return np.where(zero, F32(0), scale), L
