"""The vocabulary llama.cpp's per-tensor type choice is written in: where a tensor sits, predicates over that,
rules, categories, which tensors may be quantized, and the ncols fallback. The table itself is in mixes.py.

Followed: llama.cpp as vendored in llama-cpp-python 0.3.36, `src/llama-quant.cpp` (`tensor_get_category`,
`tensor_allows_quantization`, `tensor_type_fallback`, `tensor_requires_imatrix`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import FuselmError

FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})


def block_size(type_: str) -> int:
    """Elements per block of a GGML type name ("Q4_K" -> 256)."""
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[type_]][0]
    except KeyError:
        raise FuselmError(f"unknown GGML type {type_!r}") from None


# ---------------------------------------------------------------- where a tensor sits, and predicates over it


@dataclass(frozen=True)
class Site:
    """What a rule may look at. `i`/`n`: the tensor's layer index among its kind and their count (llama.cpp's
    layer_info: the running counter, or the "blk.N." number for MoE ffn tensors); `counter`: the raw running
    counter; `n_mats`: ne[2] (experts in a 3-D tensor); plus model facts and whether an imatrix is given."""

    i: int
    n: int
    counter: int
    ncols: int
    n_mats: int
    arch: str
    n_gqa: int
    n_expert: int
    is_70b: bool
    has_imatrix: bool


class When:
    """A named predicate over a Site; combine with &, | and ~."""

    def __init__(self, test: Callable[[Site], bool], name: str) -> None:
        self.test, self.name = test, name

    def __call__(self, site: Site) -> bool:
        return self.test(site)

    def __and__(self, other: When) -> When:
        return When(lambda s: self(s) and other(s), f"({self.name} & {other.name})")

    def __or__(self, other: When) -> When:
        return When(lambda s: self(s) or other(s), f"({self.name} | {other.name})")

    def __invert__(self) -> When:
        return When(lambda s: not self(s), f"~{self.name}")

    def __repr__(self) -> str:
        return self.name


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: the first and last eighth, and every third between."""
    # C integer division; (i - n/8) is never negative here because the first test short-circuits.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def first(k: int) -> When:
    """The first k tensors of this kind."""
    return When(lambda s: s.i < k, f"i<{k}")


def first_part(d: int) -> When:
    """The first n/d layers (C integer division)."""
    return When(lambda s: s.i < s.n // d, f"i<n/{d}")


def first_counted_part(d: int) -> When:
    """The first n/d by the raw running counter (llama.cpp's IQ1/IQ2 ffn_down rule ignores MoE layer numbers)."""
    return When(lambda s: s.counter < s.n // d, f"counter<n/{d}")


def cols_not_multiple_of(k: int) -> When:
    return When(lambda s: s.ncols % k != 0, f"ncols%{k}")


ALWAYS = When(lambda s: True, "always")
FALCON = When(lambda s: s.arch == "falcon", "falcon")
MORE_BITS = When(lambda s: use_more_bits(s.i, s.n), "use_more_bits")
MIDDLE = When(lambda s: s.n // 8 <= s.i < 7 * s.n // 8, "n/8<=i<7n/8")
GQA_4 = When(lambda s: s.n_gqa >= 4, "n_gqa>=4")
EXPERTS_4 = When(lambda s: s.n_expert >= 4, "n_expert>=4")
EXPERTS_8 = When(lambda s: s.n_expert == 8, "n_expert==8")
EXPERT_TENSOR = When(lambda s: s.n_mats > 1, "ne2>1")
TYPE_70B = When(lambda s: s.is_70b, "70B")
IMATRIX = When(lambda s: s.has_imatrix, "imatrix")


# ---------------------------------------------------------------- rules


@dataclass(frozen=True)
class Bump:
    """After the choice: move to `to` when `when` holds (and the type so far is in `only_from`, if given)."""

    when: When
    to: str
    only_from: frozenset[str] | None = None


@dataclass(frozen=True)
class Rule:
    """First matching (predicate, type) wins; None keeps the file type's default. Then every bump in order."""

    choices: tuple[tuple[When, str | None], ...] = ()
    bumps: tuple[Bump, ...] = ()

    def apply(self, default: str, site: Site) -> str:
        chosen = default
        for when, type_ in self.choices:
            if when(site):
                chosen = default if type_ is None else type_
                break
        for bump in self.bumps:
            if bump.when(site) and (bump.only_from is None or chosen in bump.only_from):
                chosen = bump.to
        return chosen


NO_RULE = Rule()

# Categories, as llama.cpp's tensor_get_category names them (substring tests, in this order). attn_qkv and
# attn_kv_b are their own categories there, but every branch that reads them tests "attn_v-like" first.
CATEGORIES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("output", lambda n: n == "output.weight"),
    ("token_embd", lambda n: n in ("token_embd.weight", "per_layer_token_embd.weight")),
    ("attn_v", lambda n: any(s in n for s in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight"))),
    ("attn_k", lambda n: "attn_k.weight" in n),
    ("attn_q", lambda n: "attn_q.weight" in n),
    ("attn_output", lambda n: "attn_output.weight" in n),
    ("ffn_up", lambda n: "ffn_up" in n),
    ("ffn_gate", lambda n: "ffn_gate" in n),
    ("ffn_down", lambda n: "ffn_down" in n),
)


def category(name: str) -> str:
    """llama.cpp's quantization category of a GGUF tensor name ("attn_v" covers attn_v, attn_qkv, attn_kv_b)."""
    for cat, test in CATEGORIES:
        if test(name):
            return cat
    return "other"


# ---------------------------------------------------------------- which tensors, and the ncols fallback

# tensor_type_fallback: 256-block targets whose block does not divide the row. Types with a block <= 32 map to
# themselves (then F16); any other type has no fallback (llama.cpp throws).
FALLBACK: dict[str, str] = {
    **dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
    **dict.fromkeys(("Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"),
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}

# tensor_requires_imatrix: these targets are garbage without importance weights (token_embd/output excepted).
IMATRIX_REQUIRED = frozenset({"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"})

# tensor_allows_quantization: names that are never quantized (substrings, then exact names).
_KEEP_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    *(
        f"time_mix_{s}.weight"
        for s in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2", "decay_w1", "decay_w2")
    ),
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
_KEEP_EXACT = frozenset({"position_embd.weight", "token_types.weight"})


@dataclass(frozen=True)
class TypeChoice:
    """One tensor's plan: `type` is written; `intended` is what the mix (or --pure, or an override) asked for
    before the ncols fallback; `reason` is llama.cpp's warning line when they differ, else None;
    `requires_imatrix` is llama.cpp's tensor_requires_imatrix for the written type."""

    name: str
    type: str
    intended: str
    reason: str | None = None
    requires_imatrix: bool = False


def ggml_type_name(type_: str) -> str:
    """ggml's own spelling, as its logs print it: "Q4_K" -> "q4_K", "IQ4_NL" -> "iq4_nl"."""
    return type_[:-2].lower() + "_K" if type_.endswith("_K") else type_.lower()


def fallback(name: str, ncols: int, target: str) -> tuple[str, str | None]:
    """llama.cpp's tensor_type_fallback: (type to write, warning line or None when `target` fits the row)."""
    block = block_size(target)
    if ncols % block == 0:
        return target, None
    if target in FALLBACK:
        to = FALLBACK[target]
    elif block <= 32:
        to = target
    else:
        raise FuselmError(f"tensor {name}: no fallback type is defined for {target} (ncols {ncols} % {block} != 0)")
    head = (
        f"warning: {name:<36} - ncols {ncols:6d} not divisible by {block:3d} "
        f"(required for type {ggml_type_name(target):>7}) "
    )
    if ncols % block_size(to) != 0:
        to = "F16"
        head += "(WARNING: must use F16 due to unusual shape) "
    return to, head + f"-> falling back to {ggml_type_name(to):>7}"


_BLK = re.compile(r"blk\.(\d+)\.")


def layer_of(name: str) -> int:
    """The "blk.N." number of a tensor name, -1 for tensors outside the layers."""
    m = _BLK.match(name)
    return int(m.group(1)) if m else -1


def llama_order(names: Iterable[str]) -> list[str]:
    """llama.cpp's tensor order (its loader's weight_name_comparer): by layer number, then by name."""
    return sorted(names, key=lambda n: (layer_of(n), n))


def fallback_report(choices: Iterable[TypeChoice]) -> str:
    """Each fallback's warning line in llama.cpp's tensor order, then its total line ("" when none fell back)."""
    choices = sorted(choices, key=lambda c: (layer_of(c.name), c.name))
    lines = [c.reason for c in choices if c.reason is not None]
    if not lines:
        return ""
    return "\n".join([*lines, f"WARNING: {len(lines)} of {len(choices)} tensor(s) required fallback quantization"])


def ggml_n_dims(shape: Sequence[int]) -> int:
    # ggml_n_dims ignores trailing ne of 1, i.e. leading dims of 1 in torch order.
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return len(dims)


def allows_quantization(name: str, shape: Sequence[int], *, leave_output_tensor: bool = False) -> bool:
    """llama.cpp's tensor_allows_quantization for our archs."""
    if ggml_n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if leave_output_tensor and name == "output.weight":
        return False
    return name not in _KEEP_EXACT and not any(s in name for s in _KEEP_SUBSTRINGS)
