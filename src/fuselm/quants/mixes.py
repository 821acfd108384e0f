"""llama.cpp's per-tensor type choice for a file type (its "mix"), and llama-quantize's overrides, as data.

The behaviour followed is llama.cpp as vendored in llama-cpp-python 0.3.36 (commit 0c1e570),
`src/llama-quant.cpp`: `llama_tensor_get_type`, `llama_tensor_get_type_impl`, `llama_ftype_get_default_type`,
for the archs llama, falcon and chameleon (chameleon has no branch of its own there: it gets the llama mix).
The vocabulary (sites, predicates, rules, categories, fallback) is in mix_rules.py.

How a tensor's type is chosen, in llama.cpp's order:
1. Only 2-D/3-D tensors whose name ends in "weight" and is not a norm (plus a few named exclusions) are
   quantized; everything else keeps its source type. `leave_output_tensor` keeps output.weight too.
2. `token_embedding_type` / `output_tensor_type` (llama-quantize's --token-embedding-type, --output-tensor-type)
   are written as given: no mix, no fallback.
3. F32/F16/BF16 file types write every other quantizable tensor in that type: no mix, no fallback.
4. Otherwise the first `tensor_types` pattern (--tensor-type REGEX=TYPE, searched in the name) that matches
   sets the type; else the mix picks one from the file type's default and the tensor's category (first matching
   choice wins, then the category's bumps), unless `pure`, which keeps the default. Some choices depend on
   whether an importance matrix is given (`has_imatrix`).
5. Then the ncols fallback: when the row length ne[0] is not a multiple of the type's block size, the type
   falls back (table `FALLBACK`), and to F16 when even that block does not fit.

Fallback choice: Q2_K and Q3_K fall back to **Q4_0**. That is llama.cpp's current `tensor_type_fallback`, the
one llama-cpp-python 0.3.36 ships and our tests compare against. Older llama.cpp (PR #5590, 2024-02, until the
2026 refactor) used IQ4_NL for them. Q4_K -> Q5_0, Q5_K -> Q5_1 and Q6_K -> Q8_0 are unchanged across versions.
A 32-block target (Q4_0, Q8_0, ...) on a row that is not a multiple of 32 goes straight to F16.

Layer counters follow llama.cpp's tensor order (by the "blk.N." number, then by name), whatever order the
caller lists the tensors in: attn_v-like tensors (attn_v, attn_qkv, attn_kv_b) share one running index over
their count in the file; ffn_down, ffn_gate and ffn_up use running indices over n_layers (the "blk.N." number
for MoE models). A tensor whose type comes from an override or --pure does not advance its counter.

Shapes are torch/numpy order, (..., rows, cols): the row length is shape[-1] (ggml's ne[0]).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import FuselmError
from .mix_rules import (
    ALWAYS,
    EXPERT_TENSOR,
    EXPERTS_4,
    EXPERTS_8,
    FALCON,
    FALLBACK,
    FLOAT_TYPES,
    GQA_4,
    IMATRIX,
    IMATRIX_REQUIRED,
    MIDDLE,
    MORE_BITS,
    NO_RULE,
    TYPE_70B,
    Bump,
    Rule,
    Site,
    TypeChoice,
    allows_quantization,
    block_size,
    category,
    cols_not_multiple_of,
    fallback,
    fallback_report,
    first,
    first_counted_part,
    first_part,
    ggml_type_name,
    layer_of,
    llama_order,
    use_more_bits,
)

__all__ = [
    "ARCHS", "FALLBACK", "FTYPES", "Mix", "TypeChoice", "allows_quantization", "block_size", "category", "fallback",
    "fallback_report", "ggml_type_name", "llama_order", "mix_for", "plan_types", "use_more_bits",
]

ARCHS = ("llama", "falcon", "chameleon")


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


# The file types whose output (and tied token_embd) get Q5_K, and that share the very-low-bit branch.
_IQ_LOW_OUTPUT = frozenset({"IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})
_IQ_LOW_BRANCH = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})
# Non-Falcon 8-expert models give attn_output Q5_K for these file types.
_ATTN_OUT_Q5K_8X = frozenset({"Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M",
                              "IQ3_S", "IQ3_M", "IQ4_XS"})
_CATEGORIES_ALL = ("token_embd", "attn_v", "attn_k", "attn_q", "attn_output", "ffn_up", "ffn_gate", "ffn_down",
                   "other")


def _output_rule(ftype: str, default: str) -> Rule:
    # output.weight (and token_embd when tied to it): Q8_0 for Falcon or when the default's block does not fit
    # the row, Q5_K for the very-low-bit types, else Q6_K (a Q8_0 file keeps Q8_0).
    if ftype == "MXFP4_MOE":
        return Rule(choices=((ALWAYS, "Q8_0"),))
    last = "Q5_K" if ftype in _IQ_LOW_OUTPUT else None if default == "Q8_0" else "Q6_K"
    return Rule(choices=((FALCON, "Q8_0"), (cols_not_multiple_of(block_size(default)), "Q8_0"), (ALWAYS, last)))


def _mix(ftype: str, file_type: int, default: str, *, attn_output: str | None = None,
         falcon_attn_output: str | None = None, **rules: tuple) -> Mix:
    """A mix of the generic branch: `rules` maps category -> choices; attn_v gets the 70B and 8-expert bumps,
    attn_k the 8-expert Q8_0, attn_output the 8-expert Q5_K (for some types) then `attn_output` (non-Falcon)."""
    table = {cat: Rule(choices=choices) for cat, choices in rules.items()}
    if default in FLOAT_TYPES:
        return Mix(ftype, file_type, default, table)
    table["output"] = _output_rule(ftype, default)
    table["attn_v"] = Rule(choices=table.get("attn_v", NO_RULE).choices, bumps=(
        Bump(TYPE_70B, "Q5_K", frozenset({"Q3_K", "Q4_K"})), Bump(EXPERTS_8, "Q8_0")))
    table["attn_k"] = Rule(choices=((EXPERTS_8, "Q8_0"), *table.get("attn_k", NO_RULE).choices))
    table["attn_output"] = Rule(choices=(
        (FALCON, falcon_attn_output), (EXPERTS_8, "Q5_K" if ftype in _ATTN_OUT_Q5K_8X else None),
        (ALWAYS, attn_output)))
    return Mix(ftype, file_type, default, table)


def _iq_low_mix(ftype: str, file_type: int, default: str) -> Mix:
    """IQ1_S/IQ1_M/IQ2_XXS/IQ2_XS/IQ2_S/IQ2_M: their own branch (no 70B or 8-expert attn_v bumps)."""
    wide = ftype in ("IQ2_S", "IQ2_M")
    low = "IQ3_S" if wide else "Q2_K"
    table = {
        "output": _output_rule(ftype, default),
        "token_embd": Rule(choices=((ALWAYS, low),)),
        "attn_v": Rule(choices=((GQA_4 | EXPERTS_4, "Q4_K"), (ALWAYS, low))),
        "attn_k": Rule(choices=((EXPERTS_8, "Q4_K"),)),
        "ffn_down": Rule(choices=((first_counted_part(8), low),)),
        "attn_output": Rule(choices=(
            (EXPERTS_8, "Q5_K"),
            (ALWAYS, "IQ2_XXS" if ftype in ("IQ1_S", "IQ1_M") else "IQ3_S" if wide else None))),
    }
    return Mix(ftype, file_type, default, table)


def _mxfp4_moe_mix() -> Mix:
    """MXFP4_MOE: expert tensors (ne[2] > 1) MXFP4, every other quantized tensor Q8_0."""
    rule = Rule(choices=((EXPERT_TENSOR, "MXFP4"), (ALWAYS, "Q8_0")))
    table = dict.fromkeys(_CATEGORIES_ALL, rule)
    table["output"] = _output_rule("MXFP4_MOE", "MXFP4")
    return Mix("MXFP4_MOE", 38, "MXFP4", table)


_QUANT_WITH_IMATRIX_FIRST_EIGHTH = first_part(8) & IMATRIX  # Q4_0/Q5_0 ffn_down guard
_NO_IMATRIX_FIRST_EIGHTH = first_part(8) & ~IMATRIX

_MIXES = (
    _mix("F32", 0, "F32"),
    _mix("F16", 1, "F16"),
    _mix("BF16", 32, "BF16"),
    _mix("Q4_0", 2, "Q4_0", ffn_down=((_QUANT_WITH_IMATRIX_FIRST_EIGHTH, "Q4_1"),)),
    _mix("Q4_1", 3, "Q4_1"),
    _mix("Q5_0", 8, "Q5_0", ffn_down=((_QUANT_WITH_IMATRIX_FIRST_EIGHTH, "Q5_1"),)),
    _mix("Q5_1", 9, "Q5_1"),
    _mix("Q8_0", 7, "Q8_0"),
    _mix("Q2_K", 10, "Q2_K", attn_output="Q3_K",
         attn_v=((GQA_4, "Q4_K"), (ALWAYS, "Q3_K")), ffn_down=((ALWAYS, "Q3_K"),)),
    _mix("Q2_K_S", 21, "Q2_K", attn_v=((GQA_4, "Q4_K"),), ffn_down=((first_part(8), "Q4_K"),)),
    _mix("Q3_K_S", 11, "Q3_K"),
    _mix("Q3_K_M", 12, "Q3_K", attn_output="Q4_K",
         attn_v=((first(2), "Q5_K"), (ALWAYS, "Q4_K")),
         ffn_down=((first_part(16), "Q5_K"), (~FALCON | MORE_BITS, "Q4_K"))),
    _mix("Q3_K_L", 13, "Q3_K", attn_output="Q5_K", falcon_attn_output="Q4_K",
         attn_v=((ALWAYS, "Q5_K"),), ffn_down=((FALCON, "Q4_K"), (ALWAYS, "Q5_K"))),
    _mix("Q4_K_S", 14, "Q4_K", attn_v=((first(4), "Q5_K"),), ffn_down=((~FALCON & first_part(8), "Q5_K"),)),
    _mix("Q4_K_M", 15, "Q4_K", attn_v=((MORE_BITS, "Q6_K"),),
         ffn_down=((FALCON & first_part(16), "Q6_K"), (FALCON & MORE_BITS, "Q5_K"), (FALCON, None),
                   (MORE_BITS, "Q6_K"))),
    _mix("Q5_K_S", 16, "Q5_K"),
    _mix("Q5_K_M", 17, "Q5_K", attn_v=((MORE_BITS, "Q6_K"),), ffn_down=((MORE_BITS, "Q6_K"),)),
    _mix("Q6_K", 18, "Q6_K"),
    _iq_low_mix("IQ2_XXS", 19, "IQ2_XXS"),
    _iq_low_mix("IQ2_XS", 20, "IQ2_XS"),
    _iq_low_mix("IQ2_S", 28, "IQ2_XS"),
    _iq_low_mix("IQ2_M", 29, "IQ2_S"),
    _iq_low_mix("IQ1_S", 24, "IQ1_S"),
    _iq_low_mix("IQ1_M", 31, "IQ1_M"),
    _mix("IQ3_XXS", 23, "IQ3_XXS", attn_output="IQ3_S",
         token_embd=((ALWAYS, "IQ3_S"),),
         attn_v=((GQA_4, "Q4_K"), (~IMATRIX, "IQ3_S"), (ALWAYS, "IQ3_XXS")),
         attn_k=((ALWAYS, "IQ2_S"),), attn_q=((ALWAYS, "IQ2_S"),),
         ffn_down=((_NO_IMATRIX_FIRST_EIGHTH, "Q4_K"), (~IMATRIX, "Q3_K"))),
    _mix("IQ3_XS", 22, "IQ3_S",
         attn_v=((GQA_4, "Q4_K"),), attn_k=((ALWAYS, "IQ3_XXS"),), attn_q=((ALWAYS, "IQ3_XXS"),),
         ffn_gate=((MIDDLE, "IQ3_XXS"),), ffn_up=((MIDDLE, "IQ3_XXS"),)),
    _mix("IQ3_S", 26, "IQ3_S", attn_v=((GQA_4, "Q4_K"),)),
    _mix("IQ3_M", 27, "IQ3_S", attn_output="Q4_K",
         attn_v=((ALWAYS, "Q4_K"),), ffn_down=((first_part(8) | (EXPERTS_8 & MORE_BITS), "Q4_K"),)),
    _mix("IQ4_NL", 25, "IQ4_NL", attn_v=((GQA_4, "Q5_K"),), ffn_down=((_NO_IMATRIX_FIRST_EIGHTH, "Q5_K"),)),
    _mix("IQ4_XS", 30, "IQ4_XS", attn_v=((GQA_4, "Q5_K"),), ffn_down=((_NO_IMATRIX_FIRST_EIGHTH, "Q5_K"),)),
    _mix("TQ1_0", 36, "TQ1_0", token_embd=((ALWAYS, "Q4_K"),)),
    _mix("TQ2_0", 37, "TQ2_0", token_embd=((ALWAYS, "Q4_K"),)),
    _mxfp4_moe_mix(),
)

FTYPES: Mapping[str, Mix] = {m.ftype: m for m in _MIXES}
# llama-quantize's aliases
_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def mix_for(ftype: str) -> Mix:
    """The mix of a file type name, case-insensitive, with llama-quantize's aliases (Q4_K = Q4_K_M)."""
    key = str(ftype).upper()
    mix = FTYPES.get(_ALIASES.get(key, key))
    if mix is None:
        raise FuselmError(f"unknown file type {ftype!r}; expected one of {', '.join(FTYPES)}")
    return mix


# ---------------------------------------------------------------- planning


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


def _compile(tensor_types: Sequence[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
    out = []
    for pattern, type_ in tensor_types:
        try:
            out.append((re.compile(pattern), _type_or_none(type_)))
        except re.error as err:
            raise FuselmError(f"--tensor-type {pattern}={type_}: bad regular expression ({err})") from None
    return out


def _type_or_none(type_: str | None) -> str | None:
    """A GGML type name, upper-cased and checked ("q8_0" -> "Q8_0"), or None."""
    if type_ is None:
        return None
    block_size(type_.upper())
    return type_.upper()


def requires_imatrix(name: str, type_: str, ftype: str) -> bool:
    """llama.cpp's tensor_requires_imatrix: the very-low-bit types (and Q2_K in a Q2_K_S file) need one."""
    if category(name) in ("output", "token_embd"):
        return False
    return type_ in IMATRIX_REQUIRED or (type_ == "Q2_K" and mix_for(ftype).ftype == "Q2_K_S")


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
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    tensor_types: Sequence[tuple[str, str]] = (),
    has_imatrix: bool = False,
) -> list[TypeChoice]:
    """llama.cpp's type for every tensor of a model quantized to `ftype`, in the order given.

    `tensors` holds (gguf_name, shape) or (gguf_name, shape, source_type) with shape in torch order
    (row length last); the source type (default "F32") is what an unquantized tensor keeps. `tensor_types` are
    (regex, type) pairs in the order given on llama-quantize's command line.
    """
    mix = mix_for(ftype)
    if arch not in ARCHS:
        raise FuselmError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    if n_layers <= 0 or n_head <= 0 or n_head_kv < 0 or n_expert < 0:
        raise FuselmError(
            f"bad hyperparameters n_layers={n_layers} n_head={n_head} n_head_kv={n_head_kv} n_expert={n_expert}"
        )
    output_tensor_type, token_embedding_type = _type_or_none(output_tensor_type), _type_or_none(token_embedding_type)
    patterns = _compile(tensor_types)
    items = _normalize(tensors)
    cats = {name: category(name) for name, _, _ in items}
    tied = "output" not in cats.values()
    n_gqa = n_head // n_head_kv if n_head_kv else 0
    is_70b = arch == "llama" and n_expert != 8 and n_layers == 80 and n_head != n_head_kv

    counters = dict.fromkeys(("attn_v", "ffn_down", "ffn_gate", "ffn_up"), 0)
    counts = {"attn_v": sum(c == "attn_v" for c in cats.values()), "ffn_down": n_layers, "ffn_gate": n_layers,
              "ffn_up": n_layers}
    by_name = {name: (shape, src) for name, shape, src in items}
    planned: dict[str, TypeChoice] = {}
    # llama.cpp walks tensors by (layer, name); the running counters depend on that order.
    for name in llama_order(by_name):
        shape, src = by_name[name]
        cat = cats[name]
        if not allows_quantization(name, shape, leave_output_tensor=leave_output_tensor):
            planned[name] = TypeChoice(name, src, src)
            continue
        if token_embedding_type and cat == "token_embd":
            planned[name] = _choice(name, token_embedding_type, token_embedding_type, None, mix)
            continue
        if output_tensor_type and cat == "output":
            planned[name] = _choice(name, output_tensor_type, output_tensor_type, None, mix)
            continue
        if not mix.quantized:
            planned[name] = TypeChoice(name, mix.default, mix.default)
            continue
        intended = next((t for p, t in patterns if p.search(name)), None)
        if intended is None and pure:
            intended = mix.default
        if intended is None:
            rule_cat = "output" if cat == "output" or (tied and cat == "token_embd") else cat
            if rule_cat == "output" and output_tensor_type:  # the tied token_embd follows --output-tensor-type
                intended = output_tensor_type
            else:
                site = _site(name, shape, rule_cat, counters, counts, arch=arch, n_gqa=n_gqa, n_expert=n_expert,
                             is_70b=is_70b, has_imatrix=has_imatrix)
                intended = mix.rules.get(rule_cat, NO_RULE).apply(mix.default, site)
                if rule_cat in counters:
                    counters[rule_cat] += 1
        written, reason = fallback(name, shape[-1], intended)
        planned[name] = _choice(name, written, intended, reason, mix)
    return [planned[name] for name, _, _ in items]


def _choice(name: str, written: str, intended: str, reason: str | None, mix: Mix) -> TypeChoice:
    return TypeChoice(name, written, intended, reason, requires_imatrix(name, written, mix.ftype))


def _site(name: str, shape: tuple[int, ...], rule_cat: str, counters: dict[str, int], counts: dict[str, int], *,
          arch: str, n_gqa: int, n_expert: int, is_70b: bool, has_imatrix: bool) -> Site:
    counter = counters.get(rule_cat, 0)
    i, n = counter, counts.get(rule_cat, 0)
    if rule_cat.startswith("ffn_") and n_expert > 1:
        # MoE experts are not stored in layer order: llama.cpp reads the layer from the name.
        i = layer_of(name)
        if not 0 <= i < n:
            raise FuselmError(f"tensor {name}: cannot find its layer in [0, {n}) from the name")
    n_mats = shape[-3] if len(shape) >= 3 else 1
    return Site(i, n, counter, shape[-1], n_mats, arch, n_gqa, n_expert, is_70b, has_imatrix)
