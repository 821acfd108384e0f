"""The lattices of the IQ1/IQ2/IQ3 types and the neighbour lists ggml builds at init (iq2xs_init_impl,
iq3xs_init_impl), computed once per type with numpy and cached.

A lattice point is a few elements (8 or 4), each a level index l; the quantizers work with the odd integers
2l + 1. The points come from gguf-py's grid tables (the same order as ggml's kgrid tables, so a point's
index is the index stored in the blocks). For each off-grid point the quantizers may meet, ggml keeps the grid
points within its `nwant` smallest distinct squared distances, ordered by (distance, index).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from gguf import quants as gguf_quants

from fuselm.quants.cfloat import F32


@dataclass(frozen=True)
class Lattice:
    levels: np.ndarray  # uint8 [G, dim]: level index of each element of each grid point
    pos: np.ndarray  # float32 [G, dim]: 2l + 1 (the quantizers' coordinates)
    values: np.ndarray  # the dequantized grid values [G, dim] (gguf-py's grid, float32)
    bits: int  # bits per element in a point's key
    index_of: np.ndarray  # int32 [2**(bits*dim)]: grid index of a key, -1 when off the grid
    neighbour_row: np.ndarray  # int32 [2**(bits*dim)]: row in `neighbours` of an off-grid key, -1 if none
    neighbours: np.ndarray  # int32 [R, K]: grid indices in ggml's order, padded with -1
    counts: np.ndarray  # int32 [R]: list lengths
    neighbour_levels: np.ndarray  # float32 [R, dim, K]: the neighbours' levels, element-major (0 in the padding)
    neighbour_pos: np.ndarray  # float32 [R, dim, K]: 2l + 1 of the same

    def key(self, L: np.ndarray) -> np.ndarray:
        """Level indices [..., dim] -> the key sum(l_i << bits*i)."""
        shifts = np.arange(L.shape[-1], dtype=np.int64) * self.bits
        return (L.astype(np.int64) << shifts).sum(-1)


def _grid(name: str) -> tuple[np.ndarray, np.ndarray]:
    cls = getattr(gguf_quants, name)
    cls.init_grid()
    values = np.asarray(cls.grid, dtype=F32).reshape(cls.grid_shape)
    grid_map = np.array(cls.grid_map, dtype=F32)  # ascending: a value's position is its level
    return np.searchsorted(grid_map, values).astype(np.uint8), values


# type -> (gguf-py class with the grid, bits per element in a key, nwant, largest level the quantizer produces)
_SPECS = {
    "IQ2_XXS": ("IQ2_XXS", 2, 2, 2),
    "IQ2_XS": ("IQ2_XS", 2, 2, 2),
    "IQ2_S": ("IQ2_S", 2, 1, 2),
    "IQ3_XXS": ("IQ3_XXS", 3, 2, 7),
    "IQ3_S": ("IQ3_S", 3, 3, 7),
    "IQ1_S": ("IQ1_S", 2, 3, 2),
    "IQ1_M": ("IQ1_S", 2, 3, 2),  # IQ1_M shares IQ1_S's grid and neighbour lists
}


@functools.cache
def lattice(type_name: str) -> Lattice:
    cls_name, bits, nwant, top = _SPECS[type_name]
    levels, values = _grid(cls_name)
    G, dim = levels.shape
    pos = (2 * levels.astype(np.int32) + 1).astype(F32)
    shifts = np.arange(dim) * bits
    index_of = np.full(1 << (bits * dim), -1, dtype=np.int32)
    index_of[(levels.astype(np.int64) << shifts).sum(-1)] = np.arange(G, dtype=np.int32)

    # every key the quantizers can form: levels 0..top in each element
    digits = np.stack(np.meshgrid(*[np.arange(top + 1)] * dim, indexing="ij"), -1).reshape(-1, dim)
    keys = (digits.astype(np.int64) << shifts).sum(-1)
    off = index_of[keys] < 0
    digits, keys = digits[off], keys[off]
    qpos = 2 * digits.astype(np.int32) + 1
    gpos = pos.astype(np.int32)
    d2 = ((qpos[:, None, :] - gpos[None, :, :]) ** 2).sum(-1).astype(np.int32)  # [Q, G]
    # the nwant-th smallest distinct distance of each query
    thr = d2.min(axis=1)
    for _ in range(nwant - 1):
        above = np.where(d2 > thr[:, None], d2, np.iinfo(np.int32).max)
        nxt = above.min(axis=1)
        thr = np.where(nxt == np.iinfo(np.int32).max, thr, nxt)
    inside = d2 <= thr[:, None]
    K = int(inside.sum(1).max())
    sort_key = np.where(inside, d2, np.iinfo(np.int32).max)
    order = np.argsort(sort_key, axis=1, kind="stable")[:, :K].astype(np.int32)  # by distance, then index
    taken = np.take_along_axis(inside, order, axis=1)
    neighbours = np.where(taken, order, -1)
    neighbour_row = np.full_like(index_of, -1)
    neighbour_row[keys] = np.arange(keys.size, dtype=np.int32)
    counts = taken.sum(1).astype(np.int32)
    neighbour_levels = np.ascontiguousarray(levels[np.maximum(neighbours, 0)].transpose(0, 2, 1)).astype(F32)
    return Lattice(levels, pos, values, bits, index_of, neighbour_row, neighbours, counts, neighbour_levels,
                   neighbour_levels * F32(2) + F32(1))


def best_neighbour(lat: Lattice, keys: np.ndarray, xval: np.ndarray, w: np.ndarray, scale: np.ndarray,
                   level_values: np.ndarray | None = None) -> np.ndarray:
    """iq*_find_best_neighbour for M off-grid points at once: keys [M], xval, w [M, dim], scale [M] -> grid
    index [M] of the neighbour minimising sum w*(scale*q - x)^2 (summed in element order; first of equals).
    q is 2l + 1 for a level l, or level_values[m, l] when given (IQ1's levels, evenly spaced by 1 per point).

    Lists run from a handful to hundreds of neighbours, so points go in buckets of similar list length."""
    rows = lat.neighbour_row[keys]
    counts = lat.counts[rows]
    out = np.empty(keys.size, dtype=np.int32)
    lo = 0
    for hi in (3, 5, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, lat.neighbours.shape[1]):
        sel = np.flatnonzero((counts > lo) & (counts <= hi))
        lo = hi
        if not sel.size:
            continue
        K = int(counts[sel].max())
        if level_values is None:
            q = lat.neighbour_pos[rows[sel], :, :K]  # [m, dim, K]
        else:  # levels v0, v0 + 1, v0 + 2: v0 + l is exact
            q = lat.neighbour_levels[rows[sel], :, :K] + level_values[sel, :1, None]
        q *= scale[sel, None, None]
        q -= xval[sel, :, None]  # diff = scale*q - x
        term = w[sel, :, None] * q  # (w*diff)*diff, C's order
        term *= q
        d2 = np.zeros((sel.size, K), dtype=F32)
        for i in range(q.shape[1]):
            d2 += term[:, i]
        d2[np.arange(K) >= counts[sel, None]] = np.inf  # the padding
        out[sel] = lat.neighbours[rows[sel], d2.argmin(axis=1)]
    return out
