"""RoPE settings (RopeSpec, HF-style scaling dicts) and the inverse frequencies each scaling method defines.

The rotation itself (cos/sin tables, apply_rope) is model math and lives in fuselm.model.rope; translating
scaling dicts to and from HF and GGUF keys lives with the architectures (fuselm.archs.rope_keys).

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


def finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_value(key: str, v: Any, rope_type: str) -> tuple[bool, str, Any]:
    """(ok, expected, canonical value) for one key of a scaling dict."""
    if key == "factor":
        # Linear may compress (s < 1); the NTK family and the band methods assume s >= 1.
        if rope_type == "linear":
            return finite_number(v) and v > 0, "a number > 0", float(v) if finite_number(v) else v
        ok = finite_number(v) and v >= 1
        return ok, f"a number >= 1 for rope_type '{rope_type}'", float(v) if finite_number(v) else v
    if key == "original_max_position_embeddings":
        ok = finite_number(v) and v > 0 and float(v).is_integer()
        return ok, "a positive integer", int(v) if ok else v
    if key in ("truncate", "finetuned"):
        return isinstance(v, bool), "true or false", v
    if key in ("mscale", "mscale_all_dim"):
        return finite_number(v) and v >= 0, "a number >= 0", float(v) if finite_number(v) else v
    # low_freq_factor, high_freq_factor, attention_factor, beta_fast, beta_slow
    return finite_number(v) and v > 0, "a number > 0", float(v) if finite_number(v) else v


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
        if not (finite_number(self.base) and self.base > 1):
            raise FuselmError(f"RopeSpec: base (rope_theta) is {self.base!r}; expected a number > 1")
        if not (isinstance(self.max_position_embeddings, int) and self.max_position_embeddings > 0):
            raise FuselmError(f"RopeSpec: max_position_embeddings is {self.max_position_embeddings!r}; expected "
                              "a positive integer")
        object.__setattr__(self, "scaling", normalize_rope_scaling(self.scaling, source="RopeSpec.scaling"))


def _inv_freq(base: float, d: int) -> torch.Tensor:
    # Same float32 ops as HF's default RoPE: base ** (2i/d) in float32, then 1 / that.
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


def ntk_exponent(d: int, rope_type: str) -> float:
    if d <= 2:
        raise FuselmError(f"rope_type '{rope_type}' needs a rotary dimension > 2 (it uses d/(d-2)), got {d}")
    return d / (d - 2)


def yarn_mscale(s: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: sqrt(1/t) = 0.1 * mscale * ln s + 1, and 1 when not extending."""
    return 1.0 if s <= 1 else 0.1 * mscale * math.log(s) + 1.0


def _linear(spec: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
    return _inv_freq(spec.base, spec.head_dim) / spec.scaling["factor"], 1.0


def _ntk(spec: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
    d, s = spec.head_dim, spec.scaling["factor"]
    return _inv_freq(spec.base * s ** ntk_exponent(d, "ntk"), d), 1.0


def _ntk_margin(spec: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
    d, s = spec.head_dim, spec.scaling["factor"]
    return _inv_freq(spec.base * (s + 1) ** ntk_exponent(d, spec.scaling["rope_type"]), d), 1.0


def _ntk_yarn(spec: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
    inv_freq, _ = _ntk_margin(spec, seq_len)
    return inv_freq, 1.0 + 0.1 * math.log(spec.scaling["factor"])


def _dynamic(spec: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
    # HF uses max_position_embeddings as L (it ignores original_max_position_embeddings for dynamic);
    # we honour an explicit original_max_position_embeddings, which is the length the model was trained at.
    d, s = spec.head_dim, spec.scaling["factor"]
    L = spec.scaling.get("original_max_position_embeddings", spec.max_position_embeddings)
    n = L if seq_len is None else max(int(seq_len), L)
    base = spec.base * ((s * n / L) - (s - 1)) ** ntk_exponent(d, "dynamic")
    return _inv_freq(base, d), 1.0


def _yarn(spec: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
    sc, d, base = spec.scaling, spec.head_dim, spec.base
    s, L = sc["factor"], sc["original_max_position_embeddings"]
    if sc.get("attention_factor") is not None:
        attention = sc["attention_factor"]
    elif sc.get("mscale") and sc.get("mscale_all_dim"):  # DeepSeek form; one without the other is ignored (HF)
        attention = float(yarn_mscale(s, sc["mscale"]) / yarn_mscale(s, sc["mscale_all_dim"]))
    else:
        attention = yarn_mscale(s)

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
