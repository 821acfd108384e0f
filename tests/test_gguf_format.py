"""GGUF reading/writing against llama.cpp (llama-cpp-python) and its converter, tokenizers against llama.cpp's
vocab test vectors, metadata round trips for llama / falcon (7B and 40B styles) / chameleon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from fuselm import archs
from fuselm.archs import write_gguf
from fuselm.config import ModelConfig, expected_shapes
from fuselm.errors import FuselmError
from fuselm.formats.gguf import (
    companion_path,
    read_gguf,
    read_vqgan_gguf,
    write_vqgan_gguf,
)
from fuselm.formats.gguf_vocab import tokenizer_from_gguf, tokenizer_to_gguf

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP = ROOT / ".venv/llama-sdist/llama_cpp_python-0.3.36/vendor/llama.cpp"
VOCABS = LLAMA_CPP / "models"


@pytest.fixture(scope="module")
def llama_cpp():
    import llama_cpp  # the reference: fail loudly when it is missing

    return llama_cpp


def _require_sdist() -> None:
    if not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
        pytest.fail(f"llama.cpp sources missing at {LLAMA_CPP}: run `make .venv/llama-sdist/.ok`")


# ---------------------------------------------------------------- tiny tokenizers

WORDS = ["the", "and", "hello", "world", "llama", "model", "token", "falcon", "image", "text"]


def _word_merges(words: list[str], prefix: str) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    for word in words:
        for w in (word, prefix + word):
            for k in range(2, len(w) + 1):
                pair = (w[:k - 1], w[k - 1])
                if pair not in merges:
                    merges.append(pair)
    return merges


def byte_level_tokenizer(front: list[str], specials: list[str]) -> Tokenizer:
    """GPT-2 style byte-level BPE: `front` tokens first (ids 0..), the 256 byte symbols, merged words, specials."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(front)}
    for c in alphabet:
        vocab.setdefault(c, len(vocab))
    merges = _word_merges(WORDS, "\u0120")
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return tok


def spm_style_tokenizer() -> Tokenizer:
    """Llama-2 style: BPE over ▁-pieces with byte fallback, <unk>/<s>/</s> first, BOS added by the post-processor.

    Like a real SentencePiece BPE model, pieces carry scores (-rank) and the merges are every split of a piece into
    two pieces, best score first: transformers' generate_merges builds them (its Llama converter does the same).
    """
    from transformers.convert_slow_tokenizer import generate_merges

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    pieces = []
    for a, b in _word_merges(WORDS, "\u2581"):
        if a + b not in pieces:
            pieces.append(a + b)
    for piece in pieces + list("\u2581abcdefghijklmnopqrstuvwxyzHW"):
        vocab.setdefault(piece, len(vocab))
    normal = {p: i for p, i in vocab.items() if i >= 259}
    merges = generate_merges(normal, {p: -float(i) for p, i in normal.items()})
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def chameleon_front() -> list[str]:
    """Chameleon's first ids: 4 specials, then the 8192 image tokens IMGIMG<digits as A..J>Z at ids 4..8195."""
    letters = "ABCDEFGHIJ"
    return ["<unk>", "<s>", "</s>", "<pad>"] + [
        "IMGIMG" + "".join(letters[int(d)] for d in str(k)) + "Z" for k in range(8192)]


# ---------------------------------------------------------------- tiny HF models

def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, norms around 1 with random biases, so layout mistakes show in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "ln_" in name or "layernorm" in name:
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            else:
                p.copy_(0.08 * noise)


def hf_llama(vocab_size: int, **changes):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                  rope_theta=10000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(LlamaConfig(**{**kwargs, **changes}))


LLAMA_VARIANTS = {
    "llama": {},
    "llama-bias-tied": dict(qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "llama-linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama-yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
}


def hf_falcon(vocab_size: int, new_arch: bool):
    from transformers import FalconConfig, FalconForCausalLM

    extra = (dict(new_decoder_architecture=True, num_kv_heads=2) if new_arch
             else dict(multi_query=True, new_decoder_architecture=False))
    cfg = FalconConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       parallel_attn=True, bias=False, alibi=False, max_position_embeddings=64,
                       layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0, **extra)
    return FalconForCausalLM(cfg)


def hf_chameleon(vocab_map: dict[str, int], swin: bool):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vq = dict(embed_dim=4, num_embeddings=8192, latent_channels=4, base_channels=32, channel_multiplier=[1],
              num_res_blocks=1, resolution=16)
    cfg = ChameleonConfig(vocab_size=len(vocab_map), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                          rms_norm_eps=1e-5, swin_norm=swin, vocabulary_map=vocab_map, vq_config=vq,
                          bos_token_id=1, eos_token_id=2)
    return ChameleonForConditionalGeneration(cfg)


def save_hf(model, tokenizer: Tokenizer, directory: Path, tokenizer_config: dict) -> None:
    model.save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


def convert_with_fuselm(directory: Path, out: Path, tokenizer, *, pre: str | None = None) -> ModelConfig:
    cfg = json.loads((directory / "config.json").read_text())
    config = archs.config_from_hf(cfg, source=str(directory))
    state = archs.hf_to_internal(config, load_file(str(directory / "model.safetensors")), source=str(directory))
    tensors = {name: (t.float(), "F32") for name, t in archs.internal_to_gguf(config, state).items()}
    vocab = tokenizer_to_gguf(tokenizer, config.vocab_size, pre=pre)
    write_gguf(out, config, tensors, tokenizer=vocab, chat_template="{{ messages }}", progress=False)
    return config


def llama_cpp_logits(llama_cpp, path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


# ---------------------------------------------------------------- (b) interop: our GGUF in llama.cpp

CASES = [*LLAMA_VARIANTS, "falcon-7b", "falcon-40b", "chameleon", "chameleon-swin"]


def _llama_cpp_swin_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                            output_attentions=False, use_cache=False, position_embeddings=None, **kwargs):
    """ChameleonSwinDecoderLayer as llama.cpp's chameleon graph computes it: the MLP reads the normed attention
    output instead of the residual stream (HF and Meta: out = h + norm(mlp(h)) with h = x + norm(attn(x)))."""
    attn, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, output_attentions=output_attentions,
                             use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    attn = self.input_layernorm(attn)
    return (hidden_states + attn + self.post_attention_layernorm(self.mlp(attn)),)


@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_runs_our_gguf(case, tmp_path, llama_cpp, monkeypatch):
    torch.manual_seed(0)
    if case in LLAMA_VARIANTS:
        tok = byte_level_tokenizer(["<|pad|>", "<s>", "</s>"], [])
        model, pre = hf_llama(tok.get_vocab_size(), **LLAMA_VARIANTS[case]), None
    elif case.startswith("falcon"):
        tok = byte_level_tokenizer(["<|endoftext|>"], [])
        model, pre = hf_falcon(tok.get_vocab_size(), new_arch=case == "falcon-40b"), None
    else:
        tok = byte_level_tokenizer(chameleon_front(), [])
        model, pre = hf_chameleon(tok.get_vocab(), swin=case == "chameleon-swin"), "chameleon"
    model.eval()
    _randomize(model, seed=CASES.index(case))
    save_hf(model, tok, tmp_path, {})
    out = tmp_path / "model.gguf"
    config = convert_with_fuselm(tmp_path, out, tok, pre=pre)

    vocab = config.vocab_size
    ids = torch.randint(0, vocab, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    ours, ref = llama_cpp_logits(llama_cpp, out, ids), hf_logits(model, ids)
    assert ours.shape == ref.shape == (12, vocab)
    keep = np.ones(vocab, bool)
    if config.arch == "chameleon":
        # Both mask image-token logits. llama.cpp's ggml_set_1d on the [vocab, tokens] logits only reaches the
        # first row's ids 4..8195, so rows after the first keep their image logits: compare the other ids only.
        keep[4:8196] = False
        assert (ours[0, ~keep] < -1e30).all() and (ref[:, ~keep] < -1e30).all()
    if case == "chameleon-swin":
        # llama.cpp 0.3.36 (src/models/chameleon.cpp) feeds the MLP the normed attention output when swin_norm is
        # set. Our file must match what llama.cpp computes, so compare against HF with that one change.
        assert np.abs(ours[:, keep] - ref[:, keep]).max() > 0.1, "llama.cpp's swin graph now matches HF: drop the patch"
        from transformers.models.chameleon import modeling_chameleon

        monkeypatch.setattr(modeling_chameleon.ChameleonSwinDecoderLayer, "forward", _llama_cpp_swin_forward)
        ref = hf_logits(model, ids)
    err = np.abs(ours[:, keep] - ref[:, keep]).max()
    assert err <= 1e-2, f"{case}: max |llama.cpp - transformers| = {err:.3g}"
    assert np.abs(ref[:, keep]).max() > 0.1  # the comparison is not between two near-zero arrays

    # and fuselm reads its own file back to the same config and tensors
    f = read_gguf(out)
    shapes = {n: t.shape for n, t in f.tensors.items()}
    assert archs.config_from_gguf(f.metadata, str(out), shapes) == config
    if case == "llama-llama3":  # a file from llama.cpp's converter has only rope_freqs.weight, no fuselm keys
        bare = {k: v for k, v in f.metadata.items() if not k.startswith("fuselm.")}
        freqs = f.tensors["rope_freqs.weight"].data
        assert archs.config_from_gguf(bare, str(out), shapes, rope_freqs=freqs) == config
        f.tensors.pop("rope_freqs.weight")
    assert f.metadata["tokenizer.chat_template"] == "{{ messages }}"
    back = archs.gguf_to_internal(config, {n: t.to_torch() for n, t in f.tensors.items()}, str(out))
    state = archs.hf_to_internal(config, load_file(str(tmp_path / "model.safetensors")))
    assert back.keys() == state.keys()
    for name in state:
        torch.testing.assert_close(back[name], state[name].float(), rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- (c) llama.cpp's converter -> fuselm

def test_read_gguf_from_llama_cpp_converter(tmp_path, llama_cpp):
    _require_sdist()
    tok = spm_style_tokenizer()
    torch.manual_seed(0)
    model = hf_llama(tok.get_vocab_size()).eval()
    _randomize(model, seed=7)
    save_hf(model, tok, tmp_path, {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                                   "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True})
    theirs = tmp_path / "converted.gguf"
    # The converter imports sentencepiece before it looks for tokenizer.model (absent here, so it then takes the
    # tokenizer.json path); the venv has no sentencepiece, so an empty stand-in satisfies the import.
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "sentencepiece.py").write_text("class SentencePieceProcessor:\n    pass\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(LLAMA_CPP), str(stub)])}
    run = subprocess.run([sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(tmp_path), "--outtype",
                          "f32", "--outfile", str(theirs)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]

    f = read_gguf(theirs)
    config = archs.config_from_gguf(f.metadata, str(theirs), {n: t.shape for n, t in f.tensors.items()})
    expected = archs.config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert config == expected.replace(rope_scaling=None)
    state = archs.hf_to_internal(expected, load_file(str(tmp_path / "model.safetensors")))
    back = archs.gguf_to_internal(config, {n: t.to_torch() for n, t in f.tensors.items()}, str(theirs))
    assert back.keys() == state.keys()
    for name in state:
        torch.testing.assert_close(back[name], state[name], rtol=0, atol=0, msg=name)

    # Our file for the same model: the same llama.* keys with the same values and types.
    ours = tmp_path / "ours.gguf"
    convert_with_fuselm(tmp_path, ours, tok)
    g = read_gguf(ours)
    for key, value in f.metadata.items():
        if key.startswith("llama.") or key in ("general.architecture", "tokenizer.ggml.model",
                                               "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                               "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.tokens"):
            assert g.value_types[key] == f.value_types[key], key
            assert g.metadata[key] == value, key
    # ... and the same tokens as llama.cpp sees them (its tokenizer, on both files, against HF's).
    text = "hello world, the llama model and the falcon token!"
    expected_ids = tok.encode(text, add_special_tokens=False).ids
    llm = llama_cpp.Llama(model_path=str(ours), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected_ids
    finally:
        llm.close()


# ---------------------------------------------------------------- tokenizers vs llama.cpp's vocab test vectors

def vocab_cases(name: str) -> tuple[list[str], list[list[int]]]:
    raw = (VOCABS / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    texts = raw.split("\n__ggml_vocab_test__\n")[:-1]
    lines = (VOCABS / f"ggml-vocab-{name}.gguf.out").read_text().split("\n")
    return texts, [[int(x) for x in line.split()] for line in lines[: len(texts)]]


@pytest.mark.parametrize("name", ["llama-spm", "phi-3", "gpt-2", "falcon", "starcoder", "qwen2", "llama-bpe"])
def test_tokenizer_from_gguf_matches_test_vectors(name):
    _require_sdist()
    f = read_gguf(VOCABS / f"ggml-vocab-{name}.gguf")
    tok = tokenizer_from_gguf(f.metadata, name)
    texts, expected = vocab_cases(name)
    assert len(texts) >= 40
    for text, ids in zip(texts, expected):
        assert tok.encode(text, add_special_tokens=False).ids == ids, repr(text)


@pytest.mark.parametrize("name", ["llama-spm", "gpt-2", "falcon"])
def test_tokenizer_to_gguf_tokenizes_in_llama_cpp(name, tmp_path, llama_cpp):
    """GGUF vocab -> tokenizers.Tokenizer -> our tokenizer.ggml.* -> llama.cpp's tokenizer == the test vectors."""
    _require_sdist()
    md = read_gguf(VOCABS / f"ggml-vocab-{name}.gguf").metadata
    tok = tokenizer_from_gguf(md, name)
    n = len(md["tokenizer.ggml.tokens"])
    config = ModelConfig(arch="llama", vocab_size=n, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=64,
                         bos_token_id=md.get("tokenizer.ggml.bos_token_id"))
    out = tmp_path / "vocab.gguf"
    write_gguf(out, config, {}, tokenizer=tokenizer_to_gguf(tok, n, pre=md["tokenizer.ggml.pre"]), progress=False)
    written = read_gguf(out).metadata
    assert written["tokenizer.ggml.tokens"] == md["tokenizer.ggml.tokens"]
    np.testing.assert_array_equal(written["tokenizer.ggml.token_type"], md["tokenizer.ggml.token_type"])
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    try:
        for text, ids in zip(*vocab_cases(name)):
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, repr(text)
    finally:
        llm.close()


def test_reader_matches_gguf_py(tmp_path):
    """Our parser against gguf-py's GGUFReader: every key, value type and tensor byte."""
    _require_sdist()
    config = _tiny_config("llama", vocab_size=400)
    state = _random_state(config)
    tensors = {n: (t, "F16" if t.ndim == 2 else "F32") for n, t in archs.internal_to_gguf(config, state).items()}
    tensors["blk.0.ffn_up.weight"] = (gguf.quants.quantize(tensors["blk.0.ffn_up.weight"][0].numpy(),
                                                           gguf.GGMLQuantizationType.Q8_0), "Q8_0")
    out = tmp_path / "m.gguf"
    write_gguf(out, config, tensors, tokenizer=spm_style_tokenizer(), progress=False)
    for path in (out, VOCABS / "ggml-vocab-llama-spm.gguf"):
        ours, ref = read_gguf(path), gguf.GGUFReader(path)
        assert set(ours.metadata) == {k for k in ref.fields if not k.startswith("GGUF.")}
        for key, value in ours.metadata.items():
            field = ref.fields[key]
            want = field.contents()
            if field.types[0] == gguf.GGUFValueType.FLOAT32:
                assert np.float32(value) == np.float32(want), key
            else:
                assert (value.tolist() if isinstance(value, np.ndarray) else value) == want, key
        assert list(ours.tensors) == [t.name for t in ref.tensors]
        for t in ref.tensors:
            mine = ours.tensors[t.name]
            assert mine.type_name == t.tensor_type.name
            assert mine.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
            assert mine.data.tobytes() == np.asarray(t.data).tobytes()
    q = read_gguf(out).tensors["blk.0.ffn_up.weight"]
    assert q.shape == (config.intermediate_size, config.hidden_size) and q.data.dtype == np.uint8


# ---------------------------------------------------------------- (a) metadata round trips

def _tiny_config(arch: str, **changes) -> ModelConfig:
    base = dict(arch=arch, vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                bos_token_id=1, eos_token_ids=(2,), norm_eps=1e-5, rope_theta=10000.0)
    if arch == "falcon":
        base.update(norm_kind="layer", norm_bias=True, mlp_kind="gelu", block_kind="parallel",
                    tie_word_embeddings=True, num_key_value_heads=1, intermediate_size=128)
    if arch == "chameleon":
        base.update(qk_norm=True)
    base.update(changes)
    return ModelConfig(**base)


def _random_state(config: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) for n, s in expected_shapes(config).items()}


ROUND_TRIPS = {
    "llama": _tiny_config("llama"),
    "llama-tied-bias-gqa-headdim": _tiny_config("llama", tie_word_embeddings=True, qkv_bias=True, o_bias=True,
                                                mlp_bias=True, head_dim=16, rope_theta=500000.0,
                                                eos_token_ids=(2, 5, 7), pad_token_id=0, norm_eps=1e-6),
    "llama-linear": _tiny_config("llama", rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama-yarn": _tiny_config("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 32, "beta_fast": 16.0}),
    "llama-llama3": _tiny_config("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                        "original_max_position_embeddings": 32,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    "llama-flashnorm": _tiny_config("llama", flashnorm=True, bos_token_id=None, eos_token_ids=()),
    "falcon-7b": _tiny_config("falcon"),
    "falcon-40b": _tiny_config("falcon", parallel_norms=2, num_key_value_heads=2, tie_word_embeddings=False),
    "chameleon": _tiny_config("chameleon", num_key_value_heads=4),
    "chameleon-swin": _tiny_config("chameleon", num_key_value_heads=4, block_kind="swin_norm",
                                   qk_norm_eps=1e-6),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_metadata_round_trip(name, tmp_path):
    config = ROUND_TRIPS[name]
    tensors = {n: (t, "F32") for n, t in archs.internal_to_gguf(config, _random_state(config)).items()}
    out = tmp_path / "m.gguf"
    write_gguf(out, config, tensors, progress=False)
    f = read_gguf(out)
    assert f.metadata["general.architecture"] == config.arch
    eps_key = "attention.layer_norm_epsilon" if config.arch == "falcon" else "attention.layer_norm_rms_epsilon"
    for key, value in {"context_length": 128, "embedding_length": 32, "block_count": 2,
                       "feed_forward_length": config.intermediate_size, "attention.head_count": 4,
                       "attention.head_count_kv": config.num_key_value_heads, eps_key: config.norm_eps,
                       "vocab_size": 40, "rope.dimension_count": config.head_dim}.items():
        assert f.metadata[f"{config.arch}.{key}"] == value, key
        assert f.value_types[f"{config.arch}.{key}"] == ("FLOAT32" if "eps" in key else "UINT32"), key
    if config.arch == "chameleon":
        assert f.metadata["chameleon.swin_norm"] is (config.block_kind == "swin_norm")
    assert ("blk.0.attn_norm_2.weight" in f.tensors) == (config.parallel_norms == 2)
    back = archs.config_from_gguf(f.metadata, str(out), {n: t.shape for n, t in f.tensors.items()})
    assert back == config


def test_config_from_gguf_errors():
    md = archs.config_to_gguf_metadata(_tiny_config("llama"))
    del md["llama.block_count"]
    with pytest.raises(FuselmError, match=r"x\.gguf.*'llama\.block_count'"):
        archs.config_from_gguf(md, "x.gguf", [])
    with pytest.raises(FuselmError, match="'gptj'"):
        archs.config_from_gguf({"general.architecture": "gptj"}, "x.gguf", [])
    with pytest.raises(FuselmError, match="parallel"):
        archs.config_to_gguf_metadata(_tiny_config("falcon", block_kind="pre_norm"))


# ---------------------------------------------------------------- (d) bad files, atomic writes, companion file

def test_truncated_and_corrupt_files(tmp_path):
    config = _tiny_config("llama", vocab_size=400)
    tensors = {n: (t, "F32") for n, t in archs.internal_to_gguf(config, _random_state(config)).items()}
    good = tmp_path / "good.gguf"
    write_gguf(good, config, tensors, tokenizer=spm_style_tokenizer(), progress=False)
    raw = good.read_bytes()
    for cut in (0, 10, 30, 200, 4000, len(raw) // 2, len(raw) - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(raw[:cut])
        with pytest.raises(FuselmError, match=rf"cut{cut}\.gguf.*(truncated|corrupt)"):
            read_gguf(bad)
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGML" + raw[4:])
    with pytest.raises(FuselmError, match=r"magic\.gguf: not a GGUF file"):
        read_gguf(bad)


def test_write_is_atomic(tmp_path):
    config = _tiny_config("llama")
    tensors = {n: (t, "F32") for n, t in archs.internal_to_gguf(config, _random_state(config)).items()}

    def boom():
        raise RuntimeError("killed mid-write")

    tensors["output.weight"] = (boom, "F32", (40, 32))
    with pytest.raises(RuntimeError, match="killed"):
        write_gguf(tmp_path / "m.gguf", config, tensors, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FuselmError, match="uint8"):
        write_gguf(tmp_path / "m.gguf", config, {"output.weight": (torch.zeros(40, 32), "Q4_K")}, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_vqgan_companion_file(tmp_path):
    from transformers import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    vq_config = dict(embed_dim=4, num_embeddings=64, latent_channels=4, base_channels=32, channel_multiplier=[1, 2],
                     num_res_blocks=1, resolution=16, attn_resolutions=None)
    state = ChameleonVQVAE(ChameleonVQVAEConfig(**vq_config)).state_dict()
    model_path = tmp_path / "chameleon-tiny.gguf"
    path = companion_path(model_path)
    assert path == tmp_path / "chameleon-tiny-vqgan.gguf"
    write_vqgan_gguf(path, vq_config, state)
    f = read_gguf(path)
    assert f.architecture == "chameleon_vqgan"
    config, back = read_vqgan_gguf(path)
    assert config == vq_config
    assert back.keys() == state.keys()
    for name in state:
        torch.testing.assert_close(back[name], state[name].float(), rtol=0, atol=0, msg=name)
    write_gguf(model_path, _tiny_config("llama"), {}, progress=False)
    with pytest.raises(FuselmError, match="expected 'chameleon_vqgan'"):
        read_vqgan_gguf(model_path)


def test_tokenizer_to_gguf_layout():
    """The converter's conventions: [PAD{i}] fill, CONTROL specials, merges, BPE pre names, SPM scores/types."""
    tok = byte_level_tokenizer(["<|endoftext|>"], ["<|im_start|>"])
    n = tok.get_vocab_size() + 3
    md = tokenizer_to_gguf(tok, n)
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "gpt-2"
    assert md["tokenizer.ggml.tokens"][-3:] == [f"[PAD{i}]" for i in range(n - 3, n)]
    types = md["tokenizer.ggml.token_type"]
    assert types.dtype == np.int32 and list(types[-4:]) == [3, 5, 5, 5]
    assert md["tokenizer.ggml.merges"][:2] == ["t h", "th e"]
    spm = tokenizer_to_gguf(spm_style_tokenizer(), 400)
    assert spm["tokenizer.ggml.model"] == "llama" and spm["tokenizer.ggml.pre"] == "default"
    assert list(spm["tokenizer.ggml.token_type"][:5]) == [2, 3, 3, 6, 6]
    assert spm["tokenizer.ggml.unknown_token_id"] == 0 and spm["tokenizer.ggml.add_bos_token"] is True
    back = tokenizer_from_gguf({**spm, "tokenizer.ggml.bos_token_id": 1})
    text = "hello world the Hello"
    assert back.encode(text).ids == spm_style_tokenizer().encode(text).ids
    with pytest.raises(FuselmError, match="vocab_size 10"):
        tokenizer_to_gguf(tok, 10)
    weird = byte_level_tokenizer(["<|endoftext|>"], [])
    weird.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d"), behavior="isolated")
    with pytest.raises(FuselmError, match="pre=NAME"):
        tokenizer_to_gguf(weird, 400)


def test_gguf_to_hf_rebuilds_the_tokenizer_from_metadata(tmp_path):
    """A llama.cpp-style GGUF (vocab only in tokenizer.ggml.*) written out as an HF directory gets a tokenizer.json
    that encodes llama.cpp's own test vectors."""
    _require_sdist()
    from fuselm import load
    from fuselm.cli import main as cli_main
    from fuselm.model.transformer import Transformer

    meta = {k: v for k, v in read_gguf(VOCABS / "ggml-vocab-llama-spm.gguf").metadata.items()
            if k.startswith("tokenizer.")}
    config = ModelConfig(arch="llama", vocab_size=len(meta["tokenizer.ggml.tokens"]), hidden_size=32,
                         intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=64, bos_token_id=1, eos_token_ids=(2,))
    state = {k: (torch.randn(v.shape) * 0.02 if v.ndim == 2 else torch.ones(v.shape))
             for k, v in Transformer(config).state_dict().items()}
    tensors = {n: (t, "F32") for n, t in archs.internal_to_gguf(config, state).items()}
    write_gguf(tmp_path / "m.gguf", config, tensors, tokenizer=meta, progress=False)
    assert cli_main(["flashify", str(tmp_path / "m.gguf"), str(tmp_path / "hf")]) == 0
    tok = load(tmp_path / "hf").tokenizer
    texts, expected = vocab_cases("llama-spm")
    for text, ids in list(zip(texts, expected))[:20]:
        assert tok.encode(text, add_special_tokens=False) == ids, repr(text)
    assert tok.bos_id == 1 and tok.eos_id == 2
