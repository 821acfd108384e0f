"""transforms/: FlashNorm fold vs transformers logits and transformer-tricks' flashify; qk-norm regrouping;
Meta <-> internal conversion vs transformers' Chameleon and an independent model-parallel Meta forward."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformer_tricks
from tiny_hf import chameleon_vocabulary_map
from transformers import (
    ChameleonConfig,
    ChameleonForConditionalGeneration,
    FalconConfig,
    FalconForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from fuselm.archs import config_from_hf, config_to_hf, hf_to_internal, internal_to_hf
from fuselm.archs.meta import internal_to_meta, meta_to_internal
from fuselm.config import expected_shapes
from fuselm.errors import FuselmError
from fuselm.load.meta import convert_meta, load_meta_checkpoint
from fuselm.transforms import (
    check_flashnorm_state,
    expand_qknorm,
    flashify,
    qknorm_groups,
    qknorm_max_deviation,
    regroup_qknorm,
)

VOCAB = 64
TOKENS = torch.tensor([[5, 17, 33, 2, 60, 41, 9, 28, 50, 23, 31, 4]])
SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)


def _randomize_norms(model: torch.nn.Module, seed: int = 1) -> None:
    """Ones/zeros would make every fold trivially right."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(1 + 0.3 * noise if name.endswith("weight") else 0.2 * noise)


def _build(cls, cfg, seed: int = 0):
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    _randomize_norms(model)
    return model


def _llama(tie: bool = False):
    return _build(LlamaForCausalLM, LlamaConfig(**SIZES, intermediate_size=48, num_key_value_heads=2,
                                                tie_word_embeddings=tie, rms_norm_eps=1e-5))


def _chameleon(swin: bool = False):
    cfg = ChameleonConfig(**SIZES, intermediate_size=48, num_key_value_heads=2, swin_norm=swin,
                          vocabulary_map=chameleon_vocabulary_map(VOCAB, image_tokens=8),
                          vq_config={"embed_dim": 8, "num_embeddings": 16, "base_channels": 32,
                                     "channel_multiplier": [1, 1], "resolution": 16, "latent_channels": 8,
                                     "num_res_blocks": 1, "attn_resolutions": []})
    return _build(ChameleonForConditionalGeneration, cfg)


def _falcon(new_arch: bool, parallel: bool = True, tie: bool = True):
    kwargs = dict(new_decoder_architecture=True, num_kv_heads=2) if new_arch else dict(multi_query=True)
    return _build(FalconForCausalLM, FalconConfig(**SIZES, parallel_attn=parallel, bias=False, alibi=False,
                                                  tie_word_embeddings=tie, **kwargs))


def _internal(model):
    config = config_from_hf(model.config.to_dict())
    return config, hf_to_internal(config, model.state_dict())


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        logits = model(TOKENS).logits[0]
    return logits[:, _keep(logits)]


def _keep(logits: torch.Tensor) -> torch.Tensor:
    """Chameleon masks image-token columns to the dtype's min: compare the other columns."""
    return logits[0] > torch.finfo(logits.dtype).min


def _reload(model, config, state, **hf_overrides):
    """A fresh transformers model of the same class holding `state` (internal names)."""
    cfg = copy.deepcopy(model.config)
    for k, v in hf_overrides.items():
        setattr(cfg, k, v)
    fresh = type(model)(cfg).eval()
    result = fresh.load_state_dict(internal_to_hf(config, state), strict=False)
    assert not result.unexpected_keys
    # Tied lm_head and Chameleon's VQ model are not part of our state dict.
    assert all(k == "lm_head.weight" or k.startswith("model.vqmodel.") for k in result.missing_keys)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith("model.vqmodel.")},
                          strict=False)
    return fresh


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------- FlashNorm

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flashify_matches_transformer_tricks(dtype):
    model = _llama().to(dtype)
    config, state = _internal(model)
    _, folded, _ = flashify(config, state, strict=False)
    theirs = {k: v.clone() for k, v in model.state_dict().items()}
    transformer_tricks.flashify(theirs, model.config, False)
    ours = internal_to_hf(config, folded)
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert t.dtype == dtype, name  # transformer-tricks writes fp32 ones for norms; we keep the dtype
        assert torch.equal(t, theirs[name].to(dtype)), name
    # o, down and embeddings are untouched; q and the norms did change.
    assert torch.equal(folded["layers.0.attn.o.weight"], state["layers.0.attn.o.weight"])
    assert not torch.equal(folded["layers.0.attn.q.weight"], state["layers.0.attn.q.weight"])


@pytest.mark.parametrize("make, kept", [
    (lambda: _llama(tie=False), []),
    (lambda: _llama(tie=True), ["norm.weight"]),
    (lambda: _chameleon(), []),
    (lambda: _chameleon(swin=True), [f"layers.{i}.{n}_norm.weight" for i in (0, 1) for n in ("attn", "mlp")]),
], ids=["llama", "llama-tied", "chameleon", "chameleon-swin"])
def test_flashify_rms_models_keep_logits(make, kept):
    model = make()
    config, state = _internal(model)
    new_config, folded, report = flashify(config, state, strict=False)
    assert new_config == config
    for name in kept:  # refused: learned values stay
        assert torch.equal(folded[name], state[name]), name
    for name in set(state) - set(kept):
        if name.endswith("norm.weight") and not name.endswith(("q_norm.weight", "k_norm.weight")):
            assert torch.equal(folded[name], torch.ones_like(state[name])), name
    if kept:
        assert any(line.startswith("kept ") for line in report), report
    assert _rel(_logits(_reload(model, new_config, folded)), _logits(model)) <= 1e-5


def test_flashify_report_names_refusals():
    _, _, report = flashify(*_internal(_chameleon(swin=True)), strict=False)
    swin = [line for line in report if "swin_norm" in line]
    assert swin and "attn_norm, mlp_norm of layers 0-1" in swin[0]
    assert any(line == "folded final norm into lm_head" for line in report), report
    _, _, report = flashify(*_internal(_falcon(new_arch=False)), strict=False)
    assert any("kept final norm" in line and "tied" in line for line in report), report


@pytest.mark.parametrize("new_arch, parallel", [(False, True), (True, True), (False, False)],
                         ids=["falcon-7b", "falcon-40b", "falcon-sequential"])
def test_flashify_falcon_folds_layernorm_bias(new_arch, parallel):
    model = _falcon(new_arch, parallel)
    config, state = _internal(model)
    assert not (config.qkv_bias or config.o_bias)
    new_config, folded, report = flashify(config, state, strict=False)
    assert new_config.qkv_bias and new_config.o_bias and new_config.mlp_bias
    assert any("zero biases" in line and "attn.o" in line and "mlp.down" in line for line in report), report
    assert torch.equal(folded["layers.0.attn.o.bias"], torch.zeros(config.hidden_size))
    norms = ["layers.0.attn_norm"] + (["layers.0.mlp_norm"] if new_arch or not parallel else [])
    for norm in norms:
        assert torch.equal(folded[norm + ".bias"], torch.zeros(config.hidden_size))
    # Tied lm_head: the final LayerNorm stays as learned.
    assert torch.equal(folded["norm.bias"], state["norm.bias"])
    reloaded = _reload(model, new_config, folded, bias=True)
    assert _rel(_logits(reloaded), _logits(model)) <= 1e-5


def test_flashify_falcon_untied_final_layernorm_bias_is_kept():
    model = _falcon(new_arch=True, tie=False)
    config, state = _internal(model)
    _, folded, report = flashify(config, state, strict=False)
    assert torch.equal(folded["norm.weight"], state["norm.weight"])
    assert any("LayerNorm bias cannot move into lm_head" in line for line in report), report
    state = {**state, "norm.bias": torch.zeros(config.hidden_size)}  # no beta: the gain folds into lm_head
    new_config, folded, _ = flashify(config, state, strict=False)
    assert torch.equal(folded["norm.weight"], torch.ones(config.hidden_size))
    model.transformer.ln_f.bias.data.zero_()
    assert _rel(_logits(_reload(model, new_config, folded, bias=True)), _logits(model)) <= 1e-5


def test_strict_flashify_removes_norms_and_needs_the_flag():
    model = _llama()
    config, state = _internal(model)
    compat_config, compat, _ = flashify(config, state, strict=False)
    strict_config, strict, report = flashify(config, state, strict=True)
    assert strict_config.flashnorm and not compat_config.flashnorm
    assert not [n for n in strict if "norm" in n and "q_norm" not in n and "k_norm" not in n]
    assert any(line.startswith("strict: removed 5 folded norm tensor(s)") for line in report), report
    hf = config_to_hf(strict_config)
    assert hf["flashnorm"] is True and config_from_hf(hf).flashnorm
    expected = expected_shapes(strict_config)
    fills = check_flashnorm_state(strict_config, strict.keys(), expected)
    assert set(fills) == set(compat) - set(strict)
    assert all(torch.equal(t, compat[n]) for n, t in {**strict, **fills}.items())
    no_flag = r"model\.safetensors: norm tensor 'norm\.weight' is missing.*lacks a flashnorm flag"
    with pytest.raises(FuselmError, match=no_flag):
        check_flashnorm_state(config, strict.keys(), expected, "model.safetensors")
    with pytest.raises(FuselmError, match=r"'layers\.1\.attn\.q\.weight' is missing"):
        check_flashnorm_state(strict_config, set(strict) - {"layers.1.attn.q.weight"}, expected)
    for key in ("flashnorm_folded", "flash_norm"):  # the other flags in use load the same way
        flagged = config_from_hf({**config_to_hf(config), key: True})
        assert set(check_flashnorm_state(flagged, strict.keys(), expected)) == set(fills)
    # A strict checkpoint loaded with its fill-ins gives the original logits.
    assert _rel(_logits(_reload(model, strict_config, {**strict, **fills})), _logits(model)) <= 1e-5


# ---------------------------------------------------------------- qk-norm

def _grouped_qknorm(config, state, groups: int, seed: int = 3) -> dict:
    """Per-head qk-norm whose heads are equal within `groups` groups (what Meta's shards produce)."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for name in state:
        if "_norm." in name and ".attn." in name:
            heads = state[name].shape[0]
            g = min(groups, heads)
            rows = torch.randn(g, config.head_dim, generator=gen) * 0.3 + (1 if name.endswith("weight") else 0)
            out[name] = rows.repeat_interleave(heads // g, dim=0)
    return out


def test_regroup_round_trip_and_groups_from_weights():
    config, state = _internal(_chameleon())
    state = _grouped_qknorm(config, state, groups=2)
    assert qknorm_groups(state) == (4, 2)
    for groups, want in ((2, (2, 2)), (4, (4, 2)), (1, (1, 1))):
        src = state if groups != 1 else _grouped_qknorm(config, state, groups=1)
        grouped = regroup_qknorm(config, src, groups)
        assert qknorm_groups(grouped) == want
        back = expand_qknorm(config, grouped)
        assert all(torch.equal(back[n], src[n]) for n in src)
        assert qknorm_groups(regroup_qknorm(config, grouped, groups)) == want  # grouped input works too
    assert qknorm_max_deviation(config, state, 2) == 0.0


def test_regroup_refuses_divergent_heads():
    config, state = _internal(_chameleon())
    state = _grouped_qknorm(config, state, groups=1)
    state["layers.1.attn.q_norm.weight"] = state["layers.1.attn.q_norm.weight"].clone()
    state["layers.1.attn.q_norm.weight"][3, 5] += 0.25
    with pytest.raises(FuselmError, match=r"layers\.1\.attn\.q_norm\.weight.*max deviation 0\.25"):
        regroup_qknorm(config, state, 1)
    assert qknorm_max_deviation(config, state, 1) == pytest.approx(0.25)
    averaged = regroup_qknorm(config, state, 1, average=True)
    want = state["layers.1.attn.q_norm.weight"].mean(dim=0, keepdim=True)
    assert torch.allclose(averaged["layers.1.attn.q_norm.weight"], want)
    with pytest.raises(FuselmError, match="must divide num_attention_heads"):
        regroup_qknorm(config, state, 3)
    bad = {**state, "layers.1.attn.k_norm.weight": state["layers.1.attn.k_norm.weight"][:1]}
    with pytest.raises(FuselmError, match=r"layers\.1\.attn\.k_norm\.weight.*1 rows"):
        qknorm_groups(bad)


# ---------------------------------------------------------------- Meta's release

def _meta_forward(params: dict, shards: list[dict], tokens: torch.Tensor) -> torch.Tensor:
    """Meta's Chameleon forward written from its description, shard by shard as model parallelism runs it:
    all-gathered embedding columns, per-rank qk LayerNorm, interleaved (complex-pair) RoPE, all-reduced wo/w2,
    vocab-split output."""
    n, dim, heads = len(shards), params["dim"], params["n_heads"]
    kv_heads, hd, eps = params["n_kv_heads"], dim // params["n_heads"], params["norm_eps"]
    hq, hk, T = heads // n, kv_heads // n, tokens.shape[-1]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    freqs = 1.0 / params["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    rot = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rope(x):  # (T, H, hd), pairs (2i, 2i+1) rotate together
        xc = torch.view_as_complex(x.reshape(T, x.shape[1], hd // 2, 2))
        return torch.view_as_real(xc * rot[:, None]).reshape(x.shape)

    x = torch.cat([s["tok_embeddings.weight"][tokens[0]] for s in shards], dim=-1)
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        h = rms(x, shards[0][p + "attention_norm.weight"])
        attn = torch.zeros_like(x)
        for s in shards:
            qn, kn = (p + f"attention.{w}_normalization." for w in "qk")
            q = F.layer_norm((h @ s[p + "attention.wq.weight"].T).view(T, hq, hd), (hd,), s[qn + "weight"],
                             s[qn + "bias"], eps=1e-5)
            k = F.layer_norm((h @ s[p + "attention.wk.weight"].T).view(T, hk, hd), (hd,), s[kn + "weight"],
                             s[kn + "bias"], eps=1e-5)
            q, k = rope(q), rope(k)
            v = (h @ s[p + "attention.wv.weight"].T).view(T, hk, hd)
            k, v = (t.repeat_interleave(hq // hk, dim=1) for t in (k, v))
            scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
            out = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, hq * hd)
            attn = attn + out @ s[p + "attention.wo.weight"].T
        x = x + attn
        h = rms(x, shards[0][p + "ffn_norm.weight"])
        x = x + sum((F.silu(h @ s[p + "feed_forward.w1.weight"].T) * (h @ s[p + "feed_forward.w3.weight"].T))
                    @ s[p + "feed_forward.w2.weight"].T for s in shards)
    x = rms(x, shards[0]["norm.weight"])
    return torch.cat([x @ s["output.weight"].T for s in shards], dim=-1)


@pytest.mark.parametrize("num_shards", [1, 2])
def test_meta_round_trip_and_logits(num_shards):
    model = _chameleon()
    config, state = _internal(model)
    state = _grouped_qknorm(config, state, groups=num_shards)
    model.load_state_dict(internal_to_hf(config, state), strict=False)
    reference = _logits(model)

    params, shards = internal_to_meta(config, state, num_shards)
    assert len(shards) == num_shards and params["model_parallel_size"] == num_shards
    assert shards[0]["layers.0.attention.q_normalization.weight"].shape == (config.head_dim,)
    assert shards[-1]["tok_embeddings.weight"].shape == (VOCAB, config.hidden_size // num_shards)
    # Meta's own semantics (interleaved RoPE, per-rank qk-norm) reproduce transformers' logits.
    meta_logits = _meta_forward(params, shards, TOKENS)
    with torch.no_grad():
        keep = _keep(model(TOKENS).logits[0])
    assert _rel(meta_logits[:, keep], reference) <= 1e-5

    back_config, back = meta_to_internal(params, shards, qk_norm="per-head")
    assert back_config.replace(extra=config.extra, bos_token_id=config.bos_token_id,
                               eos_token_ids=config.eos_token_ids, pad_token_id=config.pad_token_id,
                               max_position_embeddings=config.max_position_embeddings) == config
    assert set(back) == set(state)
    assert all(torch.equal(back[n], state[n]) for n in state)
    assert torch.equal(_logits(_reload(model, config, back)), reference)

    # Llama 3 splits tok_embeddings along the vocab instead: read from the shapes.
    by_vocab = [{**s, "tok_embeddings.weight": e} for s, e in
                zip(shards, state["embed.weight"].chunk(num_shards, dim=0))]
    assert torch.equal(meta_to_internal(params, by_vocab)[1]["embed.weight"], state["embed.weight"])

    _, grouped = meta_to_internal(params, shards, qk_norm="grouped")
    assert qknorm_groups(grouped) == (num_shards, num_shards)
    assert all(torch.equal(t, state[n]) for n, t in expand_qknorm(config, grouped).items())


def test_internal_to_meta_refuses_heads_that_differ_within_a_shard():
    config, state = _internal(_chameleon())  # random per-head qk-norm
    with pytest.raises(FuselmError, match=r"layers\.0\.attn\.q_norm\.weight.*differ"):
        internal_to_meta(config, state, 2)


class _NotATensor:
    pass


def test_load_meta_checkpoint_from_files(tmp_path):
    model = _chameleon()
    config, state = _internal(model)
    state = _grouped_qknorm(config, state, groups=2)
    params, shards = internal_to_meta(config, state, 2)
    root = tmp_path / "data"
    model_dir = root / "models" / "30b"
    model_dir.mkdir(parents=True)
    model_params = {k: v for k, v in params.items() if k != "model_parallel_size"}
    (model_dir / "params.json").write_text(json.dumps({"model": model_params, "seed": 1}))
    (model_dir / "consolidate_params.json").write_text(json.dumps({"model_parallel_size": 2}))
    for i, shard in enumerate(shards):
        torch.save({**shard, "rope.freqs": torch.ones(4)}, model_dir / f"consolidated.{i:02d}.pth")
    (root / "tokenizer").mkdir()
    vocab = {("<reserved08707>" if k == "<image>" else k): v for k, v in chameleon_vocabulary_map(VOCAB, 8).items()}
    (root / "tokenizer" / "text_tokenizer.json").write_text(json.dumps(
        {"model": {"type": "BPE", "vocab": vocab, "merges": []},
         "added_tokens": [{"id": vocab["<reserved08707>"], "content": "<reserved08707>"}]}))

    merged, loaded = load_meta_checkpoint(model_dir)
    assert merged["model_parallel_size"] == 2 and merged["dim"] == config.hidden_size
    assert len(loaded) == 2
    result = convert_meta(root, qk_norm="per-head")
    assert all(torch.equal(result.state_dict[n], state[n]) for n in state)
    assert result.config.extra["vocabulary_map"]["<image>"] == vocab["<reserved08707>"]
    assert result.tokenizer_json["added_tokens"][0]["content"] == "<image>"
    assert result.config.bos_token_id == 0 and result.config.eos_token_ids == (2,)
    assert any("VQGAN: no tokenizer/vqgan.ckpt" in line for line in result.report)

    torch.save({"tok_embeddings.weight": _NotATensor()}, model_dir / "consolidated.01.pth")
    with pytest.raises(FuselmError, match=r"consolidated\.01\.pth: refusing to load"):
        load_meta_checkpoint(model_dir)
    (model_dir / "consolidated.01.pth").unlink()
    (model_dir / "consolidated.02.pth").write_bytes(b"")
    with pytest.raises(FuselmError, match=r"numbered \[0, 2\]"):
        load_meta_checkpoint(model_dir)
