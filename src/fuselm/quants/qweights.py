"""How ggml's quantizers turn an importance vector into per-element weights: qw[j] * sqrt(sigma2 + x[j]^2).

sigma2 is a mean square over a span (the whole row for Q4_0..Q5_1, a super-block for the K and IQ types),
summed one element at a time as the C loops do; each type scales it its own way.
"""

from __future__ import annotations

import numpy as np

from fuselm.quants.cfloat import F32, seq_sum


def sum_squares(x: np.ndarray) -> np.ndarray:
    """x [N, n] -> [N]: `s = 0; for (j) s += x[j]*x[j];` per row."""
    return seq_sum((x * x).T)


def tile(qw: np.ndarray, rows: int, span: int) -> np.ndarray:
    """The importance vector of one row [cols] repeated for `rows` rows, as [rows * cols / span, span]."""
    return np.broadcast_to(qw.reshape(1, -1, span), (rows, qw.size // span, span)).reshape(-1, span)


def weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """x, qw [N, n], sigma2 [N] -> qw * sqrt(sigma2 + x*x)."""
    return qw * np.sqrt(sigma2[:, None] + x * x)


def superblock_weights(x: np.ndarray, qw: np.ndarray, scale: float = 2.0) -> np.ndarray:
    """x [rows, cols], qw [cols] -> weights [rows * cols / 256, 256] with sigma2 = scale * sum(x^2) / 256
    per 256-element super-block (scale 2 for Q3_K..Q5_K and IQ4_XS, 1 for Q2_K)."""
    xb = x.reshape(-1, 256)
    sigma2 = F32(scale) * sum_squares(xb) / F32(256)
    return weights(xb, tile(qw, x.shape[0], 256), sigma2)
