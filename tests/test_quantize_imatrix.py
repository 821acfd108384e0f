"""`fuselm quantize --imatrix`: the importance vectors reach the codec as llama-quantize computes them (sum / count
per expert, read back here with gguf-py), the quantize.imatrix.* keys are llama-quantize's, the file's choices
follow llama.cpp's imatrix-dependent rules, and the imatrix-only types refuse to run without one."""

from __future__ import annotations

import inspect

import gguf
import numpy as np
import pytest
import tiny_hf
import torch
from ggml_ref import libggml_base
from llama_quantize_ref import llama_quantize

import fuselm.reshape.quantize as qmod
from fuselm import FuselmError
from fuselm.cli import main
from fuselm.formats.gguf import read_gguf
from fuselm.formats.imatrix import ImatrixEntry, write_imatrix
from fuselm.quants import quantize

CODEC_TAKES_IMATRIX = "imatrix" in inspect.signature(quantize).parameters


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("qi")
    tiny_hf.make_llama(d / "hf", hidden_size=256, intermediate_size=512, num_attention_heads=4, kv_heads=2,
                       num_hidden_layers=4)
    assert main(["quantize", str(d / "hf"), str(d / "f32.gguf"), "--type", "F32"]) == 0
    rng = np.random.default_rng(0)
    f = read_gguf(d / "f32.gguf")
    entries = {}
    for name, t in f.tensors.items():
        if name.startswith("blk.") and len(t.shape) == 2:
            entries[name] = ImatrixEntry((rng.random((1, t.shape[-1]), np.float32) * 100) ** 2,
                                         np.array([1024], np.int64))
    write_imatrix(d / "imatrix.gguf", entries, datasets=("calib.txt",), chunk_count=2, chunk_size=512)
    return d


def _expected_vectors(path) -> dict[str, np.ndarray]:
    """llama-quantize's load_imatrix, from the file as gguf-py reads it."""
    r = gguf.GGUFReader(str(path))
    t = {x.name: np.array(x.data, np.float32).reshape(-1) for x in r.tensors}
    return {n[: -len(".in_sum2")]: v / np.float32(t[n[: -len(".in_sum2")] + ".counts"][0])
            for n, v in t.items() if n.endswith(".in_sum2")}


def test_importance_vectors_reach_the_codec(model, monkeypatch, tmp_path):
    seen: dict[str, np.ndarray | None] = {}
    real = qmod.quantize

    def recording(x, qtype, *, name, **kw):
        seen[name] = kw["imatrix"].numpy().copy() if "imatrix" in kw else None
        return real(x, qtype, name=name)  # the bytes are checked against llama.cpp in the codec tests

    monkeypatch.setattr(qmod, "quantize", recording)
    out = tmp_path / "q.gguf"
    qmod.quantize_model(model / "f32.gguf", out, "Q4_K_M", imatrix=model / "imatrix.gguf", progress=False)
    expected = _expected_vectors(model / "imatrix.gguf")
    quantized = {n for n, v in seen.items()}
    assert quantized >= set(expected)
    for name in quantized:
        if name in expected:
            assert np.array_equal(seen[name], expected[name]), name
        else:  # token_embd and output have no entry: llama-quantize quantizes them without one
            assert seen[name] is None, name
    meta = read_gguf(out).metadata
    assert meta["quantize.imatrix.file"] == str(model / "imatrix.gguf")
    assert meta["quantize.imatrix.dataset"] == "calib.txt"
    assert meta["quantize.imatrix.entries_count"] == len(expected)
    assert meta["quantize.imatrix.chunks_count"] == 2


def test_imatrix_only_types_refuse_without_one(model, tmp_path):
    with pytest.raises(FuselmError, match=r"blk\.0\..*IQ2_XXS, which needs an importance matrix"):
        qmod.quantize_model(model / "f32.gguf", tmp_path / "x.gguf", "iq2_xxs", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_wrong_sized_entry_is_an_error(model, tmp_path):
    write_imatrix(tmp_path / "bad.gguf", {"blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 100), np.float32),
                                                                              np.array([1], np.int64))},
                  chunk_count=1, chunk_size=16)
    with pytest.raises(FuselmError, match="blk.0.attn_q.weight: imatrix entry has 100 values; expected 256"):
        qmod.quantize_model(model / "f32.gguf", tmp_path / "x.gguf", "Q4_K_M", imatrix=tmp_path / "bad.gguf",
                            progress=False)


def _ggml_quantize_with_imatrix(x: np.ndarray, type_name: str, w: np.ndarray) -> np.ndarray:
    lib = libggml_base()
    x, w = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(w, np.float32)
    type_id = int(gguf.GGMLQuantizationType[type_name])
    out = np.empty((x.shape[0], lib.ggml_row_size(type_id, x.shape[1])), np.uint8)
    lib.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], w.ctypes.data)
    return out


@pytest.mark.xfail(not CODEC_TAKES_IMATRIX, strict=True,
                   reason="fuselm.quants.quantize(x, type, imatrix=w) comes with the codec branch (issue 14)")
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "IQ4_XS", "Q4_0"])
def test_tensor_quantized_with_imatrix_file_equals_ggml(model, qtype):
    w = _expected_vectors(model / "imatrix.gguf")["blk.1.ffn_down.weight"]
    x = read_gguf(model / "f32.gguf").tensors["blk.1.ffn_down.weight"].to_torch().numpy()
    ours = quantize(torch.from_numpy(x), qtype, imatrix=torch.from_numpy(w)).numpy()
    assert np.array_equal(ours, _ggml_quantize_with_imatrix(x, qtype, w))


@pytest.mark.xfail(not CODEC_TAKES_IMATRIX, strict=True,
                   reason="fuselm.quants.quantize(x, type, imatrix=w) comes with the codec branch (issue 14)")
@pytest.mark.parametrize("ftype", ["Q4_K_M", "IQ4_XS", "Q4_0"])
def test_imatrix_file_equals_llama_cpp(model, tmp_path, ftype):
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    im = model / "imatrix.gguf"
    assert main(["quantize", str(model / "f32.gguf"), str(ours), "--type", ftype, "--imatrix", str(im)]) == 0
    vectors = _expected_vectors(im)
    llama_quantize(model / "f32.gguf", theirs, ftype, imatrix=vectors, kv_overrides=[
        ("quantize.imatrix.file", str(im)), ("quantize.imatrix.dataset", "calib.txt"),
        ("quantize.imatrix.entries_count", len(vectors)), ("quantize.imatrix.chunks_count", 2)])
    assert ours.read_bytes() == theirs.read_bytes()
