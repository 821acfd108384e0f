"""Qwen2 and Mistral, each added as one record in archs/: parity with transformers and with llama.cpp-made GGUFs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_hf
import torch
from test_gguf_format import (
    LLAMA_CPP,
    _randomize,
    _require_sdist,
    convert_with_fuselm,
    llama_cpp_logits,
    save_hf,
    spm_style_tokenizer,
)

import fuselm
from fuselm.formats.gguf import read_gguf
from fuselm.model.cache import KVCache

WINDOW = 8


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {
        "qwen2": tiny_hf.make_qwen2(tmp_path_factory.mktemp("qwen2")),
        "qwen2-tied": tiny_hf.make_qwen2(tmp_path_factory.mktemp("qwen2t"), tie=True, seed=1),
        "mistral": tiny_hf.make_mistral(tmp_path_factory.mktemp("mistral"), window=WINDOW),
        "mistral-no-window": tiny_hf.make_mistral(tmp_path_factory.mktemp("mistraln"), window=None, seed=2),
    }


@pytest.mark.parametrize("name", ["qwen2", "qwen2-tied", "mistral", "mistral-no-window"])
def test_logits_equal_transformers(dirs, name):
    ids = torch.randint(0, tiny_hf.VOCAB, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(3))
    model = fuselm.load(dirs[name])
    ref = tiny_hf.hf_logits(dirs[name], ids)
    err = (model(ids) - ref).abs().max().item()
    assert err <= 1e-4, f"{name}: max |fuselm - transformers| = {err:.3g}"
    assert ref.abs().max() > 0.1


def test_qwen2_biases_are_two_switches(dirs):
    config = fuselm.load(dirs["qwen2"]).config
    assert config.arch == "qwen2" and config.qkv_bias and not config.o_bias
    attn = fuselm.load(dirs["qwen2"]).transformer.layers[0].attn
    assert attn.q.bias is not None and attn.o.bias is None


def test_sliding_window_matters_and_holds_in_the_cached_path(dirs):
    """A prompt 3x the window: the banded mask changes the logits (vs full attention), and prefill in chunks
    plus one-token steps through the cache equals the full forward."""
    model = fuselm.load(dirs["mistral"])
    assert model.config.sliding_window == WINDOW
    ids = torch.randint(0, tiny_hf.VOCAB, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(4))
    full = model(ids)
    unbanded = fuselm.load(dirs["mistral"])
    unbanded.transformer.config = unbanded.config.replace(sliding_window=None)
    for layer in unbanded.transformer.layers:
        layer.attn.window = None
    assert (unbanded(ids)[:, WINDOW:] - full[:, WINDOW:]).abs().max() > 1e-3
    torch.testing.assert_close(unbanded(ids)[:, :WINDOW], full[:, :WINDOW], rtol=0, atol=1e-5)
    cache = KVCache(model.config, 2, 64, dtype=torch.float32)
    with torch.inference_mode():
        parts = [model.transformer(ids[:, :5], cache=cache), model.transformer(ids[:, 5:13], cache=cache)]
        parts += [model.transformer(ids[:, t:t + 1], cache=cache) for t in range(13, 3 * WINDOW)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


def test_mistral_greedy_generation_equals_transformers(dirs):
    from transformers import MistralForCausalLM

    prompt = torch.randint(3, tiny_hf.VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    ref_model = MistralForCausalLM.from_pretrained(dirs["mistral"], torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 min_new_tokens=20)[0, 6:].tolist()
    seen = []

    def record(state, logits):  # greedy takes the argmax of what the processors return
        seen.append(int(logits[0].argmax()))
        return logits

    events = list(fuselm.generate(fuselm.load(dirs["mistral"]), prompt[0].tolist(), max_tokens=20, temperature=0,
                                  stop_token_ids=[], processors=[record]))
    assert events[-1].generated_tokens == 20
    tokens = seen
    assert tokens == ref


# ---------------------------------------------------------------- llama.cpp's converter and llama.cpp's logits

def _convert(directory: Path, out: Path, *, vocab_from_llama_hf: bool = False) -> None:
    """llama.cpp's convert_hf_to_gguf.py on an HF dir with an SPM-style tokenizer.json.

    Qwen2's converter only knows real Qwen2 vocabularies (BPE pre-tokenizer hashes); our tiny test vocabulary goes
    through the converter's Llama tokenizer.json path instead. Every tensor and hyperparameter is still written by
    llama.cpp's own Qwen2 code."""
    stub = out.parent / "stub"
    stub.mkdir(exist_ok=True)
    (stub / "sentencepiece.py").write_text("class SentencePieceProcessor:\n    pass\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(LLAMA_CPP), str(stub)])}
    script = ["import sys, conversion.qwen as q", "q.Qwen2Model.set_vocab = lambda self: self._set_vocab_llama_hf()",
              "import convert_hf_to_gguf as c", "sys.argv = ['convert_hf_to_gguf.py'] + sys.argv[1:]", "c.main()"]
    cmd = ([sys.executable, "-c", "\n".join(script)] if vocab_from_llama_hf
           else [sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py")])
    run = subprocess.run(cmd + [str(directory), "--outtype", "f32", "--outfile", str(out)], capture_output=True,
                         text=True, env=env, timeout=180, cwd=str(LLAMA_CPP))
    assert run.returncode == 0, run.stderr[-3000:]


def _hf_model(kind: str, vocab: int, **changes):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kwargs = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**{**kwargs, **changes}))
    return MistralForCausalLM(MistralConfig(**{**kwargs, "sliding_window": WINDOW, **changes}))


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_gguf_from_llama_cpp_converter_equals_llama_cpp(kind, tmp_path):
    import llama_cpp

    _require_sdist()
    tok = spm_style_tokenizer()
    torch.manual_seed(0)
    # Qwen2's converter appends <|endoftext|> to a vocabulary that lacks it: one more embedding row for it.
    model = _hf_model(kind, tok.get_vocab_size() + (kind == "qwen2")).eval()
    _randomize(model, seed=11)
    save_hf(model, tok, tmp_path, {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                                   "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True})
    gguf_path = tmp_path / "converted.gguf"
    _convert(tmp_path, gguf_path, vocab_from_llama_hf=kind == "qwen2")
    f = read_gguf(gguf_path)
    assert f.metadata["general.architecture"] == ("qwen2" if kind == "qwen2" else "llama")

    ours = fuselm.load(gguf_path, dtype="float32")
    # llama.cpp's converter writes Mistral as its llama architecture, which attends to every key (no window).
    assert ours.config.arch == ("qwen2" if kind == "qwen2" else "llama")
    ids = torch.randint(3, tok.get_vocab_size(), (20,), generator=torch.Generator().manual_seed(6)).tolist()
    theirs = llama_cpp_logits(llama_cpp, gguf_path, ids)
    mine = ours(torch.tensor([ids]))[0].numpy()
    err = np.abs(mine - theirs).max()
    print(f"{kind}: max |fuselm - llama.cpp| = {err:.3g} (logits up to {np.abs(theirs).max():.3g})")
    assert err <= 1e-2, f"{kind}: max |fuselm - llama.cpp| = {err:.3g}"
    assert np.abs(theirs).max() > 0.1
    # within the window (or always, for Qwen2) the file also equals transformers
    with torch.no_grad():
        ref = model(torch.tensor([ids[:WINDOW]])).logits[0].numpy()
    assert np.abs(mine[:WINDOW] - ref).max() <= 1e-4


def test_our_mistral_gguf_keeps_the_window_and_llama_cpp_runs_it(tmp_path):
    import llama_cpp

    tok = spm_style_tokenizer()
    torch.manual_seed(0)
    model = _hf_model("mistral", tok.get_vocab_size()).eval()
    _randomize(model, seed=12)
    save_hf(model, tok, tmp_path, {"bos_token": "<s>", "eos_token": "</s>"})
    out = tmp_path / "ours.gguf"
    config = convert_with_fuselm(tmp_path, out, tok)
    loaded = fuselm.load(out, dtype="float32")
    assert loaded.config == config and loaded.config.sliding_window == WINDOW and loaded.config.arch == "mistral"
    ids = torch.randint(3, tok.get_vocab_size(), (3 * WINDOW,), generator=torch.Generator().manual_seed(7)).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(loaded(torch.tensor([ids]))[0].numpy() - ref).max() <= 1e-4
    short = llama_cpp_logits(llama_cpp, out, ids[:WINDOW])  # llama.cpp runs it as llama: equal within the window
    assert np.abs(short - ref[:WINDOW]).max() <= 1e-2
    assert json.loads(json.dumps(read_gguf(out).metadata["fuselm.architecture"])) == "mistral"
