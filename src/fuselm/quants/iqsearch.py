"""The scale search shared by the IQ2/IQ3 quantizers (quantize_row_iq2_*_impl, quantize_row_iq3_*_impl).

Groups of magnitudes [G, n] are rounded, for each trial scale, to lattice levels point by point (8 or 4
elements); an off-grid point is replaced by its best neighbour. The trial with the best weighted fit wins
(C's running comparison, replayed across all groups at once), then the points are requantized once with it.
"""

from __future__ import annotations

import numpy as np

from fuselm.quants.cfloat import F32, nearest_int
from fuselm.quants.iq_grids import Lattice, best_neighbour
from fuselm.quants.iqcommon import sum_last


def snap(lat: Lattice, kmaxq: int, xval: np.ndarray, waux: np.ndarray, id_: np.ndarray, scale: np.ndarray
         ) -> tuple[np.ndarray, np.ndarray]:
    """Round [G, n] magnitudes to levels 0..kmaxq-1 with inverse scale id_ [G]; off-grid points take their best
    neighbour under `scale`. -> (levels uint8 [G, n], was on the grid [G, n/dim])."""
    G, n = xval.shape
    dim = lat.pos.shape[1]
    L = np.clip(nearest_int(F32(0.5) * (id_[:, None] * xval - F32(1))), 0, kmaxq - 1).astype(np.uint8)
    L = L.reshape(G, n // dim, dim)
    on = lat.index_of[lat.key(L)] >= 0
    g, h = np.nonzero(~on)
    if g.size:
        keys = lat.key(L[g, h])
        found = best_neighbour(lat, keys, xval.reshape(G, -1, dim)[g, h], waux.reshape(G, -1, dim)[g, h], scale[g])
        L[g, h] = lat.levels[found]
    return L.reshape(G, n), on


def fit(xval: np.ndarray, w: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sumqx, sumq2 of levels L with q = 2L + 1 (C's order: w*x*q and w*q*q, summed from 0)."""
    q = F32(2) * L.astype(F32) + F32(1)
    return sum_last(w * xval * q), sum_last(w * q * q)


def search(lat: Lattice, kmaxq: int, xval: np.ndarray, w: np.ndarray, waux: np.ndarray, top: np.ndarray,
           steps: range, delta: float, scale: np.ndarray, L: np.ndarray, on_grid: bool, redo: str
           ) -> tuple[np.ndarray, np.ndarray]:
    """Trial scales id = (2*kmaxq - 1 + delta*is) / top for is in steps, then one requantization with the
    winner's scale (when it is > 0):

    redo "off-grid": only the off-grid points, if any (IQ2_XS, IQ3_XXS, IQ2_S);
         "all-if-off-grid": every point, if any is off the grid (IQ3_S);
         "all": every point (IQ2_XXS).
    scale, L: the starting scale [G] and levels [G, n]; on_grid: the starting on-grid flag of every point.
    -> (scale [G], levels [G, n])."""
    G, n = xval.shape
    dim = lat.pos.shape[1]
    best = np.zeros(G, dtype=F32)
    on = np.full((G, n // dim), on_grid)
    for step in steps:
        id_ = (F32(2 * kmaxq - 1) + F32(step) * F32(delta)) / top
        Laux, on_aux = snap(lat, kmaxq, xval, waux, id_, F32(1) / id_)
        sumqx, sumq2 = fit(xval, w, Laux)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        scale = np.where(better, sumqx / sumq2, scale)
        best = np.where(better, scale * sumqx, best)
        L = np.where(better[:, None], Laux, L)
        on = np.where(better[:, None], on_aux, on)

    again = scale > 0
    if redo != "all":
        again &= ~on.all(1)
    r = np.flatnonzero(again)
    if r.size:
        Lr, _ = snap(lat, kmaxq, xval[r], waux[r], F32(1) / scale[r], scale[r])
        if redo == "off-grid":  # the on-grid points keep their levels
            Lr = np.where(np.repeat(on[r], dim, axis=1), L[r], Lr)
        L[r] = Lr
        sumqx, sumq2 = fit(xval[r], w[r], Lr)
        scale[r] = np.where(sumq2 > 0, sumqx / sumq2, scale[r])
    return scale, L
