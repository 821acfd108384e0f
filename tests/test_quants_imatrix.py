"""Importance weights (imatrix): fuselm.quants.quantize(x, type, imatrix=w) against llama.cpp's
ggml_quantize_chunk given the same vector, byte for byte, for every codec that uses one (ggml's
quantize_row_*_impl paths), and the errors for bad vectors and for types that require one."""

from __future__ import annotations

import ctypes
import zlib

import numpy as np
import pytest
import torch
from ggml_ref import ggml_quantize, libggml_base
from gguf import GGMLQuantizationType
from test_quants import make_data

from fuselm.errors import FuselmError
from fuselm.quants import GGML_TYPES, quantize, requires_imatrix

WEIGHTED_32 = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL"]
WEIGHTED_256 = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]
IGNORED = ["F32", "F16", "BF16", "Q8_0", "TQ1_0", "TQ2_0", "MXFP4"]  # ggml takes the vector and ignores it
KINDS = ["normal", "student_t", "zeros", "constant", "outlier", "edge"]
WIDTHS = {**{t: (32, 512, 4544) for t in WEIGHTED_32}, **{t: (256, 512, 4608) for t in WEIGHTED_256}}


def ggml_quantize_imatrix(x: np.ndarray, type_name: str, imatrix: np.ndarray | None) -> np.ndarray:
    """ggml_quantize_chunk with an importance vector (ggml_ref's helper passes NULL)."""
    lib = libggml_base()
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    type_id = int(GGMLQuantizationType[type_name])
    out = np.empty((rows, lib.ggml_row_size(type_id, cols)), dtype=np.uint8)
    w = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    lib.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0, rows, cols,
                            None if w is None else w.ctypes.data)
    return out


def importance(kind: str, cols: int) -> np.ndarray:
    """Importance vectors as imatrix files hold them: mean squared activations, spread over decades."""
    rng = np.random.default_rng(zlib.crc32(f"imatrix-{kind}-{cols}".encode()))
    if kind == "lognormal":
        w = np.exp(rng.standard_normal(cols) * 2.0)
    elif kind == "sparse":  # dead input channels
        w = rng.random(cols) ** 4
        w[rng.random(cols) < 0.3] = 0.0
    elif kind == "ones":
        w = np.ones(cols)
    elif kind == "tiny":
        w = rng.random(cols) * 1e-6
    else:
        raise ValueError(kind)
    return w.astype(np.float32)


def _rows(cols: int) -> int:
    return max(2, min(8, 8192 // cols))


def assert_same_bytes(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape
    bad = np.flatnonzero((ours != ref).any(axis=1))
    assert bad.size == 0, f"{what}: rows {bad.tolist()} differ from ggml_quantize_chunk"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("type_name", WEIGHTED_32 + WEIGHTED_256)
def test_weighted_quantize_matches_llama_cpp(type_name: str, kind: str) -> None:
    for cols in WIDTHS[type_name]:
        x = make_data(kind, _rows(cols), cols)
        for wkind in ("lognormal", "sparse") if cols > 512 else ("lognormal", "sparse", "ones", "tiny"):
            w = importance(wkind, cols)
            ours = quantize(torch.from_numpy(x), type_name, imatrix=torch.from_numpy(w), name="w").numpy()
            assert_same_bytes(ours, ggml_quantize_imatrix(x, type_name, w), f"{type_name} {kind} {wkind} cols={cols}")


@pytest.mark.parametrize("type_name", WEIGHTED_32 + WEIGHTED_256)
def test_weights_change_the_bytes(type_name: str) -> None:
    """The vector is really used: the weighted bytes differ from the unweighted ones (ggml's _ref path)."""
    x = make_data("student_t", 4, 512)
    w = importance("lognormal", 512)
    weighted = quantize(x, type_name, imatrix=w).numpy()
    assert not np.array_equal(weighted, quantize(x, type_name).numpy())
    assert np.array_equal(quantize(x, type_name).numpy(), ggml_quantize(x, type_name))


@pytest.mark.parametrize("type_name", IGNORED)
def test_types_that_ignore_the_vector(type_name: str) -> None:
    t = GGML_TYPES[type_name]
    cols = max(256, t.block_size)
    x = make_data("student_t", 3, cols)
    w = importance("sparse", cols)
    assert_same_bytes(quantize(x, type_name, imatrix=w).numpy(), ggml_quantize_imatrix(x, type_name, w), type_name)


def test_weighted_threads_and_chunks() -> None:
    """Many rows, several row chunks over two threads: the same bytes as one ggml call."""
    x = make_data("normal", 200, 1024)
    w = importance("lognormal", 1024)
    for type_name in ("Q4_K", "Q4_0"):
        ref = ggml_quantize_imatrix(x, type_name, w)
        assert np.array_equal(quantize(x, type_name, imatrix=w, threads=2).numpy(), ref)


def test_requires_imatrix_matches_ggml() -> None:
    lib = libggml_base()
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    for name, t in GGML_TYPES.items():
        assert requires_imatrix(name) == lib.ggml_quantize_requires_imatrix(int(t.type_id)), name


@pytest.mark.parametrize("type_name", ["IQ1_S", "IQ2_XXS", "IQ2_XS"])
def test_required_imatrix_is_refused_without_one(type_name: str) -> None:
    with pytest.raises(FuselmError, match=rf"blk\.0\.ffn_down\.weight.*{type_name} requires an importance matrix"):
        quantize(torch.randn(2, 256), type_name, name="blk.0.ffn_down.weight")


@pytest.mark.parametrize(("imatrix", "message"), [
    (np.ones(255, dtype=np.float32), r"shape \(256,\)"),
    (np.ones((1, 256), dtype=np.float32), r"shape \(256,\)"),
    (np.ones(256, dtype=np.float64), "float32"),
    (torch.ones(256, dtype=torch.float16), "float32"),
    (np.where(np.arange(256) == 3, np.nan, 1.0).astype(np.float32), "NaN"),
    (np.where(np.arange(256) == 3, np.inf, 1.0).astype(np.float32), "NaN or Inf"),
    (np.where(np.arange(256) == 3, -1.0, 1.0).astype(np.float32), "negative"),
])
def test_bad_importance_vectors(imatrix: np.ndarray | torch.Tensor, message: str) -> None:
    for type_name in ("Q4_K", "Q8_0"):  # also where ggml would ignore the vector
        with pytest.raises(FuselmError, match=rf"blk\.1\.attn_q\.weight.*{message}|{message}.*blk\.1\.attn_q"):
            quantize(torch.randn(2, 256), type_name, imatrix=imatrix, name="blk.1.attn_q.weight")
