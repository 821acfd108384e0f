"""Runtime spine: parity with transformers, cache, greedy generation, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import tiny_hf
import torch
from safetensors.torch import load_file, save_file

import fuselm
from fuselm import FuselmError
from fuselm.generation.decoder import decode_ids
from fuselm.generation.sampling import GREEDY, SamplingParams
from fuselm.generation.stream import Done, TextDelta, TextStream
from fuselm.model.cache import KVCache

BUILDERS = {
    "llama-gqa-untied": lambda d: tiny_hf.make_llama(d),
    "llama-gqa-tied": lambda d: tiny_hf.make_llama(d, tie=True),
    "chameleon": lambda d: tiny_hf.make_chameleon(d),
    "chameleon-swin": lambda d: tiny_hf.make_chameleon(d, swin=True),
    "falcon-7b-style": lambda d: tiny_hf.make_falcon(d),
    "falcon-40b-style": lambda d: tiny_hf.make_falcon(d, new_arch=True),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {name: build(tmp_path_factory.mktemp(name)) for name, build in BUILDERS.items()}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_logits_match_transformers(model_dirs, name):
    ids = torch.randint(0, tiny_hf.VOCAB, (3, 21), generator=torch.Generator().manual_seed(1))
    ref = tiny_hf.hf_logits(model_dirs[name], ids)
    ours = fuselm.load(model_dirs[name])(ids)
    keep = ref > torch.finfo(ref.dtype).min / 2  # HF masks Chameleon image-token logits; ours are raw
    assert (ours[keep] - ref[keep]).abs().max().item() <= 1e-4


def test_grouped_qk_norm_equals_per_head(model_dirs, tmp_path):
    src = model_dirs["chameleon"]
    tensors = load_file(src / "model.safetensors")
    for key in [k for k in tensors if k.endswith(("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias"))]:
        groups = 2 if ".q_norm." in key else 1
        heads = tensors[key].shape[0]
        grouped = torch.randn(groups, tensors[key].shape[1])
        tensors[key] = grouped.repeat_interleave(heads // groups, dim=0)  # per-head form
    per_head_dir, grouped_dir = tmp_path / "per_head", tmp_path / "grouped"
    for d in (per_head_dir, grouped_dir):
        shutil.copytree(src, d)
    save_file(tensors, per_head_dir / "model.safetensors")
    def first_of_each_group(k, v):
        if "self_attn" in k and "_norm." in k:
            return v[:: v.shape[0] // (2 if ".q_norm." in k else 1)].contiguous()
        return v

    regrouped = {k: first_of_each_group(k, v) for k, v in tensors.items()}
    save_file(regrouped, grouped_dir / "model.safetensors")
    ids = torch.randint(0, tiny_hf.VOCAB, (2, 13))
    a, b = fuselm.load(per_head_dir)(ids), fuselm.load(grouped_dir)(ids)
    assert fuselm.load(grouped_dir).transformer.layers[0].attn.q_norm.weight.shape[0] == 2
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    ref = tiny_hf.hf_logits(per_head_dir, ids)
    keep = ref > torch.finfo(ref.dtype).min / 2
    assert (a[keep] - ref[keep]).abs().max().item() <= 1e-4, "per-head form must still match transformers"


@pytest.mark.parametrize("name", ["llama-gqa-untied", "chameleon-swin", "falcon-40b-style"])
def test_cached_decode_equals_full_forward(model_dirs, name):
    model = fuselm.load(model_dirs[name])
    ids = torch.randint(0, tiny_hf.VOCAB, (2, 19))
    full = model(ids)
    cache = KVCache(model.config, 2, 32, dtype=torch.float32)
    with torch.inference_mode():
        parts = [model.transformer(ids[:, :7], cache=cache)]
        parts.append(model.transformer(ids[:, 7:12], cache=cache))
        parts += [model.transformer(ids[:, t:t + 1], cache=cache) for t in range(12, 19)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


def test_left_padded_rows_equal_unpadded(model_dirs):
    model = fuselm.load(model_dirs["llama-gqa-untied"])
    short = torch.randint(0, tiny_hf.VOCAB, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)
    cache = KVCache(model.config, 1, 16, dtype=torch.float32)
    cache.pad = torch.tensor([3])
    with torch.inference_mode():
        got = model.transformer(padded, cache=cache)[:, 3:]
    torch.testing.assert_close(got, model(short), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama-gqa-tied", "chameleon", "falcon-7b-style"])
def test_greedy_generation_equals_transformers(model_dirs, name):
    from transformers import AutoModelForCausalLM, ChameleonForConditionalGeneration

    d = model_dirs[name]
    cls = ChameleonForConditionalGeneration if "chameleon" in name else AutoModelForCausalLM
    ref_model = cls.from_pretrained(d, torch_dtype=torch.float32).eval()
    prompt = torch.randint(30, tiny_hf.VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = ref_model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, min_new_tokens=24)[0, 9:].tolist()
    model = fuselm.load(d)
    processors = []
    if name == "chameleon":  # transformers hard-masks image tokens; do the same to compare
        vocab = tiny_hf.chameleon_vocabulary_map()
        image_ids = torch.tensor([i for t, i in vocab.items() if t.startswith("IMGIMG")])
        processors = [lambda s, logits: logits.index_fill(1, image_ids, float("-inf"))]
    ours = list(decode_ids(model.transformer, prompt[0].tolist(), max_new_tokens=24, sampling=GREEDY,
                           processors=processors))
    assert ours == ref


def test_sampling_is_seeded(model_dirs):
    model = fuselm.load(model_dirs["llama-gqa-untied"])
    prompt = torch.randint(0, tiny_hf.VOCAB, (1, 5))
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.1)
    runs = [list(decode_ids(model.transformer, prompt[0].tolist(), max_new_tokens=16, sampling=params, seed=s))
            for s in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_text_stream_stop_string_across_tokens():
    pieces = ["Hel", "lo <", "end", "_mess", "age> tail"]
    stream = TextStream(lambda ids: "".join(pieces[i] for i in ids), ("<end_message>",))
    out = "".join(stream.push([i]) for i in range(len(pieces)))
    assert out == "Hello " and stream.stopped


# ---------------------------------------------------------------- bad input


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_config_key(model_dirs, tmp_path):
    d = _copy(model_dirs["llama-gqa-untied"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FuselmError, match="missing required config key 'hidden_size'"):
        fuselm.load(d)


def test_unknown_model_type_lists_supported(model_dirs, tmp_path):
    d = _copy(model_dirs["llama-gqa-untied"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FuselmError, match="unsupported model_type 'gpt_neox'.*chameleon.*falcon.*llama"):
        fuselm.load(d)


def test_missing_tensor_and_wrong_shape(model_dirs, tmp_path):
    d = _copy(model_dirs["llama-gqa-untied"], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    missing = {k: v for k, v in tensors.items() if k != name}
    save_file(missing, d / "model.safetensors")
    with pytest.raises(FuselmError, match=f"missing tensor '{name}'"):
        fuselm.load(d)
    tensors[name] = torch.zeros(16, 64)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(FuselmError, match=rf"'{name}' has shape \(16, 64\), expected \(32, 64\)"):
        fuselm.load(d)


def test_missing_norm_needs_flashnorm_flag(model_dirs, tmp_path):
    d = _copy(model_dirs["llama-gqa-untied"], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "layernorm" not in k}, d / "model.safetensors")
    with pytest.raises(FuselmError, match="input_layernorm.*flashnorm"):
        fuselm.load(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["flashnorm_folded"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    assert fuselm.load(d).transformer.layers[0].attn_norm.weight.eq(1).all()


def test_truncated_safetensors(model_dirs, tmp_path):
    d = _copy(model_dirs["llama-gqa-untied"], tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FuselmError, match="truncated safetensors"):
        fuselm.load(d)


def test_nan_weight_reported_by_name(model_dirs, tmp_path):
    d = _copy(model_dirs["llama-gqa-untied"], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(FuselmError, match="'model.layers.0.mlp.up_proj.weight' contains NaN"):
        fuselm.load(d)


def test_sharded_safetensors_and_bin(model_dirs, tmp_path):
    src = model_dirs["llama-gqa-untied"]
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    sharded = _copy(src, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, sharded / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    binary = _copy(src, tmp_path / "bin")
    (binary / "model.safetensors").unlink()
    torch.save(tensors, binary / "pytorch_model.bin")
    ids = torch.randint(0, tiny_hf.VOCAB, (1, 8))
    expected = fuselm.load(src)(ids)
    torch.testing.assert_close(fuselm.load(sharded)(ids), expected, rtol=0, atol=0)
    torch.testing.assert_close(fuselm.load(binary)(ids), expected, rtol=0, atol=0)


def test_bin_with_code_is_refused(model_dirs, tmp_path):
    d = _copy(model_dirs["llama-gqa-untied"], tmp_path / "m")
    (d / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1), "evil": shutil.copytree}, d / "pytorch_model.bin")
    with pytest.raises(FuselmError, match="weights-only"):
        fuselm.load(d)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_selectable(model_dirs, dtype):
    model = fuselm.load(model_dirs["llama-gqa-untied"], dtype=dtype)
    assert model.transformer.layers[0].attn.q.weight.dtype == getattr(torch, dtype)
    ids = torch.randint(0, tiny_hf.VOCAB, (1, 8))
    ref = fuselm.load(model_dirs["llama-gqa-untied"])(ids)
    assert (model(ids) - ref).abs().max() < 0.05


def test_prompt_longer_than_context(model_dirs):
    model = fuselm.load(model_dirs["llama-gqa-untied"])
    with pytest.raises(FuselmError, match="context of 256"):
        list(fuselm.generate(model, list(range(3, 100)) * 3, max_tokens=4))
    with pytest.raises(FuselmError, match="longer than the model's context"):
        model(torch.zeros(1, 300, dtype=torch.long))


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"), (dict(max_tokens=0), "max_tokens"),
])
def test_invalid_sampler_values(model_dirs, kwargs, message):
    model = fuselm.load(model_dirs["llama-gqa-untied"])
    with pytest.raises(FuselmError, match=message):
        list(fuselm.generate(model, [5, 6, 7], **kwargs))


def test_generate_events(model_dirs):
    model = fuselm.load(model_dirs["falcon-7b-style"])
    events = list(fuselm.generate(model, [5, 6, 7], max_tokens=5, temperature=0, stop_token_ids=[]))
    assert isinstance(events[-1], Done) and events[-1].reason == "length" and events[-1].generated_tokens == 5
    assert all(isinstance(e, TextDelta) for e in events[:-1])
