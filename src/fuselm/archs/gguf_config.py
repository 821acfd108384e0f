"""GGUF metadata (llama.cpp's keys) to and from ModelConfig, through the Arch records.

The keys llama.cpp's convert_hf_to_gguf.py writes and llama-model.cpp reads, per arch. Values are plain Python:
int -> UINT32, float -> FLOAT32, bool -> BOOL, str -> STRING (llama.cpp checks key types when it loads).
llama.cpp has no key for everything fuselm needs; those live under `fuselm.*` and llama.cpp ignores them:
  fuselm.flashnorm          bool  norm weights are folded into the following linears (they may be absent)
  fuselm.eos_token_ids      array every end-of-sequence id when there is more than one (llama.cpp keeps one)
  fuselm.architecture       str   the family when llama.cpp runs it as another architecture (mistral -> llama)
  fuselm.qk_norm_epsilon, fuselm.sliding_window, fuselm.rope.*: see the families and archs/rope_keys.py
Things llama.cpp infers from tensors rather than keys are read back the same way: tied embeddings (no
output.weight), biases, and Falcon-40B's second norm (blk.N.attn_norm_2).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import gguf
import numpy as np
import torch

from ..config import ModelConfig
from ..config.rope import RopeSpec, rope_freq_factors
from ..errors import FuselmError
from .registry import ARCHS, GGUF_ARCHS, arch_record
from .rope_keys import rope_base_from_gguf, rope_scaling_from_gguf, rope_scaling_gguf_keys
from .values import MISSING, read_bool, read_float, read_int, read_str, read_token_ids, uniform_int

FLASHNORM_KEY = "fuselm.flashnorm"
EOS_IDS_KEY = "fuselm.eos_token_ids"
ARCH_KEY = "fuselm.architecture"


def config_to_gguf_metadata(config: ModelConfig) -> dict[str, bool | int | float | str | list]:
    """ModelConfig -> GGUF metadata with llama.cpp's keys (plus fuselm.* where llama.cpp has none).

    Special token ids go under tokenizer.ggml.*; the token list itself comes from formats/gguf_vocab.py.
    """
    record = arch_record(config.arch)
    problems = record.gguf_problems(config)
    if problems:
        raise FuselmError("config cannot be written as GGUF: " + "; ".join(problems))
    c, a = config, record.gguf_arch
    md: dict[str, bool | int | float | str | list] = {
        gguf.Keys.General.ARCHITECTURE: a,
        gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=a): c.max_position_embeddings,
        gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=a): c.hidden_size,
        gguf.Keys.LLM.BLOCK_COUNT.format(arch=a): c.num_hidden_layers,
        gguf.Keys.LLM.FEED_FORWARD_LENGTH.format(arch=a): c.intermediate_size,
        gguf.Keys.Attention.HEAD_COUNT.format(arch=a): c.num_attention_heads,
        gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=a): c.num_key_value_heads,
        gguf.Keys.LLM.VOCAB_SIZE.format(arch=a): c.vocab_size,
        gguf.Keys.Rope.DIMENSION_COUNT.format(arch=a): c.head_dim,
    }
    md.update({key.format(arch=a): value for key, value in record.gguf_keys(c).items()})
    # The converter writes these whenever config.json has head_dim, which transformers now saves for llama.
    if a == "llama" or c.head_dim * c.num_attention_heads != c.hidden_size:
        md[gguf.Keys.Attention.KEY_LENGTH.format(arch=a)] = c.head_dim
        md[gguf.Keys.Attention.VALUE_LENGTH.format(arch=a)] = c.head_dim
    spec = RopeSpec(head_dim=c.head_dim, base=float(c.rope_theta), max_position_embeddings=c.max_position_embeddings,
                    scaling=c.rope_scaling)
    md.update(rope_scaling_gguf_keys(spec, a))
    if c.flashnorm:
        md[FLASHNORM_KEY] = True
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
    if not arch_record(config.arch).gguf_rope_freqs:
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


def _family(metadata: Mapping, source: str) -> str:
    arch = read_str(metadata, gguf.Keys.General.ARCHITECTURE, source)
    family = read_str(metadata, ARCH_KEY, source, None) or GGUF_ARCHS.get(arch)
    if family not in ARCHS or arch_record(family).gguf_arch != arch:
        raise FuselmError(f"{source}: GGUF architecture {arch!r} is not supported; expected one of "
                          f"{', '.join(sorted(GGUF_ARCHS))}")
    return family


def config_from_gguf(metadata: Mapping, source: str, tensors: Mapping[str, tuple] | Iterable[str] = (), *,
                     rope_freqs: np.ndarray | None = None) -> ModelConfig:
    """GGUF metadata (+ tensor names, or name -> shape) -> ModelConfig. Missing or bad keys raise FuselmError.

    Tensor names decide what llama.cpp decides from tensors too: output.weight absent -> tied embeddings; biases;
    Falcon-40B style (a second norm per layer, blk.N.attn_norm_2) versus Falcon-7B style. When the file has
    `rope_freqs.weight` (llama.cpp's Llama-3.1 scaling) and no fuselm rope keys, pass its values as `rope_freqs`.
    """
    family = _family(metadata, source)
    record = arch_record(family)
    arch = record.gguf_arch
    readers = {"int": read_int, "float": read_float, "bool": read_bool, "str": read_str}

    def get(template: str, default=MISSING, *, kind: str = "int", arch_key: bool = True):
        key = template.format(arch=arch) if arch_key else template
        if kind == "list":
            value = metadata.get(key)
            if value is None and default is MISSING:
                raise FuselmError(f"{source}: missing required GGUF key {key!r}")
            if value is not None and not isinstance(value, (list, tuple, np.ndarray)):
                raise FuselmError(f"{source}: GGUF key {key!r} must be an array")
            return default if value is None else value
        return readers[kind](metadata, key, source, default, "GGUF")

    names = set(tensors)
    shapes = tensors if isinstance(tensors, Mapping) else {}
    hidden = get(gguf.Keys.LLM.EMBEDDING_LENGTH)
    heads_key = gguf.Keys.Attention.HEAD_COUNT.format(arch=arch)
    heads = uniform_int(metadata, heads_key, source, label="GGUF", limit="heads")
    kv_heads = uniform_int(metadata, gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch), source, heads, "GGUF",
                           limit="heads")
    head_dim = get(gguf.Keys.Attention.KEY_LENGTH, hidden // heads or 1)
    rope_dims = get(gguf.Keys.Rope.DIMENSION_COUNT, head_dim)
    if rope_dims != head_dim:
        raise FuselmError(f"{source}: key {gguf.Keys.Rope.DIMENSION_COUNT.format(arch=arch)!r} is {rope_dims}; "
                          f"fuselm supports only full rotary embeddings (= head_dim {head_dim})")
    vocab = get(gguf.Keys.LLM.VOCAB_SIZE, None)
    if vocab is None and isinstance(metadata.get(gguf.Keys.Tokenizer.LIST), (list, tuple, np.ndarray)):
        vocab = len(metadata[gguf.Keys.Tokenizer.LIST])
    if vocab is None and "token_embd.weight" in shapes:
        vocab = int(shapes["token_embd.weight"][0])
    if vocab is None:
        raise FuselmError(f"{source}: missing required GGUF key {gguf.Keys.LLM.VOCAB_SIZE.format(arch=arch)!r} "
                          f"(and no {gguf.Keys.Tokenizer.LIST!r} or token_embd.weight to count the vocabulary)")
    eos_ids = read_token_ids(metadata, EOS_IDS_KEY, source) or read_token_ids(metadata, gguf.Keys.Tokenizer.EOS_ID,
                                                                               source)
    qkv_probe, o_probe, mlp_probe = record.gguf_bias_tensors
    common = dict(
        arch=family,
        vocab_size=read_int({"vocab": vocab}, "vocab", source, limit="vocab"),
        hidden_size=read_int({"h": hidden}, "h", source, limit="width"),
        intermediate_size=uniform_int(metadata, gguf.Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch), source,
                                      label="GGUF", limit="width"),
        num_hidden_layers=get(gguf.Keys.LLM.BLOCK_COUNT),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=get(gguf.Keys.LLM.CONTEXT_LENGTH),
        qkv_bias=qkv_probe in names,
        o_bias=o_probe in names,
        mlp_bias=mlp_probe in names,
        tie_word_embeddings=bool(names) and "output.weight" not in names,
        rope_theta=rope_base_from_gguf(metadata, arch, source),
        rope_scaling=rope_scaling_from_gguf(metadata, arch),
        flashnorm=read_bool(metadata, FLASHNORM_KEY, source),
        bos_token_id=read_int(metadata, gguf.Keys.Tokenizer.BOS_ID, source, None, minimum=0, limit="vocab"),
        eos_token_ids=eos_ids,
        pad_token_id=read_int(metadata, gguf.Keys.Tokenizer.PAD_ID, source, None, minimum=0, limit="vocab"),
    )
    for limit_key, limit in (("num_hidden_layers", "layers"), ("max_position_embeddings", "context")):
        read_int(common, limit_key, source, limit=limit)
    if "rope_freqs.weight" in names and common["rope_scaling"] is None:
        if rope_freqs is None:
            raise FuselmError(f"{source}: the file scales RoPE through rope_freqs.weight; pass its values to "
                              "config_from_gguf(rope_freqs=...)")
        probe = ModelConfig(**common)  # rope fields only; the norm fields below do not matter for the fit
        common["rope_scaling"] = llama3_scaling_from_rope_freqs(probe, rope_freqs, source)
    fields = record.gguf_fields(get, names, common)
    try:
        return ModelConfig(**common, **fields)
    except FuselmError as err:
        raise FuselmError(f"{source}: {err}") from None
