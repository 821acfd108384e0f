"""llama.cpp's per-tensor type choice for a file type (its "mix"), and the ncols fallback, as data.

The behaviour followed is llama.cpp as vendored in llama-cpp-python 0.3.36 (commit 0c1e570),
`src/llama-quant.cpp`: `tensor_allows_quantization`, `llama_tensor_get_type`, `llama_tensor_get_type_impl`
and `tensor_type_fallback`, for the archs llama, falcon and chameleon (chameleon has no branch of its own there:
it gets exactly the llama mix). Importance matrices and `--tensor-type` overrides are not modelled.

How a tensor's type is chosen, in llama.cpp's order:
1. Only 2-D/3-D tensors whose name ends in "weight" and is not a norm (plus a few named exclusions) are
   quantized; everything else keeps its source type. `leave_output_tensor` keeps output.weight too.
2. F32/F16/BF16 file types write every quantizable tensor in that type: no mix, no fallback.
3. Otherwise the mix picks a type from the file type's default and the tensor's category (first matching
   choice wins, then the category's bumps), unless `pure`, which keeps the default.
4. Then, always (also under `pure`), the ncols fallback: when the row length ne[0] is not a multiple of the
   type's block size, the type falls back (table `FALLBACK`), and to F16 when even that block does not fit.

Fallback choice: Q2_K and Q3_K fall back to **Q4_0**. That is llama.cpp's current `tensor_type_fallback`, the
one llama-cpp-python 0.3.36 ships and our tests compare against. Older llama.cpp (PR #5590, 2024-02, until the
2026 refactor) used IQ4_NL for them. Q4_K -> Q5_0, Q5_K -> Q5_1 and Q6_K -> Q8_0 are unchanged across versions.
A 32-block target (Q4_0, Q8_0, ...) on a row that is not a multiple of 32 goes straight to F16.

Layer counters follow llama.cpp's tensor order (by the "blk.N." number, then by name), whatever order the
caller lists the tensors in: attn_v-like tensors (attn_v, attn_qkv, attn_kv_b) share one running index over
their count in the file; ffn_down uses a running index over n_layers (the "blk.N." number for MoE models).

Shapes are torch/numpy order, (..., rows, cols): the row length is shape[-1] (ggml's ne[0]).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import FuselmError

ARCHS = ("llama", "falcon", "chameleon")
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
    """What a rule may look at: the tensor's counter `i` among its kind and their count `n`, plus model facts."""

    i: int
    n: int
    ncols: int
    arch: str
    n_gqa: int
    n_expert: int
    is_70b: bool


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
    """The first n/d tensors of this kind (C integer division)."""
    return When(lambda s: s.i < s.n // d, f"i<n/{d}")


def cols_not_multiple_of(k: int) -> When:
    return When(lambda s: s.ncols % k != 0, f"ncols%{k}")


ALWAYS = When(lambda s: True, "always")
FALCON = When(lambda s: s.arch == "falcon", "falcon")
MORE_BITS = When(lambda s: use_more_bits(s.i, s.n), "use_more_bits")
GQA_4 = When(lambda s: s.n_gqa >= 4, "n_gqa>=4")
EXPERTS_8 = When(lambda s: s.n_expert == 8, "n_expert==8")
TYPE_70B = When(lambda s: s.is_70b, "70B")


# ---------------------------------------------------------------- rules and mixes


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

# Categories, as llama.cpp's tensor_get_category names them (substring tests, in this order).
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


@dataclass(frozen=True)
class Mix:
    """One file type: its llama_ftype id (general.file_type), default tensor type and per-category rules."""

    ftype: str
    file_type: int
    default: str
    rules: Mapping[str, Rule] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return self.default not in FLOAT_TYPES


def _output_rule(default: str) -> Rule:
    # output.weight (and token_embd when tied to it): Q8_0 for Falcon or when the default's block does not fit
    # the row, else Q6_K (a Q8_0 file keeps Q8_0).
    return Rule(
        choices=(
            (FALCON, "Q8_0"),
            (cols_not_multiple_of(block_size(default)), "Q8_0"),
            (ALWAYS, None if default == "Q8_0" else "Q6_K"),
        )
    )


# Shared by every file type here: the 70B attn_v bump and the 8-expert bumps.
_ATTN_V_BUMPS = (Bump(TYPE_70B, "Q5_K", frozenset({"Q3_K", "Q4_K"})), Bump(EXPERTS_8, "Q8_0"))
_ATTN_K = Rule(choices=((EXPERTS_8, "Q8_0"),))
# attn_output: Falcon keeps the default unless a file type says otherwise; 8-expert models get Q5_K for some types.
_ATTN_OUT_EXPERTS_Q5K = ((FALCON, None), (EXPERTS_8, "Q5_K"))
_ATTN_OUT_EXPERTS_KEEP = ((EXPERTS_8, None),)


def _mix(ftype: str, file_type: int, default: str, **rules: Rule | tuple) -> Mix:
    """Build a Mix: `rules` maps category -> Rule or the choices tuple; attn_v always gets the shared bumps."""
    table: dict[str, Rule] = {cat: r if isinstance(r, Rule) else Rule(choices=r) for cat, r in rules.items()}
    if default not in FLOAT_TYPES:
        table["output"] = _output_rule(default)
        table["attn_v"] = Rule(choices=table.get("attn_v", NO_RULE).choices, bumps=_ATTN_V_BUMPS)
        table.setdefault("attn_k", _ATTN_K)
    return Mix(ftype, file_type, default, table)


_MIXES = (
    _mix("F32", 0, "F32"),
    _mix("F16", 1, "F16"),
    _mix("BF16", 32, "BF16"),
    _mix("Q4_0", 2, "Q4_0"),
    _mix("Q4_1", 3, "Q4_1"),
    _mix("Q5_0", 8, "Q5_0"),
    _mix("Q5_1", 9, "Q5_1"),
    _mix("Q8_0", 7, "Q8_0"),
    _mix(
        "Q2_K", 10, "Q2_K",
        attn_v=((GQA_4, "Q4_K"), (ALWAYS, "Q3_K")),
        ffn_down=((ALWAYS, "Q3_K"),),
        attn_output=(*_ATTN_OUT_EXPERTS_Q5K, (ALWAYS, "Q3_K")),
    ),
    _mix("Q3_K_S", 11, "Q3_K", attn_output=_ATTN_OUT_EXPERTS_Q5K),
    _mix(
        "Q3_K_M", 12, "Q3_K",
        attn_v=((first(2), "Q5_K"), (ALWAYS, "Q4_K")),
        ffn_down=((first_part(16), "Q5_K"), (~FALCON | MORE_BITS, "Q4_K")),
        attn_output=(*_ATTN_OUT_EXPERTS_Q5K, (ALWAYS, "Q4_K")),
    ),
    _mix(
        "Q3_K_L", 13, "Q3_K",
        attn_v=((ALWAYS, "Q5_K"),),
        ffn_down=((FALCON, "Q4_K"), (ALWAYS, "Q5_K")),
        attn_output=((FALCON, "Q4_K"), *_ATTN_OUT_EXPERTS_KEEP, (ALWAYS, "Q5_K")),
    ),
    _mix(
        "Q4_K_S", 14, "Q4_K",
        attn_v=((first(4), "Q5_K"),),
        ffn_down=((~FALCON & first_part(8), "Q5_K"),),
        attn_output=_ATTN_OUT_EXPERTS_Q5K,
    ),
    _mix(
        "Q4_K_M", 15, "Q4_K",
        attn_v=((MORE_BITS, "Q6_K"),),
        ffn_down=(
            (FALCON & first_part(16), "Q6_K"),
            (FALCON & MORE_BITS, "Q5_K"),
            (FALCON, None),
            (MORE_BITS, "Q6_K"),
        ),
        attn_output=_ATTN_OUT_EXPERTS_Q5K,
    ),
    _mix("Q5_K_S", 16, "Q5_K"),
    _mix("Q5_K_M", 17, "Q5_K", attn_v=((MORE_BITS, "Q6_K"),), ffn_down=((MORE_BITS, "Q6_K"),)),
    _mix("Q6_K", 18, "Q6_K"),
)

FTYPES: Mapping[str, Mix] = {m.ftype: m for m in _MIXES}

# tensor_type_fallback: 256-block targets whose block does not divide the row. Types with a block <= 32 map to
# themselves (then F16); any other type has no fallback (llama.cpp throws).
FALLBACK: Mapping[str, str] = {
    **dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
    **dict.fromkeys(("Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"),
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}

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


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class TypeChoice:
    """One tensor's plan: `type` is written; `intended` is what the mix (or --pure) asked for before the ncols
    fallback; `reason` is llama.cpp's warning line when they differ, else None."""

    name: str
    type: str
    intended: str
    reason: str | None = None


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


def fallback_report(choices: Iterable[TypeChoice]) -> str:
    """Each fallback's warning line in llama.cpp's tensor order, then its total line ("" when none fell back)."""
    choices = sorted(choices, key=lambda c: (_layer(c.name), c.name))
    lines = [c.reason for c in choices if c.reason is not None]
    if not lines:
        return ""
    return "\n".join([*lines, f"WARNING: {len(lines)} of {len(choices)} tensor(s) required fallback quantization"])


# ---------------------------------------------------------------- planning


def _ggml_n_dims(shape: Sequence[int]) -> int:
    # ggml_n_dims ignores trailing ne of 1, i.e. leading dims of 1 in torch order.
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return len(dims)


def allows_quantization(name: str, shape: Sequence[int], *, leave_output_tensor: bool = False) -> bool:
    """llama.cpp's tensor_allows_quantization for our archs."""
    if _ggml_n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if leave_output_tensor and name == "output.weight":
        return False
    return name not in _KEEP_EXACT and not any(s in name for s in _KEEP_SUBSTRINGS)


_BLK = re.compile(r"blk\.(\d+)\.")


def _layer(name: str) -> int:
    m = _BLK.match(name)
    return int(m.group(1)) if m else -1


TensorSpec = tuple[str, Sequence[int]] | tuple[str, Sequence[int], str]


def _normalize(tensors: Iterable[TensorSpec]) -> list[tuple[str, tuple[int, ...], str]]:
    out, seen = [], set()
    for t in tensors:
        if len(t) not in (2, 3):
            raise FuselmError(f"expected (name, shape) or (name, shape, type) per tensor, got {t!r}")
        name, shape, src = (*t, "F32") if len(t) == 2 else t
        shape = tuple(int(d) for d in shape)
        if not shape or any(d <= 0 for d in shape):
            raise FuselmError(f"tensor {name}: shape {shape} must have at least one dimension, all positive")
        if name in seen:
            raise FuselmError(f"tensor {name} is listed twice")
        seen.add(name)
        out.append((name, shape, src))
    return out


def plan_types(
    tensors: Iterable[TensorSpec],
    ftype: str,
    *,
    arch: str,
    n_layers: int,
    n_head: int,
    n_head_kv: int,
    n_expert: int = 0,
    pure: bool = False,
    leave_output_tensor: bool = False,
) -> list[TypeChoice]:
    """llama.cpp's type for every tensor of a model quantized to `ftype`, in the order given.

    `tensors` holds (gguf_name, shape) or (gguf_name, shape, source_type) with shape in torch order
    (row length last); the source type (default "F32") is what an unquantized tensor keeps.
    """
    mix = FTYPES.get(ftype)
    if mix is None:
        raise FuselmError(f"unknown file type {ftype!r}; expected one of {', '.join(FTYPES)}")
    if arch not in ARCHS:
        raise FuselmError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    if n_layers <= 0 or n_head <= 0 or n_head_kv < 0 or n_expert < 0:
        raise FuselmError(
            f"bad hyperparameters n_layers={n_layers} n_head={n_head} n_head_kv={n_head_kv} n_expert={n_expert}"
        )
    items = _normalize(tensors)
    cats = {name: category(name) for name, _, _ in items}
    n_attn_v = sum(c == "attn_v" for c in cats.values())
    tied = "output" not in cats.values()
    n_gqa = n_head // n_head_kv if n_head_kv else 0
    is_70b = arch == "llama" and n_expert != 8 and n_layers == 80 and n_head != n_head_kv

    counters = {"attn_v": 0, "ffn_down": 0}
    counts = {"attn_v": n_attn_v, "ffn_down": n_layers}
    planned: dict[str, TypeChoice] = {}
    # llama.cpp walks tensors by (layer, name); the running counters depend on that order.
    for name, shape, src in sorted(items, key=lambda t: (_layer(t[0]), t[0])):
        if not allows_quantization(name, shape, leave_output_tensor=leave_output_tensor):
            planned[name] = TypeChoice(name, src, src)
            continue
        if not mix.quantized:
            planned[name] = TypeChoice(name, mix.default, mix.default)
            continue
        cat = cats[name]
        intended = mix.default
        if not pure:
            rule_cat = "output" if cat == "output" or (tied and cat == "token_embd") else cat
            i = counters.get(rule_cat, 0)
            if rule_cat == "ffn_down" and n_expert > 1:
                # MoE experts are not stored in layer order: llama.cpp reads the layer from the name.
                i = _layer(name)
                if not 0 <= i < n_layers:
                    raise FuselmError(f"tensor {name}: cannot find its layer in [0, {n_layers}) from the name")
            site = Site(i, counts.get(rule_cat, 0), shape[-1], arch, n_gqa, n_expert, is_70b)
            intended = mix.rules.get(rule_cat, NO_RULE).apply(mix.default, site)
            if rule_cat in counters:
                counters[rule_cat] += 1
        written, reason = fallback(name, shape[-1], intended)
        planned[name] = TypeChoice(name, written, intended, reason)
    return [planned[name] for name, _, _ in items]
