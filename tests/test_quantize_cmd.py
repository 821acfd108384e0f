"""`fuselm quantize` end to end: the whole file equals llama.cpp's own quantization of the same F32 GGUF."""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest
import tiny_hf
import torch

import fuselm
from fuselm import FuselmError
from fuselm.cli import main
from fuselm.formats.gguf import read_gguf


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    # Rows of 256 so K-quants apply; one 320-wide MLP (not a multiple of 256) exercises the fallback.
    tiny_hf.make_llama(d / "hf", hidden_size=256, intermediate_size=320, num_attention_heads=4, kv_heads=2,
                       num_hidden_layers=4)
    assert main(["quantize", str(d / "hf"), str(d / "f32.gguf"), "--type", "F32"]) == 0
    return d


def _llama_quantize(src, dst, ftype: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 2
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0", "Q4_K_M", "Q5_K_S", "Q3_K_M", "Q2_K", "Q6_K"])
def test_quantized_file_equals_llama_cpp(f32_gguf, ftype):
    ours, theirs = f32_gguf / f"ours-{ftype}.gguf", f32_gguf / f"theirs-{ftype}.gguf"
    assert main(["quantize", str(f32_gguf / "f32.gguf"), str(ours), "--type", ftype]) == 0
    _llama_quantize(f32_gguf / "f32.gguf", theirs, ftype)
    a, b = read_gguf(ours).tensors, read_gguf(theirs).tensors
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].type_name == b[name].type_name, name
        assert np.array_equal(a[name].data.view(np.uint8), b[name].data.view(np.uint8)), f"{name} bytes differ"


def test_quantized_model_runs_close_to_float(f32_gguf):
    assert main(["quantize", str(f32_gguf / "hf"), str(f32_gguf / "q8.gguf"), "--type", "Q8_0"]) == 0
    ids = torch.randint(0, tiny_hf.VOCAB, (2, 16))
    ref = fuselm.load(f32_gguf / "hf")(ids)
    q8 = fuselm.load(f32_gguf / "q8.gguf", dtype="float32")(ids)
    # Random tiny models have nearly tied logits, so compare values, not argmax.
    assert (ref - q8).abs().max() < 0.02 * ref.abs().max()


def test_interrupted_quantize_leaves_no_file(f32_gguf, monkeypatch):
    import fuselm.reshape.quantize as qmod

    calls = {"n": 0}
    real = qmod.quantize

    def failing(x, qtype, *, name):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(x, qtype, name=name)

    monkeypatch.setattr(qmod, "quantize", failing)
    out = f32_gguf / "killed.gguf"
    with pytest.raises(KeyboardInterrupt):
        qmod.quantize_model(f32_gguf / "f32.gguf", out, "Q4_K_M", progress=False)
    assert not out.exists() and not list(f32_gguf.glob(".killed.gguf*"))


def test_bad_type_and_nan(f32_gguf, tmp_path):
    with pytest.raises(FuselmError, match="unknown --type 'Q7_K'"):
        from fuselm.reshape import quantize_model

        quantize_model(f32_gguf / "hf", tmp_path / "x.gguf", "Q7_K")
    import shutil

    from safetensors.torch import load_file, save_file

    d = shutil.copytree(f32_gguf / "hf", tmp_path / "nan")
    t = load_file(d / "model.safetensors")
    t["model.layers.2.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(t, d / "model.safetensors")
    with pytest.raises(FuselmError, match="model.layers.2.mlp.down_proj.weight"):
        quantize_model(d, tmp_path / "x.gguf", "Q8_0")
