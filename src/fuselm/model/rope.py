"""RoPE with every scaling method fuselm supports, as pure functions.

Scaling dicts use HF's keys (`rope_type`, `factor`, `original_max_position_embeddings`, ...). The methods:

| rope_type  | inverse frequencies                                        | attention factor m (on cos and sin) |
|------------|------------------------------------------------------------|-------------------------------------|
| linear     | inv_freq / s  (positions / s)                              | 1                                   |
| ntk        | base' = b * s^(d/(d-2))                                    | 1                                   |
| dynamic    | base' = b * (s*l/L - (s-1))^(d/(d-2)) for l > L, else b     | 1                                   |
| yarn       | NTK-by-parts ramp between extrapolation and inv_freq / s   | 0.1 ln s + 1 (or explicit)          |
| llama3     | Llama-3.1 wavelength bands                                 | 1                                   |
| ntk-margin | base' = b * (s+1)^(d/(d-2))   (LightOn alfred-40b-1023)      | 1                                   |
| ntk-yarn   | ntk-margin base                                            | 1 + 0.1 ln s                        |

linear, dynamic, yarn and llama3 follow transformers 5.23 (`modeling_rope_utils`) operation for operation, so the
float32 results are bit-identical. ntk-margin and ntk-yarn have no HF implementation; they follow the model card.
m multiplies cos and sin, so q and k are each scaled by m (attention logits by m^2), as HF and YaRN do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import FuselmError

ROPE_TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3", "ntk-margin", "ntk-yarn")

# Keys each rope_type must have, and may have, besides rope_type.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "ntk": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "ntk-margin": ("factor",),
    "ntk-yarn": ("factor",),
}
_YARN_OPTIONAL = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate", "finetuned")
_OPTIONAL: dict[str, tuple[str, ...]] = {
    t: ("original_max_position_embeddings",) + (_YARN_OPTIONAL if t == "yarn" else ()) for t in ROPE_TYPES
}
# Keys that describe the model rather than the scaling: accepted (HF 5 puts them in rope_parameters) and dropped.
# The caller reads rope_theta itself; partial rotary is expressed by RopeSpec.head_dim, so only 1.0 is accepted here.
_MODEL_KEYS = ("rope_theta", "partial_rotary_factor")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_value(key: str, v: Any, rope_type: str) -> tuple[bool, str, Any]:
    """(ok, expected, canonical value) for one key of a scaling dict."""
    if key == "factor":
        # Linear may compress (s < 1); the NTK family and the band methods assume s >= 1.
        if rope_type == "linear":
            return _number(v) and v > 0, "a number > 0", float(v) if _number(v) else v
        return _number(v) and v >= 1, f"a number >= 1 for rope_type '{rope_type}'", float(v) if _number(v) else v
    if key == "original_max_position_embeddings":
        ok = _number(v) and v > 0 and float(v).is_integer()
        return ok, "a positive integer", int(v) if ok else v
    if key in ("truncate", "finetuned"):
        return isinstance(v, bool), "true or false", v
    if key in ("mscale", "mscale_all_dim"):
        return _number(v) and v >= 0, "a number >= 0", float(v) if _number(v) else v
    # low_freq_factor, high_freq_factor, attention_factor, beta_fast, beta_slow
    return _number(v) and v > 0, "a number > 0", float(v) if _number(v) else v


def normalize_rope_scaling(scaling: Mapping | None, *, source: str = "rope_scaling") -> dict | None:
    """Validate an HF-style scaling dict and return its canonical form, or None for plain RoPE.

    Accepts `rope_type` or the legacy `type`; "default" (or no type at all with nothing else) means None.
    `rope_theta` and `partial_rotary_factor` (HF 5 `rope_parameters`) are dropped: the base lives in
    RopeSpec.base. Optional keys whose value is None are dropped (HF treats them as absent).
    Raises one FuselmError naming `source`, the key and the expected value.
    """
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise FuselmError(f"{source}: expected a dict such as {{'rope_type': 'linear', 'factor': 2.0}}, "
                          f"got {type(scaling).__name__}")
    d = dict(scaling)
    if "type" in d and "rope_type" in d and d["type"] != d["rope_type"]:
        raise FuselmError(f"{source}: keys 'type' ({d['type']!r}) and 'rope_type' ({d['rope_type']!r}) disagree; "
                          "expected one rope type")
    rope_type = d.pop("rope_type", None)
    legacy = d.pop("type", None)
    rope_type = rope_type if rope_type is not None else legacy
    prf = d.pop("partial_rotary_factor", None)
    if prf is not None and prf != 1.0:
        raise FuselmError(f"{source}: key 'partial_rotary_factor' is {prf!r}; expected 1.0 here "
                          "(express a partial rotary dimension through RopeSpec.head_dim)")
    d.pop("rope_theta", None)
    if rope_type is None:
        if not d:
            return None
        raise FuselmError(f"{source}: missing key 'rope_type' (or legacy 'type'); expected one of "
                          f"{', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        if d:
            raise FuselmError(f"{source}: rope_type 'default' takes no scaling keys, got {sorted(d)}")
        return None
    if rope_type not in ROPE_TYPES:
        raise FuselmError(f"{source}: key 'rope_type' is {rope_type!r}; expected one of {', '.join(ROPE_TYPES)} "
                          "(or 'default' for plain RoPE)")
    required, optional = _REQUIRED[rope_type], _OPTIONAL[rope_type]
    unknown = sorted(k for k in d if k not in required and k not in optional)
    if unknown:
        raise FuselmError(f"{source}: unknown key(s) {unknown} for rope_type '{rope_type}'; expected only "
                          f"{sorted(required + optional)}")
    out: dict[str, Any] = {"rope_type": rope_type}
    for key in required + optional:
        if d.get(key) is None:
            if key in required:
                raise FuselmError(f"{source}: rope_type '{rope_type}' needs key '{key}'")
            continue
        ok, expected, value = _check_value(key, d[key], rope_type)
        if not ok:
            raise FuselmError(f"{source}: key '{key}' is {d[key]!r}; expected {expected}")
        out[key] = value
    if rope_type == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise FuselmError(f"{source}: key 'high_freq_factor' is {out['high_freq_factor']}; expected a number > "
                          f"low_freq_factor ({out['low_freq_factor']})")
    if rope_type == "yarn" and out.get("beta_fast", 32.0) < out.get("beta_slow", 1.0):
        raise FuselmError(f"{source}: key 'beta_fast' is {out.get('beta_fast', 32.0)}; expected a number >= "
                          f"beta_slow ({out.get('beta_slow', 1.0)})")
    return out


@dataclass(frozen=True)
class RopeSpec:
    """Everything the frequencies depend on. `scaling` is normalized on construction."""

    head_dim: int  # the rotary dimension d (= head_dim unless only part of each head is rotated)
    base: float  # rope_theta
    max_position_embeddings: int
    scaling: dict | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.head_dim, int) and self.head_dim >= 2 and self.head_dim % 2 == 0):
            raise FuselmError(f"RopeSpec: head_dim (rotary dimension) is {self.head_dim!r}; expected an even "
                              "integer >= 2")
        if not (_number(self.base) and self.base > 1):
            raise FuselmError(f"RopeSpec: base (rope_theta) is {self.base!r}; expected a number > 1")
        if not (isinstance(self.max_position_embeddings, int) and self.max_position_embeddings > 0):
            raise FuselmError(f"RopeSpec: max_position_embeddings is {self.max_position_embeddings!r}; expected "
                              "a positive integer")
        object.__setattr__(self, "scaling", normalize_rope_scaling(self.scaling, source="RopeSpec.scaling"))


def _inv_freq(base: float, d: int) -> torch.Tensor:
    # Same float32 ops as HF's default RoPE: base ** (2i/d) in float32, then 1 / that.
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


def _ntk_exponent(d: int, rope_type: str) -> float:
    if d <= 2:
        raise FuselmError(f"rope_type '{rope_type}' needs a rotary dimension > 2 (it uses d/(d-2)), got {d}")
    return d / (d - 2)


def _mscale(s: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: sqrt(1/t) = 0.1 * mscale * ln s + 1, and 1 when not extending."""
    return 1.0 if s <= 1 else 0.1 * mscale * math.log(s) + 1.0


def _linear(spec: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
    return _inv_freq(spec.base, spec.head_dim) / spec.scaling["factor"], 1.0


def _ntk(spec: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
    d, s = spec.head_dim, spec.scaling["factor"]
    return _inv_freq(spec.base * s ** _ntk_exponent(d, "ntk"), d), 1.0


def _ntk_margin(spec: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
    d, s = spec.head_dim, spec.scaling["factor"]
    return _inv_freq(spec.base * (s + 1) ** _ntk_exponent(d, spec.scaling["rope_type"]), d), 1.0


def _ntk_yarn(spec: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
    inv_freq, _ = _ntk_margin(spec, seq_len)
    return inv_freq, 1.0 + 0.1 * math.log(spec.scaling["factor"])


def _dynamic(spec: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
    # HF uses max_position_embeddings as L (it ignores original_max_position_embeddings for dynamic);
    # we honour an explicit original_max_position_embeddings, which is the length the model was trained at.
    d, s = spec.head_dim, spec.scaling["factor"]
    L = spec.scaling.get("original_max_position_embeddings", spec.max_position_embeddings)
    n = L if seq_len is None else max(int(seq_len), L)
    base = spec.base * ((s * n / L) - (s - 1)) ** _ntk_exponent(d, "dynamic")
    return _inv_freq(base, d), 1.0


def _yarn(spec: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
    sc, d, base = spec.scaling, spec.head_dim, spec.base
    s, L = sc["factor"], sc["original_max_position_embeddings"]
    if sc.get("attention_factor") is not None:
        attention = sc["attention_factor"]
    elif sc.get("mscale") and sc.get("mscale_all_dim"):  # DeepSeek form; one without the other is ignored (HF)
        attention = float(_mscale(s, sc["mscale"]) / _mscale(s, sc["mscale_all_dim"]))
    else:
        attention = _mscale(s)

    def correction_dim(rotations: float) -> float:
        # The pair index whose wavelength fits `rotations` times into the original context.
        return (d * math.log(L / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(sc.get("beta_fast", 32.0)), correction_dim(sc.get("beta_slow", 1.0))
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)  # d - 1 although the ramp has d/2 entries: HF and YaRN agree
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: the original frequency (high frequencies), 0: interpolated by s
    pos_freqs = base ** (torch.arange(0, d, 2).float() / d)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (s * pos_freqs)
    return interpolated * (1 - keep) + extrapolated * keep, attention


def _llama3_bands(spec: RopeSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """inv_freq, wavelengths, the long-wavelength mask and the middle-band mask of Llama-3.1 scaling."""
    sc = spec.scaling
    inv_freq = _inv_freq(spec.base, spec.head_dim)
    L = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    long = wavelen > L / sc["low_freq_factor"]
    middle = ~(wavelen < L / sc["high_freq_factor"]) & ~long
    return inv_freq, wavelen, long, middle


def _llama3(spec: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
    sc = spec.scaling
    s, L, lo, hi = sc["factor"], sc["original_max_position_embeddings"], sc["low_freq_factor"], sc["high_freq_factor"]
    inv_freq, wavelen, long, middle = _llama3_bands(spec)
    scaled = torch.where(long, inv_freq / s, inv_freq)  # long wavelengths interpolate, short ones stay
    smooth = (L / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / s + smooth * scaled
    return torch.where(middle, blended, scaled), 1.0


_METHODS: dict[str, Callable[[RopeSpec, int | None], tuple[torch.Tensor, float]]] = {
    "linear": _linear,
    "ntk": _ntk,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "llama3": _llama3,
    "ntk-margin": _ntk_margin,
    "ntk-yarn": _ntk_yarn,
}


def rope_frequencies(spec: RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """float32 inverse frequencies [head_dim // 2] (CPU) and the attention factor m that multiplies cos and sin.

    `seq_len` (the total length attended over) matters only for dynamic NTK: it rescales once the length passes
    the original context, and gives plain RoPE below it. The other methods ignore it.
    """
    if spec.scaling is None:
        return _inv_freq(spec.base, spec.head_dim), 1.0
    return _METHODS[spec.scaling["rope_type"]](spec, seq_len)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [..., T, 2 * len(inv_freq)] for positions [T] or [B, T], in HF's rotate-half layout.

    Computed in float32 and scaled by attention_factor before the cast, exactly as HF's rotary modules do.
    """
    freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by cos/sin [T, R] or [B, T, R] (rotate-half layout; R <= D, the rest passes through).

    HF's `x * cos + rotate_half(x) * sin`, bit for bit. Measured here it is as fast as or faster than the
    half-split form (x1*c - x2*s, x2*c + x1*s): fewer kernels at decode, and no slower at prefill.
    """
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, R] broadcasts over heads
    r, d = cos.shape[-1], x.shape[-1]
    if r > d or r % 2:
        raise FuselmError(f"apply_rope: cos/sin have {r} rotary dims for a head of {d}; expected an even "
                          "number <= head_dim")
    h = r // 2
    rot = x if r == d else x[..., :r]
    out = rot * cos + torch.cat((-rot[..., h:], rot[..., :h]), dim=-1) * sin
    return out if r == d else torch.cat((out, x[..., r:]), dim=-1)


def rope_freq_factors(spec: RopeSpec) -> torch.Tensor | None:
    """llama.cpp's `rope_freqs.weight` for llama3 scaling (per-pair divisors of inv_freq), else None.

    llama.cpp has no llama3 scaling type: its converter writes these divisors as a tensor instead.
    """
    if spec.scaling is None or spec.scaling["rope_type"] != "llama3":
        return None
    sc = spec.scaling
    s, L, lo, hi = sc["factor"], sc["original_max_position_embeddings"], sc["low_freq_factor"], sc["high_freq_factor"]
    inv_freq, _, long, middle = _llama3_bands(spec)
    wavelen = 2 * math.pi / inv_freq.double()
    smooth = (L / wavelen - lo) / (hi - lo)
    divisor = torch.where(long, torch.full_like(wavelen, s), torch.ones_like(wavelen))
    divisor = torch.where(middle, 1 / ((1 - smooth) / s + smooth), divisor)
    return divisor.float()


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
    return float(spec.base * s ** _ntk_exponent(spec.head_dim, sc["rope_type"]))


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
        _, attention = _yarn(spec, None)
        if attention != _mscale(s):
            # llama.cpp applies 0.1 ln s + 1 itself and multiplies by attn_factor.
            out[f"{p}.attn_factor"] = attention / _mscale(s)
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
        out[f"{p}.attn_factor"] = _ntk_yarn(spec, None)[1]
    return out


def _gguf_value(metadata: Mapping[str, Any], key: str) -> Any:
    v = metadata.get(key)
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8")
    if isinstance(v, np.generic):  # numpy scalars from a reader
        return v.item()
    return v


def rope_base_from_gguf(metadata: Mapping[str, Any], arch: str) -> float:
    """The unscaled base (rope_theta) to put in RopeSpec: fuselm's original base for the ntk family, else
    `{arch}.rope.freq_base`, else llama.cpp's default 10000."""
    for key in (FUSELM_BASE, f"{arch}.rope.freq_base"):
        v = _gguf_value(metadata, key)
        if v is not None:
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
        if not (_number(factor) and factor >= 1):
            raise FuselmError(f"{source}: key '{p}.factor' is {factor!r}; expected a number >= 1 for yarn")
        d["attention_factor"] = get(f"{p}.attn_factor") * _mscale(factor)
    if get(FUSELM_YARN_TRUNCATE) is not None:
        d["truncate"] = get(FUSELM_YARN_TRUNCATE)
    return normalize_rope_scaling(d, source=source)
