"""The native quantizers (csrc/quantize.cpp) write the same bytes as the numpy codecs, which are the spec (and are
themselves tested against ggml_quantize_chunk), on heavy-tailed, zero, constant and outlier rows of several
widths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ggml_ref import ggml_quantize

from fuselm.errors import FuselmError
from fuselm.quants import quantize
from fuselm.quants.native_quantize import native_quantize, native_types

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


def _rows(cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, size=(24, cols)).astype(np.float32) * rng.random((24, 1), np.float32)  # heavy tails
    x[0] = 0  # zero
    x[1] = -0.0
    x[2] = 0.75  # constant
    x[3] = -2.5
    x[4, ::97] = 300  # outliers
    x[5] = rng.standard_normal(cols).astype(np.float32) * 1e-20  # below ggml's group epsilon
    x[6, : cols // 2] = 0  # half zero
    x[7] = np.abs(x[7])  # all positive (min clamps to 0)
    x[8] = -np.abs(x[8])
    return x


def test_library_builds_here():
    assert set(TYPES) <= native_types(), "the native quantizers did not build on this machine"


@pytest.mark.parametrize("cols", [256, 512, 2048, 4864])
@pytest.mark.parametrize("qtype", TYPES)
def test_native_equals_numpy_codec(qtype, cols):
    x = _rows(cols, cols)
    ours = native_quantize(x, qtype)
    assert ours is not None
    assert np.array_equal(ours, quantize(x, qtype).numpy())
    assert np.array_equal(ours, ggml_quantize(x, qtype))  # and therefore llama.cpp's


def test_unknown_type_falls_back():
    assert native_quantize(np.zeros((1, 32), np.float32), "F16") is None


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e10, 1e11, 3e38])
@pytest.mark.parametrize("qtype", TYPES)
def test_bad_values_leave_it_to_the_codec(qtype, value):
    """NaN/Inf, overflowing fp16 scales and values beyond 2^40: the native quantizer steps aside (None), so the
    numpy codec decides: it raises the error naming the tensor, or writes the bytes."""
    x = _rows(256, 1)
    x[3, 7] = value
    ours = native_quantize(x, qtype)
    try:
        spec = quantize(x, qtype).numpy()
    except FuselmError:
        assert ours is None
    else:
        assert ours is None or np.array_equal(ours, spec)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qtype", TYPES)
def test_half_inputs_are_widened_exactly(qtype, dtype):
    x = torch.from_numpy(_rows(512, 3)).to(dtype)
    ours = native_quantize(x, qtype)
    assert ours is not None and np.array_equal(ours, quantize(x.float(), qtype).numpy())
