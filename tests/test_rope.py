"""RoPE scaling: HF's ROPE_INIT_FUNCTIONS / rotary modules (transformers 5.23), the NTK-Margin / NTK-YaRN formulas,
and GGUF keys round-tripped through a real file written and read by gguf-py."""

from __future__ import annotations

import math

import gguf
import pytest
import torch
from transformers import FalconConfig, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.falcon import modeling_falcon
from transformers.models.llama import modeling_llama

from fuselm.archs.rope_keys import (
    rope_base_from_gguf,
    rope_scaling_from_gguf,
    rope_scaling_gguf_keys,
    rope_scaling_to_hf,
)
from fuselm.config.rope import RopeSpec, normalize_rope_scaling, rope_freq_factors, rope_frequencies
from fuselm.errors import FuselmError
from fuselm.model.rope import apply_rope, rope_cos_sin


def llama_config(head_dim: int, max_pos: int, params: dict) -> LlamaConfig:
    return LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                       max_position_embeddings=max_pos, rope_parameters=dict(params))


# (head_dim, max_position_embeddings, rope_parameters); every case HF implements.
HF_CASES = {
    "linear": (64, 2048, {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    "linear-legacy-type": (128, 4096, {"type": "linear", "factor": 2, "rope_theta": 500000.0}),
    "dynamic": (64, 2048, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    "dynamic-3.5": (128, 4096, {"rope_type": "dynamic", "factor": 3.5, "rope_theta": 1e6}),
    "yarn-falcon": (64, 8192, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
                               "rope_theta": 10000.0}),
    "yarn-betas-untruncated": (128, 65536, {"rope_type": "yarn", "factor": 16.0,
                                            "original_max_position_embeddings": 4096, "rope_theta": 1e6,
                                            "beta_fast": 16, "beta_slow": 2, "truncate": False}),
    "yarn-mscale": (128, 163840, {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                  "rope_theta": 10000.0, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "yarn-attention-factor": (64, 4096, {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048,
                                         "rope_theta": 10000.0, "attention_factor": 1.25}),
    "llama3.1-8b": (128, 131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                  "rope_theta": 500000.0}),
}


def spec_of(head_dim: int, max_pos: int, params: dict) -> RopeSpec:
    return RopeSpec(head_dim, params["rope_theta"], max_pos, params)


def test_default_matches_hf():
    cfg = llama_config(64, 2048, {"rope_type": "default", "rope_theta": 10000.0})
    ref, ref_factor = modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    inv, factor = rope_frequencies(RopeSpec(64, 10000.0, 2048))
    assert torch.equal(inv, ref) and factor == ref_factor == 1.0
    assert inv.dtype == torch.float32 and inv.shape == (32,)


@pytest.mark.parametrize("name", HF_CASES)
def test_frequencies_match_hf(name):
    head_dim, max_pos, params = HF_CASES[name]
    cfg = llama_config(head_dim, max_pos, params)
    spec = spec_of(head_dim, max_pos, params)
    kind = spec.scaling["rope_type"]
    lengths = [None, 100, max_pos, max_pos + 1, 3 * max_pos, 10 * max_pos + 7] if kind == "dynamic" else [None]
    for seq_len in lengths:
        ref, ref_factor = ROPE_INIT_FUNCTIONS[kind](cfg, None, seq_len)
        inv, factor = rope_frequencies(spec, seq_len)
        assert torch.equal(inv, ref), (name, seq_len, (inv - ref).abs().max())
        assert factor == ref_factor, (name, factor, ref_factor)


def test_dynamic_honours_original_max_position_embeddings():
    # HF ignores this key for dynamic and uses max_position_embeddings as L; we use it as L.
    params = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    cfg = llama_config(64, 2048, params)
    spec = RopeSpec(64, 10000.0, 8192, {**params, "original_max_position_embeddings": 2048})
    for seq_len in (1000, 5000):
        assert torch.equal(rope_frequencies(spec, seq_len)[0], ROPE_INIT_FUNCTIONS["dynamic"](cfg, None, seq_len)[0])


def test_cos_sin_match_hf_rotary_module():
    head_dim, max_pos, params = HF_CASES["yarn-falcon"]  # attention factor != 1
    cfg = llama_config(head_dim, max_pos, params)
    rotary = modeling_llama.LlamaRotaryEmbedding(cfg)
    inv, factor = rope_frequencies(spec_of(head_dim, max_pos, params))
    positions = torch.tensor([[0, 1, 2, 3, 4000, 8191], [7, 7, 100, 2047, 2048, 5000]])
    for dtype in (torch.float32, torch.bfloat16):
        ref_cos, ref_sin = rotary(torch.zeros(1, dtype=dtype), positions)
        cos, sin = rope_cos_sin(inv, positions, factor, dtype)
        assert cos.dtype == dtype and cos.shape == (2, 6, head_dim)
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
        cos1, sin1 = rope_cos_sin(inv, positions[1], factor, dtype)  # [T] positions give [T, R]
        assert torch.equal(cos1, ref_cos[1]) and torch.equal(sin1, ref_sin[1])


def test_falcon_rotary_module_matches_default():
    cfg = FalconConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=2048)
    rotary = modeling_falcon.FalconRotaryEmbedding(cfg)
    positions = torch.arange(50)[None]
    ref_cos, ref_sin = rotary(torch.zeros(1), positions)
    inv, factor = rope_frequencies(RopeSpec(64, 10000.0, 2048))
    cos, sin = rope_cos_sin(inv, positions, factor, torch.float32)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batched_cos", [False, True])
def test_apply_rope_matches_hf(dtype, batched_cos):
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 3, 5, 16
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k = torch.randn(B, H, T, D, generator=g).to(dtype)
    inv, factor = rope_frequencies(RopeSpec(D, 10000.0, 64, {"rope_type": "ntk-yarn", "factor": 4.0}))
    positions = torch.stack([torch.arange(T), torch.arange(T) + 9]) if batched_cos else torch.arange(T) + 3
    cos, sin = rope_cos_sin(inv, positions, factor, dtype)
    hf_cos, hf_sin = (cos, sin) if batched_cos else (cos.expand(B, T, D), sin.expand(B, T, D))
    for module in (modeling_llama, modeling_falcon):
        ref_q, ref_k = module.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
        assert torch.equal(apply_rope(q, cos, sin), ref_q)
        assert torch.equal(apply_rope(k, cos, sin), ref_k)


def test_apply_rope_partial_rotary():
    # HF's partial-rotary models rotate the first R dims and pass the rest through (GPT-NeoX, Phi).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 4, 24, generator=g)
    inv, factor = rope_frequencies(RopeSpec(8, 10000.0, 64))
    cos, sin = rope_cos_sin(inv, torch.arange(4)[None], factor, torch.float32)
    ref, _ = modeling_llama.apply_rotary_pos_emb(x[..., :8], x[..., :8], cos, sin)
    out = apply_rope(x, cos, sin)
    assert torch.equal(out[..., :8], ref) and torch.equal(out[..., 8:], x[..., 8:])
    with pytest.raises(FuselmError, match="rotary dims"):
        apply_rope(x[..., :6], cos, sin)


def _inv_freq_f64(base: float, d: int) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)


def test_ntk_margin_and_ntk_yarn_falcon_40b():
    # LightOn alfred-40b-1023: Falcon-40B (b=10000, d=64) extended 2048 -> 8192, s=4.
    b_prime = 10000 * 5 ** (64 / 62)
    assert b_prime == pytest.approx(52664, abs=1)
    m = 1 + 0.1 * math.log(4)
    assert m == pytest.approx(1.1386, abs=1e-4)
    for kind, expected_factor in (("ntk-margin", 1.0), ("ntk-yarn", m)):
        inv, factor = rope_frequencies(RopeSpec(64, 10000.0, 2048, {"rope_type": kind, "factor": 4.0}))
        torch.testing.assert_close(inv.double(), _inv_freq_f64(b_prime, 64), rtol=1e-6, atol=0)
        assert factor == pytest.approx(expected_factor, rel=1e-15)
        assert torch.equal(inv, rope_frequencies(RopeSpec(64, b_prime, 2048))[0])  # only the base changes
    # A Falcon-7B derivative on the Hub has rope_theta 10000 * 3^(64/62): NTK-Margin with s = 2.
    inv, _ = rope_frequencies(RopeSpec(64, 10000.0, 2048, {"rope_type": "ntk-margin", "factor": 2.0}))
    torch.testing.assert_close(inv.double(), _inv_freq_f64(31082.2366, 64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("s,base", [(2.0, 20221), (4.0, 40890), (8.0, 82685)])
def test_ntk_aware_base(s, base):
    # NTK-aware b' = b * s^(d/(d-2)); worked values for d=128, b=1e4 from the YaRN notes.
    inv, factor = rope_frequencies(RopeSpec(128, 10000.0, 4096, {"rope_type": "ntk", "factor": s}))
    torch.testing.assert_close(inv.double(), _inv_freq_f64(10000 * s ** (128 / 126), 128), rtol=1e-6, atol=0)
    assert 10000 * s ** (128 / 126) == pytest.approx(base, abs=1) and factor == 1.0


def test_llama3_freq_factors_reproduce_hf():
    head_dim, max_pos, params = HF_CASES["llama3.1-8b"]
    spec = spec_of(head_dim, max_pos, params)
    divisors = rope_freq_factors(spec)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](llama_config(head_dim, max_pos, params), None, None)
    base, _ = rope_frequencies(RopeSpec(head_dim, params["rope_theta"], max_pos))
    torch.testing.assert_close(base / divisors, ref, rtol=1e-6, atol=0)
    # 29 pairs unchanged, 29 divided by 8, 6 blended (notes 2.3)
    assert (divisors == 1).sum() == 29 and (divisors == 8).sum() == 29
    assert rope_freq_factors(RopeSpec(64, 10000.0, 2048)) is None


def test_normalize_forms():
    assert normalize_rope_scaling(None) is None
    assert normalize_rope_scaling({"rope_type": "default", "rope_theta": 10000.0}) is None
    assert normalize_rope_scaling({}) is None
    assert normalize_rope_scaling({"type": "linear", "factor": 2, "rope_theta": 1.0}) == {
        "rope_type": "linear", "factor": 2.0}
    assert normalize_rope_scaling({"type": "yarn", "rope_type": "yarn", "factor": 4,
                                   "original_max_position_embeddings": 4096.0, "beta_fast": None,
                                   "partial_rotary_factor": 1.0}) == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert normalize_rope_scaling({"rope_type": "linear", "factor": 0.5})["factor"] == 0.5  # linear may compress
    assert rope_scaling_to_hf(None) == {"rope_type": "default"}
    hf = rope_scaling_to_hf({"type": "llama3", **{k: v for k, v in HF_CASES["llama3.1-8b"][2].items()
                                                  if k != "rope_type"}})
    assert hf == {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
                  "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    llama_config(128, 131072, {**hf, "rope_theta": 500000.0})  # HF accepts it (a missing key raises KeyError)


@pytest.mark.parametrize("scaling,match", [
    ({"rope_type": "longrope", "factor": 2.0}, "'rope_type' is 'longrope'; expected one of linear, ntk"),
    ({"rope_type": "ntk-yarn"}, "needs key 'factor'"),
    ({"rope_type": "ntk-margin", "factor": 0.5}, "'factor' is 0.5; expected a number >= 1"),
    ({"rope_type": "linear", "factor": 0}, "'factor' is 0; expected a number > 0"),
    ({"rope_type": "linear", "factor": "2"}, "'factor' is '2'"),
    ({"rope_type": "linear", "factor": True}, "'factor' is True"),
    ({"rope_type": "yarn", "factor": 4.0}, "needs key 'original_max_position_embeddings'"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0},
     "needs key 'high_freq_factor'"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 4.0,
      "high_freq_factor": 1.0}, "'high_freq_factor' is 1.0; expected a number > low_freq_factor"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 10.5},
     "'original_max_position_embeddings' is 10.5; expected a positive integer"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "beta_fast": 1, "beta_slow": 4},
     "'beta_fast' is 1.0; expected a number >= beta_slow"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "truncate": 0},
     "'truncate' is 0; expected true or false"),
    ({"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0}, r"unknown key\(s\) \['low_freq_factor'\]"),
    ({"type": "linear", "rope_type": "dynamic", "factor": 2.0}, "'type' .* and 'rope_type' .* disagree"),
    ({"factor": 2.0}, "missing key 'rope_type'"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "'partial_rotary_factor' is 0.5"),
    ([("rope_type", "linear")], "expected a dict"),
])
def test_normalize_errors(scaling, match):
    with pytest.raises(FuselmError, match=match) as err:
        normalize_rope_scaling(scaling, source="cfg.json rope_scaling")
    assert str(err.value).startswith("cfg.json rope_scaling: ")


def test_rope_spec_validates():
    assert RopeSpec(64, 10000.0, 2048, {"type": "linear", "factor": 2}).scaling == {"rope_type": "linear",
                                                                                    "factor": 2.0}
    with pytest.raises(FuselmError, match="head_dim"):
        RopeSpec(63, 10000.0, 2048)
    with pytest.raises(FuselmError, match="RopeSpec.scaling: key 'rope_type' is 'ntk_yarn'"):
        RopeSpec(64, 10000.0, 2048, {"rope_type": "ntk_yarn", "factor": 2.0})


# ---- GGUF ----------------------------------------------------------------------------------------------------

def gguf_round_trip(keys: dict, arch: str, tmp_path) -> dict:
    """Write the keys into a real GGUF with gguf-py (types as documented) and read them back."""
    path = tmp_path / "rope.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {name: field.contents() for name, field in gguf.GGUFReader(str(path)).fields.items()}


def same_scaling(a: dict | None, b: dict | None) -> bool:
    """Equal dicts, floats to float32 precision (GGUF stores FLOAT32)."""
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(
        a[k] == pytest.approx(b[k], rel=1e-6) if isinstance(b[k], float) else a[k] == b[k] for k in b)


GGUF_CASES = {
    "none": (64, 10000.0, 2048, None),
    **{name: (d, p["rope_theta"], L, p) for name, (d, L, p) in HF_CASES.items()},
    "linear-orig": (64, 10000.0, 2048, {"rope_type": "linear", "factor": 4.0,
                                        "original_max_position_embeddings": 2048}),
    "dynamic-orig": (64, 10000.0, 8192, {"rope_type": "dynamic", "factor": 4.0,
                                         "original_max_position_embeddings": 2048}),
    "yarn-finetuned": (128, 10000.0, 65536, {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096,
                                             "finetuned": True}),
    "ntk": (128, 10000.0, 4096, {"rope_type": "ntk", "factor": 2.0}),
    "ntk-margin": (64, 10000.0, 2048, {"rope_type": "ntk-margin", "factor": 4.0}),
    "ntk-yarn-falcon-40b": (64, 10000.0, 2048, {"rope_type": "ntk-yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 2048}),
}
LOSSY = {"yarn-mscale"}  # the mscale pair comes back as the equivalent attention_factor


@pytest.mark.parametrize("name", GGUF_CASES)
@pytest.mark.parametrize("arch", ["llama", "falcon"])
def test_gguf_round_trip(name, arch, tmp_path):
    d, base, max_pos, scaling = GGUF_CASES[name]
    spec = RopeSpec(d, base, max_pos, scaling)
    keys = rope_scaling_gguf_keys(spec, arch)
    metadata = gguf_round_trip(keys, arch, tmp_path)
    back = RopeSpec(d, rope_base_from_gguf(metadata, arch), max_pos, rope_scaling_from_gguf(metadata, arch))
    assert back.base == spec.base
    if name not in LOSSY:
        assert same_scaling(back.scaling, spec.scaling), (back.scaling, spec.scaling)
    for seq_len in (None, 3 * max_pos):
        inv, factor = rope_frequencies(spec, seq_len)
        inv2, factor2 = rope_frequencies(back, seq_len)
        torch.testing.assert_close(inv2, inv, rtol=1e-6, atol=0)
        assert factor2 == pytest.approx(factor, rel=1e-6)


def test_gguf_keys_llama_cpp_semantics():
    # What llama.cpp does with the keys: the ntk family runs as plain RoPE at freq_base (times attn_factor on
    # cos/sin); yarn applies 0.1 ln s + 1 itself and multiplies attn_factor on top; a bare factor means linear.
    b_prime = 10000 * 5 ** (64 / 62)
    keys = rope_scaling_gguf_keys(RopeSpec(64, 10000.0, 2048, {"rope_type": "ntk-yarn", "factor": 4.0}), "falcon")
    assert keys["falcon.rope.freq_base"] == pytest.approx(b_prime, rel=1e-12)
    assert keys["falcon.rope.scaling.attn_factor"] == pytest.approx(1 + 0.1 * math.log(4), rel=1e-12)
    assert keys["fuselm.rope.scaling.type"] == "ntk-yarn" and keys["fuselm.rope.freq_base_original"] == 10000.0
    for scaling in ({"rope_type": "dynamic", "factor": 2.0}, HF_CASES["llama3.1-8b"][2],
                    {"rope_type": "ntk", "factor": 2.0}):
        keys = rope_scaling_gguf_keys(RopeSpec(128, 10000.0, 4096, scaling), "llama")
        assert not any(k.startswith("llama.rope.scaling.") for k in keys), keys
    head_dim, max_pos, params = HF_CASES["yarn-attention-factor"]
    keys = rope_scaling_gguf_keys(spec_of(head_dim, max_pos, params), "llama")
    assert keys["llama.rope.scaling.type"] == "yarn" and keys["llama.rope.scaling.original_context_length"] == 2048
    assert keys["llama.rope.scaling.attn_factor"] * (1 + 0.1 * math.log(2)) == pytest.approx(1.25, rel=1e-12)
    assert rope_scaling_gguf_keys(RopeSpec(64, 10000.0, 2048), "llama") == {"llama.rope.freq_base": 10000.0}


def test_gguf_from_llama_cpp_converter_keys():
    # convert_hf_to_gguf.py writes yarn's attention_factor as yarn_attn_factor; old files use rope.scale_linear.
    md = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
          "llama.rope.scaling.yarn_attn_factor": 1.5, "llama.context_length": 8192}
    assert rope_scaling_from_gguf(md, "llama") == {"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 8192,
                                                   "attention_factor": 1.5}
    assert rope_scaling_from_gguf({"llama.rope.scale_linear": 2.0}, "llama") == {"rope_type": "linear",
                                                                                "factor": 2.0}
    assert rope_scaling_from_gguf({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 2.0},
                                  "llama") is None
    assert rope_scaling_from_gguf({}, "llama") is None and rope_base_from_gguf({}, "llama") == 10000.0
    with pytest.raises(FuselmError, match="'llama.rope.scaling.type' is 'longrope'"):
        rope_scaling_from_gguf({"llama.rope.scaling.type": "longrope", "llama.rope.scaling.factor": 2.0}, "llama")
    with pytest.raises(FuselmError, match="yarn_log_multiplier"):
        rope_scaling_from_gguf({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                                "llama.rope.scaling.original_context_length": 4096,
                                "llama.rope.scaling.yarn_log_multiplier": 0.1}, "llama")
    with pytest.raises(FuselmError, match="GGUF fuselm.rope.scaling.*: rope_type 'ntk-yarn' needs key 'factor'"):
        rope_scaling_from_gguf({"fuselm.rope.scaling.type": "ntk-yarn"}, "llama")
