"""RoPE scaling as HF config keys and GGUF metadata keys (both directions)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..config.rope import RopeSpec, finite_number, normalize_rope_scaling, ntk_exponent, rope_frequencies, yarn_mscale
from ..errors import FuselmError


def rope_scaling_to_hf(scaling: Mapping | None) -> dict:
    """The scaling as HF config keys (merge `rope_theta` in for transformers 5 `rope_parameters`).

    ntk, ntk-margin and ntk-yarn keep their fuselm names: stock transformers cannot run them (KeyError in the
    rotary module); fuselm reads them back.
    """
    norm = normalize_rope_scaling(scaling, source="rope_scaling_to_hf")
    return {"rope_type": "default"} if norm is None else dict(norm)


# --------------------------------------------------------------------------------------------------------------
# GGUF. llama.cpp knows the scaling types none/linear/yarn/longrope, read from {arch}.rope.scaling.*.
# - linear and yarn use those keys as llama.cpp's converter writes them.
# - ntk, ntk-margin and ntk-yarn only change the base (and ntk-yarn scales cos/sin by m), so {arch}.rope.freq_base
#   carries the *scaled* base and ntk-yarn sets {arch}.rope.scaling.attn_factor = m: llama.cpp then runs them
#   exactly. The method, factor and original base are kept under fuselm.* so fuselm can restore the scaling dict.
# - dynamic and llama3 have no llama.cpp key; they live under fuselm.* only. llama.cpp runs dynamic as plain RoPE
#   (exact up to the original context); for llama3 the writer should also store rope_freq_factors() as the
#   `rope_freqs.weight` tensor, which is how llama.cpp applies Llama-3.1 scaling.
# Scaling keys must not be written under {arch}.* for these types: llama.cpp would read a bare
# {arch}.rope.scaling.factor as *linear* scaling.
# --------------------------------------------------------------------------------------------------------------
FUSELM_TYPE = "fuselm.rope.scaling.type"
FUSELM_FACTOR = "fuselm.rope.scaling.factor"
FUSELM_ORIG_CTX = "fuselm.rope.scaling.original_context_length"
FUSELM_LOW_FREQ = "fuselm.rope.scaling.low_freq_factor"
FUSELM_HIGH_FREQ = "fuselm.rope.scaling.high_freq_factor"
FUSELM_YARN_TRUNCATE = "fuselm.rope.scaling.yarn_truncate"
FUSELM_BASE = "fuselm.rope.freq_base_original"


def _effective_base(spec: RopeSpec) -> float:
    """The plain-RoPE base that reproduces the scaling in llama.cpp (the ntk family only changes the base)."""
    sc = spec.scaling
    if sc is None or sc["rope_type"] not in ("ntk", "ntk-margin", "ntk-yarn"):
        return float(spec.base)
    s = sc["factor"] if sc["rope_type"] == "ntk" else sc["factor"] + 1
    return float(spec.base * s ** ntk_exponent(spec.head_dim, sc["rope_type"]))


def rope_scaling_gguf_keys(spec: RopeSpec, arch: str) -> dict[str, bool | int | float | str]:
    """GGUF metadata for the spec's base and scaling, including `{arch}.rope.freq_base` (write it instead of your own).

    Value types: float -> FLOAT32, int -> UINT32, str -> STRING, bool -> BOOL (llama.cpp checks key types).
    """
    sc = spec.scaling
    out: dict[str, bool | int | float | str] = {f"{arch}.rope.freq_base": _effective_base(spec)}
    if sc is None:
        return out
    t, s = sc["rope_type"], sc["factor"]
    p = f"{arch}.rope.scaling"
    if t in ("linear", "yarn"):
        out[f"{p}.type"] = t
        out[f"{p}.factor"] = s
        if "original_max_position_embeddings" in sc:
            out[f"{p}.original_context_length"] = sc["original_max_position_embeddings"]
    if t == "yarn":
        for key, gguf_key in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"),
                              ("finetuned", "finetuned")):
            if key in sc:
                out[f"{p}.{gguf_key}"] = sc[key]
        _, attention = rope_frequencies(spec)
        if attention != yarn_mscale(s):
            # llama.cpp applies 0.1 ln s + 1 itself and multiplies by attn_factor.
            out[f"{p}.attn_factor"] = attention / yarn_mscale(s)
        if not sc.get("truncate", True):
            out[FUSELM_YARN_TRUNCATE] = False  # llama.cpp always truncates the correction range
        return out
    if t == "linear":
        return out
    out[FUSELM_TYPE] = t
    out[FUSELM_FACTOR] = s
    if "original_max_position_embeddings" in sc:
        out[FUSELM_ORIG_CTX] = sc["original_max_position_embeddings"]
    if t == "llama3":
        out[FUSELM_LOW_FREQ] = sc["low_freq_factor"]
        out[FUSELM_HIGH_FREQ] = sc["high_freq_factor"]
    if t in ("ntk", "ntk-margin", "ntk-yarn"):
        out[FUSELM_BASE] = float(spec.base)
    if t == "ntk-yarn":
        out[f"{p}.attn_factor"] = rope_frequencies(spec)[1]
    return out


def _gguf_value(metadata: Mapping[str, Any], key: str) -> Any:
    v = metadata.get(key)
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8")
    if isinstance(v, np.generic):  # numpy scalars from a reader
        return v.item()
    return v


def rope_base_from_gguf(metadata: Mapping[str, Any], arch: str, source: str = "gguf") -> float:
    """The unscaled base (rope_theta) to put in RopeSpec: fuselm's original base for the ntk family, else
    `{arch}.rope.freq_base`, else llama.cpp's default 10000."""
    for key in (FUSELM_BASE, f"{arch}.rope.freq_base"):
        v = _gguf_value(metadata, key)
        if v is not None:
            if not (finite_number(v) and v > 1):
                raise FuselmError(f"{source}: GGUF key {key!r} is {v!r}; expected a number > 1")
            return float(v)
    return 10000.0


def rope_scaling_from_gguf(metadata: Mapping[str, Any], arch: str) -> dict | None:
    """The normalized scaling dict from GGUF metadata (key -> plain value), or None for plain RoPE.

    Reads fuselm.rope.scaling.* first, else llama.cpp's {arch}.rope.scaling.* (linear, yarn). For a Llama-3.1
    GGUF from llama.cpp's converter this returns None: its scaling is the `rope_freqs.weight` tensor.
    """
    def get(key: str) -> Any:
        return _gguf_value(metadata, key)

    p = f"{arch}.rope.scaling"
    fuselm_type = get(FUSELM_TYPE)
    if fuselm_type is not None:
        d = {"rope_type": fuselm_type, "factor": get(FUSELM_FACTOR),
             "original_max_position_embeddings": get(FUSELM_ORIG_CTX)}
        if fuselm_type == "llama3":
            d.update(low_freq_factor=get(FUSELM_LOW_FREQ), high_freq_factor=get(FUSELM_HIGH_FREQ))
        return normalize_rope_scaling(d, source="GGUF fuselm.rope.scaling.*")
    factor = get(f"{p}.factor")
    if factor is None:
        factor = get(f"{arch}.rope.scale_linear")  # the old key llama.cpp still reads
    kind = get(f"{p}.type")
    if kind is None:
        kind = "linear"  # llama.cpp's default when a factor is present
    if kind == "none" or not factor:  # llama.cpp: a missing or zero factor means no scaling
        return None
    source = f"GGUF {p}.*"
    if kind == "linear":
        return normalize_rope_scaling({"rope_type": "linear", "factor": factor,
                                       "original_max_position_embeddings": get(f"{p}.original_context_length")},
                                      source=source)
    if kind != "yarn":
        raise FuselmError(f"{source}: key '{p}.type' is {kind!r}; expected none, linear or yarn")
    for key, neutral in ((f"{p}.yarn_log_multiplier", 0.0), (f"{p}.yarn_ext_factor", 1.0)):
        if get(key) is not None and get(key) != neutral:
            raise FuselmError(f"{source}: key '{key}' is {get(key)}; only {neutral} is supported")
    orig = get(f"{p}.original_context_length")
    if orig is None:
        orig = get(f"{arch}.context_length")  # llama.cpp's default for n_ctx_orig_yarn
    d = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig,
         "beta_fast": get(f"{p}.yarn_beta_fast"), "beta_slow": get(f"{p}.yarn_beta_slow"),
         "finetuned": get(f"{p}.finetuned")}
    if get(f"{p}.yarn_attn_factor") is not None:  # llama.cpp's converter stores HF's attention_factor here
        d["attention_factor"] = get(f"{p}.yarn_attn_factor")
    elif get(f"{p}.attn_factor") not in (None, 1.0):
        if not (finite_number(factor) and factor >= 1):
            raise FuselmError(f"{source}: key '{p}.factor' is {factor!r}; expected a number >= 1 for yarn")
        d["attention_factor"] = get(f"{p}.attn_factor") * yarn_mscale(factor)
    if get(FUSELM_YARN_TRUNCATE) is not None:
        d["truncate"] = get(FUSELM_YARN_TRUNCATE)
    return normalize_rope_scaling(d, source=source)
