"""The IQ1/IQ2/IQ3, ternary and MXFP4 codecs: quantize byte for byte against llama.cpp's ggml_quantize_chunk
(with and without importance weights where ggml allows both), dequantize bit for bit against gguf-py, and a
QuantLinear over such weights runs (through the dequantizing torch path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
from test_quants import make_data
from test_quants_imatrix import assert_same_bytes, ggml_quantize_imatrix, importance

from fuselm.quants import GGML_TYPES, dequantize, quantize, requires_imatrix, unpack
from fuselm.quants.kernels import QuantLinear
from fuselm.quants.tensor import QuantizedWeight

SIMPLE = ["TQ1_0", "TQ2_0", "MXFP4"]  # no search, no importance weights
IQ = ["IQ2_XS", "IQ3_S", "IQ3_XXS", "IQ2_XXS", "IQ2_S", "IQ1_S", "IQ1_M"]
KINDS = ["normal", "student_t", "zeros", "constant", "outlier", "edge"]


def _widths(type_name: str) -> tuple[int, ...]:
    return (32, 96, 4544) if GGML_TYPES[type_name].block_size == 32 else (256, 512, 4608)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("type_name", SIMPLE)
def test_simple_types_match_llama_cpp(type_name: str, kind: str) -> None:
    for cols in _widths(type_name):
        x = make_data(kind, max(2, min(8, 8192 // cols)), cols)
        assert_same_bytes(quantize(torch.from_numpy(x), type_name).numpy(), ggml_quantize_imatrix(x, type_name, None),
                          f"{type_name} {kind} cols={cols}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("type_name", IQ)
def test_iq_types_match_llama_cpp(type_name: str, kind: str) -> None:
    """Few rows: these searches are slow in ggml too. Both paths where ggml has both."""
    for cols in (256, 512):
        x = make_data(kind, 3, cols)
        for wkind in ("lognormal", "sparse"):
            w = importance(wkind, cols)
            assert_same_bytes(quantize(x, type_name, imatrix=w).numpy(), ggml_quantize_imatrix(x, type_name, w),
                              f"{type_name} {kind} imatrix={wkind} cols={cols}")
        if not requires_imatrix(type_name):
            assert_same_bytes(quantize(x, type_name).numpy(), ggml_quantize_imatrix(x, type_name, None),
                              f"{type_name} {kind} no imatrix cols={cols}")


@pytest.mark.parametrize("type_name", IQ)
def test_iq_types_wide_rows(type_name: str) -> None:
    x = make_data("student_t", 2, 4608)
    w = importance("lognormal", 4608)
    assert_same_bytes(quantize(x, type_name, imatrix=w, threads=2).numpy(), ggml_quantize_imatrix(x, type_name, w),
                      f"{type_name} cols=4608")


def _reference_bytes(type_name: str, x: np.ndarray) -> np.ndarray:
    w = importance("lognormal", x.shape[1]) if requires_imatrix(type_name) else None
    return ggml_quantize_imatrix(x, type_name, w)


@pytest.mark.parametrize("type_name", SIMPLE + IQ)
def test_dequantize_matches_gguf_py(type_name: str) -> None:
    cols = 512
    x = np.concatenate([make_data(k, 1, cols) for k in KINDS])
    data = _reference_bytes(type_name, x)
    ref = gguf_quants.dequantize(data, GGMLQuantizationType[type_name]).reshape(x.shape).astype(np.float32)
    ours = dequantize(torch.from_numpy(data), type_name, x.shape).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    # the codes-and-scales form rebuilds the same values
    u = unpack(data, type_name, x.shape)
    assert u.codes.dtype == torch.int8 and u.min is None
    q = u.codes.to(torch.float32).reshape(x.shape[0], -1, u.group)
    w = (u.scale[..., None] * q).reshape(x.shape).numpy()
    np.testing.assert_array_equal(w.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("type_name", ["IQ2_XS", "IQ3_S", "TQ2_0", "MXFP4"])
def test_quant_linear_runs_new_types(type_name: str) -> None:
    """A model layer with such a weight runs through the dequantize fallback and matches a dense linear."""
    x = make_data("normal", 48, 512)
    data = _reference_bytes(type_name, x)
    weight = QuantizedWeight(torch.from_numpy(data), type_name, x.shape)
    layer = QuantLinear(weight)
    inputs = torch.randn(3, 512)
    expected = inputs @ weight.dequantize().T
    torch.testing.assert_close(layer(inputs), expected, rtol=1e-4, atol=1e-4)
