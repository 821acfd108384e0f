"""`fuselm quantize` end to end: the whole file equals llama.cpp's own quantization of the same F32 GGUF
(llama_model_quantize with the same options), byte for byte."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import tiny_hf
import torch
from llama_quantize_ref import llama_quantize

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


def _assert_same_file(ours, theirs) -> None:
    a, b = read_gguf(ours), read_gguf(theirs)
    assert list(a.metadata) == list(b.metadata), "keys or their order differ"
    assert a.value_types == b.value_types
    assert list(a.tensors) == list(b.tensors), "tensor order differs"
    for name in a.tensors:
        assert a.tensors[name].type_name == b.tensors[name].type_name, name
        assert np.array_equal(a.tensors[name].data.view(np.uint8), b.tensors[name].data.view(np.uint8)), name
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
                                   "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q2_K", "Q6_K", "IQ4_NL", "IQ4_XS", "F16", "BF16"])
def test_quantized_file_equals_llama_cpp(f32_gguf, ftype):
    ours, theirs = f32_gguf / f"ours-{ftype}.gguf", f32_gguf / f"theirs-{ftype}.gguf"
    assert main(["quantize", str(f32_gguf / "f32.gguf"), str(ours), "--type", ftype.lower()]) == 0
    llama_quantize(f32_gguf / "f32.gguf", theirs, ftype)
    _assert_same_file(ours, theirs)


# llama-quantize's controls: (file type, our command-line flags, the same options for llama_model_quantize)
CONTROLS = {
    "pure": ("Q3_K_M", ["--pure"], dict(pure=True)),
    "pure-q4_k_s": ("Q4_K_S", ["--pure"], dict(pure=True)),
    "output-tensor-type": ("Q4_K_M", ["--output-tensor-type", "q8_0"], dict(output_tensor_type="Q8_0")),
    "token-embedding-type": ("Q4_K_M", ["--token-embedding-type", "Q4_K"], dict(token_embedding_type="Q4_K")),
    "both-types-f16-file": ("F16", ["--token-embedding-type", "q6_k", "--output-tensor-type", "Q8_0"],
                            dict(token_embedding_type="Q6_K", output_tensor_type="Q8_0")),
    "tensor-type": ("Q4_K_M", ["--tensor-type", "attn_v=q8_0", "--tensor-type", r"blk\.[01]\.ffn=Q5_K",
                               "--tensor-type", "ffn_down=q2_k"],
                    dict(tensor_types=[("attn_v", "Q8_0"), (r"blk\.[01]\.ffn", "Q5_K"), ("ffn_down", "Q2_K")])),
    "tensor-type-pure": ("Q4_0", ["--pure", "--tensor-type", "ATTN_Q=IQ4_NL"],
                         dict(pure=True, tensor_types=[("attn_q", "IQ4_NL")])),
    "leave-output-tensor": ("Q6_K", ["--leave-output-tensor"], dict(leave_output=True)),
    "override-kv": ("Q5_0", ["--override-kv", "general.name=str:tiny model", "--override-kv",
                             "llama.context_length=int:-128", "--override-kv", "x.flag=bool:true",
                             "--override-kv", "x.scale=float:0.25"],
                    dict(kv_overrides=[("general.name", "tiny model"), ("llama.context_length", -128),
                                       ("x.flag", True), ("x.scale", 0.25)])),
}


@pytest.mark.parametrize("control", CONTROLS)
def test_controls_equal_llama_cpp(f32_gguf, control):
    ftype, flags, options = CONTROLS[control]
    ours, theirs = f32_gguf / f"ours-{control}.gguf", f32_gguf / f"theirs-{control}.gguf"
    assert main(["quantize", str(f32_gguf / "f32.gguf"), str(ours), "--type", ftype, *flags]) == 0
    llama_quantize(f32_gguf / "f32.gguf", theirs, ftype, **options)
    _assert_same_file(ours, theirs)


@pytest.mark.parametrize("limit", [["--split-max-tensors", "7"], ["--split-max-size", "1M"]])
def test_split_shards_load_in_llama_cpp(f32_gguf, tmp_path, limit):
    whole = tmp_path / "whole.gguf"
    assert main(["quantize", str(f32_gguf / "f32.gguf"), str(whole), "--type", "Q4_K_M"]) == 0
    assert main(["quantize", str(f32_gguf / "f32.gguf"), str(tmp_path / "part.gguf"), "--type", "Q4_K_M",
                 *limit]) == 0
    shards = sorted(tmp_path.glob("part-*.gguf"))
    n = len(shards)
    assert n >= 2 and [p.name for p in shards] == [f"part-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    for i, p in enumerate(shards):
        r = gguf.GGUFReader(str(p))
        assert int(r.fields["split.no"].parts[-1][0]) == i and int(r.fields["split.count"].parts[-1][0]) == n
        assert ("general.architecture" in r.fields) == (i == 0)  # every other key lives in the first shard
    # llama.cpp's model loader follows the shards from the first file; copying them (only_copy) into one file
    # gives back the unsplit file byte for byte.
    llama_quantize(shards[0], tmp_path / "merged.gguf", "Q4_K_M", only_copy=True)
    _assert_same_file(whole, tmp_path / "merged.gguf")


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
    real = qmod._quantize_fast

    def failing(x, qtype, name):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(x, qtype, name)

    monkeypatch.setattr(qmod, "_quantize_fast", failing)
    out = f32_gguf / "killed.gguf"
    with pytest.raises(KeyboardInterrupt):
        qmod.quantize_model(f32_gguf / "f32.gguf", out, "Q4_K_M", progress=False)
    assert not out.exists() and not list(f32_gguf.glob(".killed.gguf*"))


def test_bad_type_and_nan(f32_gguf, tmp_path):
    with pytest.raises(FuselmError, match="unknown file type 'Q7_K'"):
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
