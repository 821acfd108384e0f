"""GGML codecs against their references.

quantize: byte for byte against llama.cpp's ggml_quantize_chunk (llama-cpp-python's libggml-base, ctypes).
dequantize: bit for bit against gguf-py's gguf.quants.dequantize.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from ggml_ref import ggml_quantize, libggml_base
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from fuselm.errors import FuselmError
from fuselm.quants import GGML_TYPES, dequantize, quantize, row_bytes, unpack

BLOCK_32 = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"]
BLOCK_256 = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]
ELEMENTWISE = ["F32", "F16", "BF16"]
WIDTHS = {**{t: (32, 96, 4544) for t in BLOCK_32 + ELEMENTWISE}, **{t: (256, 512, 2048) for t in BLOCK_256}}


def _edge_row(cols: int, rng: np.random.Generator) -> np.ndarray:
    """Blocks that hit the special paths: signed zeros, values under GROUP_MAX_EPS, +-a ties, exact halves,
    a lone nonzero, a negative-only block, huge and tiny magnitudes."""
    patterns = [
        np.full(32, -0.0),
        np.where(np.arange(32) % 2 == 0, 0.0, -0.0),
        rng.standard_normal(32) * 1e-17,
        np.concatenate([[0.5, -0.5], rng.uniform(-0.5, 0.5, 30)]),
        np.round(rng.uniform(-8, 8, 32) * 2) / 2,
        np.eye(1, 32, 7)[0] * -3.0,
        -np.abs(rng.standard_normal(32)) - 1.0,
        rng.standard_normal(32) * 1e3,
        rng.standard_normal(32) * 1e-6,
    ]
    reps = -(-cols // (32 * len(patterns)))
    return np.concatenate(patterns * reps)[:cols]


def make_data(kind: str, rows: int, cols: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"{kind}-{rows}-{cols}".encode()))
    if kind == "normal":
        x = rng.standard_normal((rows, cols)) * 0.02
    elif kind == "student_t":
        x = rng.standard_t(2.0, (rows, cols)) * 0.01
    elif kind == "zeros":
        x = np.zeros((rows, cols))
    elif kind == "constant":
        x = np.full((rows, cols), 0.37)
        x[rows // 2 :] = -1.25
    elif kind == "outlier":
        x = rng.standard_normal((rows, cols)) * 0.01
        x[rng.integers(rows), rng.integers(cols)] = 40.0
    elif kind == "edge":
        x = np.stack([_edge_row(cols, rng) for _ in range(rows)])
    else:
        raise ValueError(kind)
    return np.ascontiguousarray(x, dtype=np.float32)


KINDS = ["normal", "student_t", "zeros", "constant", "outlier", "edge"]
ALL_TYPES = ELEMENTWISE + BLOCK_32 + BLOCK_256


def _rows(cols: int) -> int:
    return max(2, min(16, 16384 // cols))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_quantize_matches_llama_cpp(type_name: str, kind: str) -> None:
    for cols in WIDTHS[type_name]:
        x = make_data(kind, _rows(cols), cols)
        ref = ggml_quantize(x, type_name)
        ours = quantize(torch.from_numpy(x), type_name, name="w").numpy()
        assert ours.shape == ref.shape
        bad = np.flatnonzero((ours != ref).any(axis=1))
        assert bad.size == 0, f"{type_name} {kind} cols={cols}: rows {bad.tolist()} differ from ggml_quantize_chunk"


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_dequantize_matches_gguf_py(type_name: str) -> None:
    cols = WIDTHS[type_name][-1]
    x = np.concatenate([make_data(k, 2, cols) for k in KINDS])
    data = ggml_quantize(x, type_name)
    qtype = GGMLQuantizationType[type_name]
    ref = gguf_quants.dequantize(data, qtype).reshape(x.shape)
    ours = dequantize(torch.from_numpy(data), type_name, x.shape).numpy()
    assert ours.dtype == np.float32 and ours.shape == x.shape
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    # numpy (and read-only memmap-like) input takes the same path
    ro = data.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(dequantize(ro, type_name, x.shape).numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("type_name", BLOCK_32 + BLOCK_256)
def test_unpack_form(type_name: str) -> None:
    """codes/scales/min rebuild gguf-py's dequantization with the documented formula w = scale*q - min."""
    cols = WIDTHS[type_name][-1]
    x = make_data("student_t", 4, cols)
    data = ggml_quantize(x, type_name)
    u = unpack(data, type_name, x.shape)
    assert u.codes.shape == x.shape and u.scale.shape == (4, cols // u.group)
    assert u.codes.dtype in (torch.uint8, torch.int8) and u.scale.dtype == torch.float32
    q = u.codes.to(torch.float32).reshape(4, -1, u.group)
    w = u.scale[..., None] * q - (0 if u.min is None else u.min[..., None])
    ref = gguf_quants.dequantize(data, GGMLQuantizationType[type_name]).reshape(x.shape)
    np.testing.assert_array_equal(w.reshape(x.shape).numpy().view(np.uint32), ref.view(np.uint32))


EXPECTED_CODES = {
    "Q4_0": (-8, 7), "Q4_1": (0, 15), "Q5_0": (-16, 15), "Q5_1": (0, 31), "Q8_0": (-127, 127),
    "Q2_K": (0, 3), "Q3_K": (-4, 3), "Q4_K": (0, 15), "Q5_K": (0, 31), "Q6_K": (-32, 31),
    "IQ4_NL": (-127, 113), "IQ4_XS": (-127, 113),
}


@pytest.mark.parametrize("type_name", BLOCK_32 + BLOCK_256)
def test_unpack_code_ranges(type_name: str) -> None:
    cols = WIDTHS[type_name][-1]
    u = unpack(quantize(torch.from_numpy(make_data("normal", 4, cols)), type_name), type_name, (4, cols))
    lo, hi = EXPECTED_CODES[type_name]
    assert int(u.codes.min()) >= lo and int(u.codes.max()) <= hi
    assert (u.min is None) == (type_name not in ("Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K"))


def test_type_table_matches_ggml() -> None:
    lib = libggml_base()
    for name, t in GGML_TYPES.items():
        qtype = GGMLQuantizationType[name]
        assert t.type_id == qtype
        assert (t.block_size, t.type_size) == GGML_QUANT_SIZES[qtype]
        for cols in (t.block_size * 7, 4608):
            assert row_bytes(name, cols) == lib.ggml_row_size(int(qtype), cols)


def test_nan_and_inf_name_the_tensor() -> None:
    x = torch.randn(4, 256)
    x[2, 17] = float("nan")
    with pytest.raises(FuselmError, match="blk.3.ffn_up.weight"):
        quantize(x, "Q4_K", name="blk.3.ffn_up.weight")
    x[2, 17] = float("inf")
    with pytest.raises(FuselmError, match="token_embd.weight"):
        quantize(x, "Q8_0", name="token_embd.weight")


def test_bad_shapes_and_types() -> None:
    with pytest.raises(FuselmError, match="not a multiple"):
        quantize(torch.randn(2, 96), "Q4_K", name="w")
    with pytest.raises(FuselmError, match="not a multiple"):
        row_bytes("Q8_0", 33)
    with pytest.raises(FuselmError, match="unsupported GGML type"):
        quantize(torch.randn(2, 32), "Q7_0")
    with pytest.raises(FuselmError, match="2-D"):
        quantize(torch.randn(2, 2, 32), "Q8_0")
    with pytest.raises(FuselmError, match="bytes"):
        dequantize(torch.zeros(10, dtype=torch.uint8), "Q8_0", (1, 32))


def test_input_forms_and_threads() -> None:
    """numpy and bf16 inputs, lower-case names, and several row chunks over two threads give the same bytes."""
    x = make_data("normal", 300, 512)  # more rows than one Q4_K chunk holds
    ref = ggml_quantize(x, "Q4_K")
    assert np.array_equal(quantize(x, "q4_k", threads=1).numpy(), ref)
    assert np.array_equal(quantize(torch.from_numpy(x), "Q4_K", threads=2).numpy(), ref)
    xb = torch.from_numpy(make_data("student_t", 1100, 512)).to(torch.bfloat16)
    assert np.array_equal(quantize(xb, "Q8_0", threads=2).numpy(), ggml_quantize(xb.float().numpy(), "Q8_0"))
    assert quantize(torch.zeros(0, 64), "Q8_0").shape == (0, row_bytes("Q8_0", 64))


def test_values_too_large_for_fp16_scales() -> None:
    """llama.cpp writes inf scales here and then rejects its own rows; fuselm refuses up front."""
    x = torch.randn(2, 256)
    x[1, 5] = 1e9
    for type_name in ("Q8_0", "Q4_K", "Q6_K", "IQ4_NL", "F16", "TQ2_0", "IQ3_S", "IQ1_M"):
        assert not np.isfinite(dequantize(ggml_quantize(x.numpy(), type_name), type_name, (2, 256)).numpy()).all()
        with pytest.raises(FuselmError, match="too large for"):
            quantize(x, type_name, name="w")
