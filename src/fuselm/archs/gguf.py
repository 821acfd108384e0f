"""llama.cpp GGUF tensor names and layouts for our architectures."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import gguf
import numpy as np
import torch

from ..config import ModelConfig
from ..errors import FuselmError
from ..model.rope import (
    RopeSpec,
    rope_base_from_gguf,
    rope_freq_factors,
    rope_scaling_from_gguf,
    rope_scaling_gguf_keys,
)
from .tensors import _rename, fuse_qkv, map_qk_rows, translate_name

# ---------------------------------------------------------------- GGUF name tables (llama.cpp's names)

GGUF_MODULES = {
    "embed": "token_embd",
    "norm": "output_norm",
    "lm_head": "output",
    "layers.{i}.attn_norm": "blk.{i}.attn_norm",
    "layers.{i}.mlp_norm": "blk.{i}.ffn_norm",
    "layers.{i}.attn.q": "blk.{i}.attn_q",
    "layers.{i}.attn.k": "blk.{i}.attn_k",
    "layers.{i}.attn.v": "blk.{i}.attn_v",
    "layers.{i}.attn.o": "blk.{i}.attn_output",
    "layers.{i}.attn.q_norm": "blk.{i}.attn_q_norm",
    "layers.{i}.attn.k_norm": "blk.{i}.attn_k_norm",
    "layers.{i}.mlp.gate": "blk.{i}.ffn_gate",
    "layers.{i}.mlp.up": "blk.{i}.ffn_up",
    "layers.{i}.mlp.down": "blk.{i}.ffn_down",
}
# llama.cpp's Falcon: attn_norm feeds the MLP (and attention when there is one norm); attn_norm_2 is
# Falcon-40B's ln_attn. q/k/v are one fused attn_qkv tensor laid out as cat(q, k, v).
GGUF_FALCON_MODULES = {
    "embed": "token_embd",
    "norm": "output_norm",
    "lm_head": "output",
    "layers.{i}.attn.qkv": "blk.{i}.attn_qkv",
    "layers.{i}.attn.o": "blk.{i}.attn_output",
    "layers.{i}.mlp.up": "blk.{i}.ffn_up",
    "layers.{i}.mlp.down": "blk.{i}.ffn_down",
}
# llama.cpp rotates q/k in the interleaved (Meta) layout for these archs, so HF's rotate-half rows are permuted.
GGUF_PERMUTES_QK = {"llama": True, "chameleon": True, "falcon": False}


def gguf_module_names(config: ModelConfig) -> dict[str, str]:
    """Internal module template -> GGUF module template for this config."""
    if config.arch != "falcon":
        return dict(GGUF_MODULES)
    table = dict(GGUF_FALCON_MODULES)
    if config.block_kind != "parallel":
        raise FuselmError("llama.cpp's falcon architecture has no sequential (parallel_attn=false) layout")
    if config.parallel_norms == 2:
        table["layers.{i}.attn_norm"] = "blk.{i}.attn_norm_2"
        table["layers.{i}.mlp_norm"] = "blk.{i}.attn_norm"
    else:
        table["layers.{i}.attn_norm"] = "blk.{i}.attn_norm"
    return table


def permute_for_interleaved_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Meta/llama.cpp interleaved rows (per head), for q/k weights, biases, norms."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest).transpose(1, 2).reshape(w.shape)


def unpermute_from_interleaved_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_for_interleaved_rope."""
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def internal_to_gguf(config: ModelConfig, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Internal state dict -> GGUF tensor names and layouts as llama.cpp expects them."""
    sd = dict(state_dict)
    if config.arch == "falcon":
        fuse_qkv(config, sd, lambda q, k, v: torch.cat([q, k, v], dim=0))
    if GGUF_PERMUTES_QK[config.arch]:
        map_qk_rows(config, sd, permute_for_interleaved_rope)
    return _rename(sd, gguf_module_names(config), "state dict", None)


def gguf_to_internal(config: ModelConfig, tensors: Mapping[str, torch.Tensor],
                     source: str = "gguf") -> dict[str, torch.Tensor]:
    """GGUF tensors (dequantized or not) -> internal names and HF layouts."""
    table = {g: ours for ours, g in gguf_module_names(config).items()}
    out = _rename(tensors, table, source, re.compile(r"^rope_freqs\.weight$"))
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    if config.arch == "falcon":
        for name in [n for n in out if ".attn.qkv." in n]:
            fused = out.pop(name)
            prefix, kind = name.rsplit(".attn.qkv.", 1)
            q, k, v = fused.split([config.q_dim, config.kv_dim, config.kv_dim], dim=0)
            for part, tensor in zip("qkv", (q, k, v)):
                out[f"{prefix}.attn.{part}.{kind}"] = tensor
    if GGUF_PERMUTES_QK[config.arch]:
        map_qk_rows(config, out, unpermute_from_interleaved_rope)
    return out


# ---------------------------------------------------------------- GGUF metadata (llama.cpp's keys)
#
# The keys llama.cpp's convert_hf_to_gguf.py writes and llama-model.cpp reads, per arch. Values are plain Python:
# int -> UINT32, float -> FLOAT32, bool -> BOOL, str -> STRING (llama.cpp checks key types when it loads).
# llama.cpp has no key for everything fuselm needs; those live under `fuselm.*` and llama.cpp ignores them:
#   fuselm.flashnorm          bool  norm weights are folded into the following linears (they may be absent)
#   fuselm.eos_token_ids      array every end-of-sequence id when there is more than one (llama.cpp keeps one)
#   fuselm.qk_norm_epsilon    float qk-norm eps when it is not llama.cpp's hard-coded 1e-5
#   fuselm.rope.*             rope scaling that llama.cpp cannot express (model/rope.py writes and reads them)
# Things llama.cpp infers from tensors rather than keys are read back the same way: tied embeddings (no
# output.weight), biases, and Falcon-40B's second norm (blk.N.attn_norm_2).

_MISSING = object()
FLASHNORM_KEY = "fuselm.flashnorm"
EOS_IDS_KEY = "fuselm.eos_token_ids"
QK_NORM_EPS_KEY = "fuselm.qk_norm_epsilon"
_TORCH_QK_NORM_EPS = 1e-5  # llama.cpp's chameleon hard-codes it (and so does HF)


def _arch_key(template: str, arch: str) -> str:
    return template.format(arch=arch)


def _check_gguf_expressible(config: ModelConfig) -> None:
    """llama.cpp's graphs are fixed per arch; refuse configs it would silently run differently."""
    c, problems = config, []
    if c.arch not in GGUF_PERMUTES_QK:
        problems.append(f"arch {c.arch!r} has no llama.cpp architecture")
    elif c.arch == "falcon":
        if c.norm_kind != "layer" or c.mlp_kind != "gelu" or not c.norm_bias:
            problems.append("falcon needs LayerNorm with bias and a GELU MLP")
        if c.block_kind != "parallel":
            problems.append("llama.cpp's falcon architecture has only the parallel (parallel_attn=true) block")
        if c.qk_norm:
            problems.append("llama.cpp's falcon has no qk-norm")
        if c.attention_bias or c.mlp_bias:
            problems.append("llama.cpp's falcon has no linear biases")
    else:
        if c.norm_kind != "rms" or c.mlp_kind != "swiglu" or c.norm_bias:
            problems.append(f"{c.arch} needs RMSNorm without bias and a SwiGLU MLP")
        if c.block_kind == "parallel" or (c.block_kind == "swin_norm" and c.arch != "chameleon"):
            problems.append(f"llama.cpp's {c.arch} has no {c.block_kind} block")
        if c.qk_norm != (c.arch == "chameleon"):
            problems.append("qk-norm is part of llama.cpp's chameleon and absent from its llama")
        if c.arch == "chameleon" and (c.attention_bias or c.mlp_bias):
            problems.append("llama.cpp's chameleon has no output-projection or MLP biases")
    if problems:
        raise FuselmError("config cannot be written as GGUF: " + "; ".join(problems))


def config_to_gguf_metadata(config: ModelConfig) -> dict[str, bool | int | float | str | list]:
    """ModelConfig -> GGUF metadata with llama.cpp's keys (plus fuselm.* where llama.cpp has none).

    Special token ids go under tokenizer.ggml.*; the token list itself comes from formats/gguf_vocab.py.
    """
    _check_gguf_expressible(config)
    c, a = config, config.arch
    md: dict[str, bool | int | float | str | list] = {
        gguf.Keys.General.ARCHITECTURE: a,
        _arch_key(gguf.Keys.LLM.CONTEXT_LENGTH, a): c.max_position_embeddings,
        _arch_key(gguf.Keys.LLM.EMBEDDING_LENGTH, a): c.hidden_size,
        _arch_key(gguf.Keys.LLM.BLOCK_COUNT, a): c.num_hidden_layers,
        _arch_key(gguf.Keys.LLM.FEED_FORWARD_LENGTH, a): c.intermediate_size,
        _arch_key(gguf.Keys.Attention.HEAD_COUNT, a): c.num_attention_heads,
        _arch_key(gguf.Keys.Attention.HEAD_COUNT_KV, a): c.num_key_value_heads,
        _arch_key(gguf.Keys.LLM.VOCAB_SIZE, a): c.vocab_size,
        _arch_key(gguf.Keys.Rope.DIMENSION_COUNT, a): c.head_dim,
    }
    if a == "falcon":
        md[_arch_key(gguf.Keys.Attention.LAYERNORM_EPS, a)] = float(c.norm_eps)
        md[_arch_key(gguf.Keys.LLM.TENSOR_DATA_LAYOUT, a)] = "jploski"  # q, k, v concatenated (as the converter)
    else:
        md[_arch_key(gguf.Keys.Attention.LAYERNORM_RMS_EPS, a)] = float(c.norm_eps)
    if a == "chameleon":
        md[_arch_key(gguf.Keys.LLM.SWIN_NORM, a)] = c.block_kind == "swin_norm"
    # The converter writes these whenever config.json has head_dim, which transformers now saves for llama.
    if a == "llama" or c.head_dim * c.num_attention_heads != c.hidden_size:
        md[_arch_key(gguf.Keys.Attention.KEY_LENGTH, a)] = c.head_dim
        md[_arch_key(gguf.Keys.Attention.VALUE_LENGTH, a)] = c.head_dim
    spec = RopeSpec(head_dim=c.head_dim, base=float(c.rope_theta), max_position_embeddings=c.max_position_embeddings,
                    scaling=c.rope_scaling)
    md.update(rope_scaling_gguf_keys(spec, a))
    if c.flashnorm:
        md[FLASHNORM_KEY] = True
    if c.qk_norm and c.qk_norm_eps != _TORCH_QK_NORM_EPS:
        md[QK_NORM_EPS_KEY] = float(c.qk_norm_eps)
    for key, value in ((gguf.Keys.Tokenizer.BOS_ID, c.bos_token_id), (gguf.Keys.Tokenizer.PAD_ID, c.pad_token_id),
                       (gguf.Keys.Tokenizer.EOS_ID, c.eos_token_ids[0] if c.eos_token_ids else None)):
        if value is not None:
            md[key] = int(value)
    if len(c.eos_token_ids) > 1:
        md[EOS_IDS_KEY] = [int(i) for i in c.eos_token_ids]
    return md


def _rope_spec(config: ModelConfig, scaling: dict | None) -> RopeSpec:
    return RopeSpec(head_dim=config.head_dim, base=float(config.rope_theta),
                    max_position_embeddings=config.max_position_embeddings, scaling=scaling)


def gguf_extra_tensors(config: ModelConfig) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp needs besides the weights: `rope_freqs.weight` carries Llama-3.1 (llama3) RoPE scaling,
    which has no metadata key. Only llama.cpp's llama graph reads it (its falcon and chameleon reject the tensor)."""
    if config.arch != "llama":
        return {}
    factors = rope_freq_factors(_rope_spec(config, config.rope_scaling))
    return {} if factors is None else {"rope_freqs.weight": factors}


def llama3_scaling_from_rope_freqs(config: ModelConfig, factors: np.ndarray, source: str) -> dict | None:
    """Recover the llama3 scaling dict from llama.cpp's `rope_freqs.weight` (what its converter writes for
    Llama-3.1/3.2 instead of keys). Frequencies in the middle band fix the original context; low/high freq factors
    are Meta's 1 and 4. Raises when no llama3 dict reproduces the factors."""
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.shape != (config.head_dim // 2,):
        raise FuselmError(f"{source}: rope_freqs.weight has {factors.size} values; expected head_dim / 2 = "
                          f"{config.head_dim // 2}")
    if np.all(factors == 1):
        return None
    s = float(factors.max())
    inv_freq = 1.0 / (float(config.rope_theta) ** (np.arange(0, config.head_dim, 2) / config.head_dim))
    wavelen = 2 * np.pi / inv_freq
    middle = (factors > 1 + 1e-6) & (factors < s - 1e-6)
    candidates = [8192, 4096, 2048, 16384, 32768, 65536, 131072]
    if middle.any():  # invert divisor = 1 / ((1 - smooth) / s + smooth), smooth = (L / wavelen - 1) / 3
        smooth = (1 / factors[middle] - 1 / s) / (1 - 1 / s)
        candidates.insert(0, int(round(float(np.median(wavelen[middle] * (1 + 3 * smooth))))))
    for n_ctx in candidates:
        scaling = {"rope_type": "llama3", "factor": s, "original_max_position_embeddings": n_ctx,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0}
        fitted = rope_freq_factors(_rope_spec(config, scaling)).double().numpy()
        if np.allclose(fitted, factors, rtol=1e-5, atol=1e-6):
            return scaling
    raise FuselmError(f"{source}: rope_freqs.weight does not match Llama-3.1 (llama3) RoPE scaling with low/high "
                      "frequency factors 1 and 4; fuselm cannot run these frequencies")


def _single(value, key: str, source: str) -> int:
    """llama.cpp allows per-layer arrays for head counts and ffn length; fuselm needs them uniform."""
    if isinstance(value, (list, tuple, np.ndarray)):
        values = {int(v) for v in value}
        if len(values) != 1:
            raise FuselmError(f"{source}: key {key!r} varies per layer ({sorted(values)}); fuselm needs one value")
        return values.pop()
    return int(value)


def config_from_gguf(metadata: Mapping, source: str, tensors: Mapping[str, tuple] | Iterable[str] = (), *,
                     rope_freqs: np.ndarray | None = None) -> ModelConfig:
    """GGUF metadata (+ tensor names, or name -> shape) -> ModelConfig. Missing keys raise FuselmError.

    Tensor names decide what llama.cpp decides from tensors too: output.weight absent -> tied embeddings; biases;
    Falcon-40B style (a second norm per layer, blk.N.attn_norm_2) versus Falcon-7B style. When the file has
    `rope_freqs.weight` (llama.cpp's Llama-3.1 scaling) and no fuselm rope keys, pass its values as `rope_freqs`.
    """
    def get(key: str, default=_MISSING):
        if key in metadata and metadata[key] is not None:
            return metadata[key]
        if default is _MISSING:
            raise FuselmError(f"{source}: missing required GGUF key {key!r}")
        return default

    arch = get(gguf.Keys.General.ARCHITECTURE)
    if arch not in GGUF_PERMUTES_QK:
        raise FuselmError(f"{source}: GGUF architecture {arch!r} is not supported; expected one of "
                          f"{', '.join(GGUF_PERMUTES_QK)}")
    names = set(tensors)
    shapes = tensors if isinstance(tensors, Mapping) else {}

    def key(template: str) -> str:
        return _arch_key(template, arch)

    hidden = int(get(key(gguf.Keys.LLM.EMBEDDING_LENGTH)))
    heads = _single(get(key(gguf.Keys.Attention.HEAD_COUNT)), key(gguf.Keys.Attention.HEAD_COUNT), source)
    kv_heads = _single(get(key(gguf.Keys.Attention.HEAD_COUNT_KV), heads), key(gguf.Keys.Attention.HEAD_COUNT_KV),
                       source)
    head_dim = int(get(key(gguf.Keys.Attention.KEY_LENGTH), hidden // heads))
    rope_dims = int(get(key(gguf.Keys.Rope.DIMENSION_COUNT), head_dim))
    if rope_dims != head_dim:
        raise FuselmError(f"{source}: key {key(gguf.Keys.Rope.DIMENSION_COUNT)!r} is {rope_dims}; fuselm supports "
                          f"only full rotary embeddings (= head_dim {head_dim})")
    vocab = get(key(gguf.Keys.LLM.VOCAB_SIZE), None)
    if vocab is None and gguf.Keys.Tokenizer.LIST in metadata:
        vocab = len(metadata[gguf.Keys.Tokenizer.LIST])
    if vocab is None and "token_embd.weight" in shapes:
        vocab = shapes["token_embd.weight"][0]
    if vocab is None:
        raise FuselmError(f"{source}: missing required GGUF key {key(gguf.Keys.LLM.VOCAB_SIZE)!r} "
                          f"(and no {gguf.Keys.Tokenizer.LIST!r} or token_embd.weight to count the vocabulary)")
    eos = get(gguf.Keys.Tokenizer.EOS_ID, None)
    eos_ids = get(EOS_IDS_KEY, [eos] if eos is not None else [])
    bias_of = {"llama": ("blk.0.attn_q.bias", "blk.0.ffn_up.bias"), "chameleon": ("blk.0.attn_q.bias",
               "blk.0.ffn_up.bias"), "falcon": ("blk.0.attn_qkv.bias", "blk.0.ffn_up.bias")}[arch]
    common = dict(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=_single(get(key(gguf.Keys.LLM.FEED_FORWARD_LENGTH)), key(gguf.Keys.LLM.FEED_FORWARD_LENGTH),
                                  source),
        num_hidden_layers=int(get(key(gguf.Keys.LLM.BLOCK_COUNT))),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(get(key(gguf.Keys.LLM.CONTEXT_LENGTH))),
        attention_bias=bias_of[0] in names,
        mlp_bias=bias_of[1] in names,
        tie_word_embeddings=bool(names) and "output.weight" not in names,
        rope_theta=rope_base_from_gguf(metadata, arch),
        rope_scaling=rope_scaling_from_gguf(metadata, arch),
        flashnorm=bool(get(FLASHNORM_KEY, False)),
        bos_token_id=_optional_int(get(gguf.Keys.Tokenizer.BOS_ID, None)),
        eos_token_ids=tuple(int(i) for i in eos_ids),
        pad_token_id=_optional_int(get(gguf.Keys.Tokenizer.PAD_ID, None)),
    )
    if "rope_freqs.weight" in names and common["rope_scaling"] is None:
        if rope_freqs is None:
            raise FuselmError(f"{source}: the file scales RoPE through rope_freqs.weight; pass its values to "
                              "config_from_gguf(rope_freqs=...)")
        probe = ModelConfig(**common)  # rope fields only; the norm fields below do not matter for the fit
        common["rope_scaling"] = llama3_scaling_from_rope_freqs(probe, rope_freqs, source)
    if arch == "falcon":
        two_norms = "blk.0.attn_norm_2.weight" in names
        new_arch = two_norms or kv_heads > 1  # HF's fused-qkv layout; only matters when writing HF files
        return ModelConfig(
            **common,
            norm_kind="layer",
            norm_eps=float(get(key(gguf.Keys.Attention.LAYERNORM_EPS))),
            norm_bias=True,
            mlp_kind="gelu",
            block_kind="parallel",
            parallel_norms=2 if two_norms else 1,
            extra={"new_decoder_architecture": new_arch, "multi_query": not new_arch and kv_heads == 1},
        )
    chameleon = arch == "chameleon"
    extra = {}
    if chameleon:
        tokens = metadata.get(gguf.Keys.Tokenizer.LIST)
        # HF's config carries the token -> id map (image tokens are the IMGIMG* names); rebuild it from the vocab.
        extra = {"vocabulary_map": {t: i for i, t in enumerate(tokens)} if tokens is not None else None,
                 "vq_config": None}
    return ModelConfig(
        **common,
        norm_kind="rms",
        norm_eps=float(get(key(gguf.Keys.Attention.LAYERNORM_RMS_EPS))),
        mlp_kind="swiglu",
        block_kind="swin_norm" if chameleon and bool(get(key(gguf.Keys.LLM.SWIN_NORM), False)) else "pre_norm",
        qk_norm=chameleon,
        qk_norm_eps=float(get(QK_NORM_EPS_KEY, _TORCH_QK_NORM_EPS)),
        extra=extra,
    )


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def gguf_tensor_name(config: ModelConfig, name: str) -> str:
    """The GGUF name holding an internal tensor (Falcon's q/k/v live in the fused attn_qkv)."""
    return translate_name(gguf_module_names(config), name, fused_qkv=config.arch == "falcon")
