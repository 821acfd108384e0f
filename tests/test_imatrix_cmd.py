"""`fuselm imatrix`: the statistics equal an independent collection with transformers (forward pre-hooks on the
HF model's Linear layers over the same chunks), the file has the tensor names and keys llama-imatrix writes for
this architecture, and it round-trips."""

from __future__ import annotations

import argparse
import json
import math

import gguf
import numpy as np
import pytest
import tiny_hf
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from fuselm import FuselmError
from fuselm.commands.imatrix import register
from fuselm.evals.imatrix import compute_imatrix
from fuselm.formats.imatrix import read_imatrix, write_imatrix

CTX, CHUNKS = 32, 3
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("imat")
    hf = tiny_hf.make_llama(d / "hf", num_hidden_layers=2)
    words = ["<unk>", "<s>", "</s>", *[f"w{i}" for i in range(3, tiny_hf.VOCAB)]]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                          "add_bos_token": True}))
    rng = np.random.default_rng(0)
    text = " ".join(f"w{i}" for i in rng.integers(3, tiny_hf.VOCAB, size=4 * CTX + 5))
    (d / "calib.txt").write_text(text)
    ids = [1] + [int(w[1:]) for w in text.split()]
    return d, hf, ids


def _reference(hf_dir, ids):
    """Sums of x^2 and counts per GGUF weight, and the chunk perplexity, with transformers."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        for hf_part, gguf_part in HF_TO_GGUF.items():
            if name.endswith(hf_part):
                layer = int(name.split(".")[2])
                key = f"blk.{layer}.{gguf_part}.weight"

                def hook(mod, inputs, key=key):
                    x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                    sums[key] = sums.get(key, 0) + (x * x).sum(0)
                    counts[key] = counts.get(key, 0) + x.shape[0]

                handles.append(module.register_forward_pre_hook(hook))
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(CHUNKS):
            chunk = torch.tensor(ids[i * CTX:(i + 1) * CTX])
            chunk[0] = 1  # BOS
            logits = model(chunk.unsqueeze(0)).logits[0].double()
            lp = torch.log_softmax(logits[CTX // 2:CTX - 1], -1)
            targets = torch.tensor(ids[i * CTX + CTX // 2 + 1:(i + 1) * CTX])
            nll -= float(lp.gather(1, targets.unsqueeze(1)).sum())
            n += targets.numel()
    for h in handles:
        h.remove()
    return sums, counts, math.exp(nll / n)


def test_statistics_equal_transformers(setup, tmp_path):
    d, hf, ids = setup
    out = tmp_path / "imatrix.gguf"
    result = compute_imatrix(hf, d / "calib.txt", out, ctx=CTX, chunks=CHUNKS, progress=False)
    sums, counts, ppl = _reference(hf, ids)
    im = read_imatrix(out)
    assert sorted(im.entries) == sorted(sums)
    for name, e in im.entries.items():
        assert e.counts.tolist() == [counts[name]] == [CHUNKS * CTX]
        np.testing.assert_allclose(e.sums[0], sums[name].numpy(), rtol=2e-5, err_msg=name)
    assert result.ppl == pytest.approx(ppl, rel=1e-5)
    assert len(result.chunk_ppl) == CHUNKS and result.chunk_ppl[-1] == pytest.approx(result.ppl)


def test_file_names_and_keys_are_llama_imatrix(setup, tmp_path):
    d, hf, _ = setup
    out = tmp_path / "imatrix.gguf"
    compute_imatrix(hf, d / "calib.txt", out, ctx=CTX, chunks=CHUNKS, progress=False)
    r = gguf.GGUFReader(str(out))
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    assert keys == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].contents() == [str(d / "calib.txt")]
    assert r.fields["imatrix.chunk_count"].contents() == CHUNKS
    assert r.fields["imatrix.chunk_size"].contents() == CTX
    weights = sorted(f"blk.{i}.{p}.weight" for i in range(2) for p in HF_TO_GGUF.values())
    # llama-imatrix: per weight, sorted by name, its in_sum2 then its counts; dense weights are 1-D
    assert [t.name for t in r.tensors] == [w + s for w in weights for s in (".in_sum2", ".counts")]
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1
    # round trip: read back and written again, the same bytes
    im = read_imatrix(out)
    write_imatrix(tmp_path / "again.gguf", im.entries, datasets=im.datasets, chunk_count=im.chunk_count,
                  chunk_size=im.chunk_size)
    assert (tmp_path / "again.gguf").read_bytes() == out.read_bytes()


def test_command_line(setup, tmp_path, capsys):
    d, hf, _ = setup
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["imatrix", str(hf), "--text", str(d / "calib.txt"), "-o", str(tmp_path / "m.gguf"),
                              "--ctx", str(CTX), "--chunks", "2"])
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert "Final estimate: PPL = " in out.out and "2 chunks of 32 tokens" in out.out
    assert "[1]" in out.out + out.err and "[2]" in out.out + out.err  # chunk perplexities as the run goes
    with pytest.raises(FuselmError, match="at least 640 tokens for a context of 320"):
        compute_imatrix(hf, d / "calib.txt", tmp_path / "x.gguf", ctx=320, progress=False)
    with pytest.raises(FuselmError, match="fewer than 16 tokens"):
        compute_imatrix(hf, d / "calib.txt", tmp_path / "x.gguf", ctx=8, progress=False)



def test_gguf_model_gives_the_same_statistics(setup, tmp_path):
    """A GGUF model (weights dequantized to dense) collects what the same HF model does."""
    import shutil

    from fuselm.cli import main
    from fuselm.evals.imatrix import collect_imatrix, load_dense

    d, hf, ids = setup
    plain = shutil.copytree(hf, tmp_path / "hf", ignore=shutil.ignore_patterns("tokenizer*"))
    assert main(["quantize", str(plain), str(tmp_path / "f32.gguf"), "--type", "F32"]) == 0
    ids = [1 if i % CTX == 0 else t for i, t in enumerate(ids)]  # BOS already at every chunk start
    a = collect_imatrix(load_dense(hf), ids, ctx=CTX, chunks=2, progress=False)
    b = collect_imatrix(load_dense(tmp_path / "f32.gguf"), ids, ctx=CTX, chunks=2, progress=False)
    assert sorted(a.entries) == sorted(b.entries)
    for name in a.entries:
        np.testing.assert_allclose(b.entries[name].sums, a.entries[name].sums, rtol=1e-5, err_msg=name)
    assert b.ppl == pytest.approx(a.ppl, rel=1e-5)
