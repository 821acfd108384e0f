"""plan_types against llama.cpp's own choice.

Each case writes a tiny F32 GGUF with gguf-py (only the `{arch}.*` hparams and the tensors), quantizes it with
llama.cpp's `llama_model_quantize` (llama-cpp-python 0.3.36), reads back every tensor's type, and compares it
with `plan_types`; llama.cpp's fallback warnings, captured from its log, are compared with `fallback_report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import pytest
from llama_quantize_ref import dry_run_types, fallback_lines, llama_ftype, llama_quantize

from fuselm.errors import FuselmError
from fuselm.quants.mixes import FTYPES, fallback, fallback_report, mix_for, plan_types, use_more_bits


@dataclass(frozen=True)
class Tiny:
    """A tiny model: its hparams and the (gguf name, torch-order shape) of every tensor."""

    arch: str
    n_layers: int
    hidden: int
    n_head: int
    n_head_kv: int
    n_ff: int
    vocab: int = 300
    tied: bool = False
    n_expert: int = 0
    layer_tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        out = [("token_embd.weight", (self.vocab, self.hidden)), ("output_norm.weight", (self.hidden,))]
        if not self.tied:
            out.append(("output.weight", (self.vocab, self.hidden)))
        if self.arch == "falcon":
            out.append(("output_norm.bias", (self.hidden,)))
        for i in range(self.n_layers):
            out += [(f"blk.{i}.{name}", shape) for name, shape in self.layer_tensors.items()]
        return out


def llama_like(arch: str, n_layers: int, hidden: int, n_head: int, n_head_kv: int, n_ff: int, **kw) -> Tiny:
    hd = hidden // n_head
    layer = {
        "attn_norm.weight": (hidden,),
        "attn_q.weight": (hidden, hidden),
        "attn_k.weight": (n_head_kv * hd, hidden),
        "attn_v.weight": (n_head_kv * hd, hidden),
        "attn_output.weight": (hidden, hidden),
        "ffn_norm.weight": (hidden,),
        "ffn_gate.weight": (n_ff, hidden),
        "ffn_up.weight": (n_ff, hidden),
        "ffn_down.weight": (hidden, n_ff),
    }
    if arch == "chameleon":  # 2-D per-head qk-norm weights: llama.cpp keeps them F32
        layer |= {
            "attn_q_norm.weight": (n_head, hd),
            "attn_q_norm.bias": (n_head, hd),
            "attn_k_norm.weight": (n_head_kv, hd),
            "attn_k_norm.bias": (n_head_kv, hd),
        }
    return Tiny(arch, n_layers, hidden, n_head, n_head_kv, n_ff, layer_tensors=layer, **kw)


def falcon_like(n_layers: int, hidden: int, n_head: int, n_head_kv: int, *, norm_2: bool, **kw) -> Tiny:
    hd, n_ff = hidden // n_head, 4 * hidden
    layer = {
        "attn_norm.weight": (hidden,),
        "attn_norm.bias": (hidden,),
        "attn_qkv.weight": (hidden + 2 * n_head_kv * hd, hidden),
        "attn_output.weight": (hidden, hidden),
        "ffn_up.weight": (n_ff, hidden),
        "ffn_down.weight": (hidden, n_ff),
    }
    if norm_2:  # Falcon-40B: a second (attention) layer norm
        layer |= {"attn_norm_2.weight": (hidden,), "attn_norm_2.bias": (hidden,)}
    return Tiny("falcon", n_layers, hidden, n_head, n_head_kv, n_ff, layer_tensors=layer, **kw)


def hparams_only(arch: str, n_layers: int, n_head: int, n_head_kv: int, n_expert: int = 0) -> Tiny:
    """Big-model hparams with small tensors: llama.cpp's quantizer reads hparams and names, never checks shapes."""
    layer = {
        "attn_norm.weight": (256,),
        "attn_q.weight": (32, 256),
        "attn_k.weight": (32, 256),
        "attn_v.weight": (32, 256),
        "attn_output.weight": (32, 256),
    }
    if n_expert:
        layer |= {
            "ffn_gate_inp.weight": (n_expert, 256),
            "ffn_gate_exps.weight": (n_expert, 32, 256),
            "ffn_up_exps.weight": (n_expert, 32, 256),
            "ffn_down_exps.weight": (n_expert, 32, 256),
        }
    else:
        layer |= {"ffn_down.weight": (32, 256)}
    return Tiny(arch, n_layers, 256, n_head, n_head_kv, 256, n_expert=n_expert, layer_tensors=layer)


MODELS = {
    # GQA 4 (Q2_K attn_v -> Q4_K), 16 layers so n/16 and n/8 both pick layers
    "llama": llama_like("llama", 16, 256, 8, 2, 512),
    # no GQA, 2-D q/k norms, tied embeddings at width 320: token_embd follows the output rule, which gives Q8_0
    # when the default's block does not fit and Q6_K (then the Q6_K -> Q8_0 fallback) for 32-block file types
    "chameleon": llama_like("chameleon", 8, 320, 5, 5, 512, tied=True),
    # Falcon-7B-shaped: width 320 = 1.25*256 like 4544 = 17.75*256, multi-query, n_ff = 4*hidden (a multiple of 256)
    "falcon-7b": falcon_like(16, 320, 10, 1, norm_2=False, tied=True),
    # Falcon-40B-style: attn_norm_2, grouped kv heads, untied output
    "falcon-40b": falcon_like(12, 256, 8, 2, norm_2=True),
    # LLM_TYPE_70B (80 layers, GQA): attn_v Q3_K/Q4_K -> Q5_K
    "llama-70b": hparams_only("llama", 80, 64, 8),
    # 8 experts: attn_v/attn_k -> Q8_0, attn_output -> Q5_K, ffn_down layer from the name
    "llama-8x": hparams_only("llama", 8, 32, 8, n_expert=8),
}
# The 16 file types whose mixes were checked against written files first (plus F32); every other file type of
# llama-quantize is checked by dry runs below, with and without an importance matrix.
ALL_FTYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
              "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
CASES = [(m, f, "") for m in ("llama", "chameleon", "falcon-7b", "falcon-40b") for f in ALL_FTYPES]
# --pure skips the mix but not the fallback; --leave-output-tensor keeps output.weight F32
VARIANTS = (("Q4_K_M", "pure"), ("Q3_K_M", "pure"), ("Q4_K_M", "leave"))
CASES += [(m, f, v) for m in ("llama", "falcon-7b") for f, v in VARIANTS]
CASES += [(m, f, "") for m in ("llama-70b", "llama-8x") for f in ("Q2_K", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M")]
CASES += [("llama-8x", "Q8_0", ""), ("llama-8x", "Q4_K_M", "pure")]

# Dry runs: every file type, each with and without an imatrix (several choices depend on it), on every model.
DRY_FTYPES = [f for f in FTYPES if f not in ALL_FTYPES] + ["Q4_0", "Q5_0", "Q4_K_M"]
DRY_CASES = [(m, f, imat) for m in MODELS for f in DRY_FTYPES for imat in ("", "imatrix")]
# llama-quantize's overrides: (file type, options)
OVERRIDES = {
    "output-q8": ("Q4_K_M", {"output_tensor_type": "q8_0"}),
    "embd-q4k": ("Q4_K_M", {"token_embedding_type": "Q4_K"}),
    "embd-out-f16-file": ("F16", {"token_embedding_type": "Q8_0", "output_tensor_type": "Q6_K"}),
    "tensor-types": ("Q4_K_M", {"tensor_types": [("attn_v", "Q8_0"), (r"blk\.[0-3]\.ffn_down", "Q5_K"),
                                                 ("ffn", "Q3_K")]}),
    "tensor-types-pure": ("Q3_K_M", {"tensor_types": [("attn_q", "IQ4_NL")], "pure": True}),
    "output-iq-mix": ("IQ2_M", {"output_tensor_type": "Q4_K", "tensor_types": [("attn_k", "Q8_0")]}),
}
OVERRIDE_CASES = [(m, o) for m in ("llama", "chameleon", "falcon-7b") for o in OVERRIDES]


def _write_gguf(model: Tiny, path: Path) -> None:
    w = gguf.GGUFWriter(str(path), model.arch)
    a = model.arch
    w.add_uint32(f"{a}.context_length", 256)
    w.add_uint32(f"{a}.embedding_length", model.hidden)
    w.add_uint32(f"{a}.block_count", model.n_layers)
    w.add_uint32(f"{a}.feed_forward_length", model.n_ff)
    w.add_uint32(f"{a}.attention.head_count", model.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", model.n_head_kv)
    if a == "falcon":
        w.add_float32(f"{a}.attention.layer_norm_epsilon", 1e-5)
    else:
        w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    if model.n_expert:
        w.add_uint32(f"{a}.expert_count", model.n_expert)
        w.add_uint32(f"{a}.expert_used_count", 2)
    rng = np.random.default_rng(0)
    for name, shape in model.tensors():
        w.add_tensor(name, (rng.standard_normal(shape, dtype=np.float32) * 0.02))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in made:
            made[model] = tmp_path_factory.mktemp("mixes") / f"{model}.gguf"
            _write_gguf(MODELS[model], made[model])
        return made[model]

    return get


@pytest.mark.parametrize("model,ftype,variant", CASES, ids=["-".join(filter(None, c)) for c in CASES])
def test_types_match_llama_cpp(source, tmp_path, model, ftype, variant):
    m = MODELS[model]
    src, dst = source(model), tmp_path / "out.gguf"
    log = llama_quantize(src, dst, ftype, pure=variant == "pure", leave_output=variant == "leave")

    reader = gguf.GGUFReader(str(dst))
    theirs = {t.name: t.tensor_type.name for t in reader.tensors}
    file_type = int(reader.fields["general.file_type"].parts[-1][0])

    choices = plan_types(
        m.tensors(), ftype, arch=m.arch, n_layers=m.n_layers, n_head=m.n_head, n_head_kv=m.n_head_kv,
        n_expert=m.n_expert, pure=variant == "pure", leave_output_tensor=variant == "leave",
    )  # fmt: skip
    ours = {c.name: c.type for c in choices}
    assert list(ours) == [name for name, _ in m.tensors()]
    diff = {n: (ours[n], theirs.get(n)) for n in ours if ours[n] != theirs.get(n)}
    assert not diff, f"(ours, llama.cpp) differ for {len(diff)}/{len(ours)} tensors: {diff}"
    assert file_type == FTYPES[ftype].file_type == llama_ftype(ftype)
    report = fallback_report(choices)
    assert report.splitlines() == fallback_lines(log)


def _plan(m: Tiny, ftype: str, **options):
    return plan_types(m.tensors(), ftype, arch=m.arch, n_layers=m.n_layers, n_head=m.n_head, n_head_kv=m.n_head_kv,
                      n_expert=m.n_expert, **options)


def _compare_dry_run(source, tmp_path, model: str, ftype: str, *, has_imatrix: bool = False, **options) -> None:
    m = MODELS[model]
    # An imatrix entry that names no tensor: llama.cpp only needs to know that one is given.
    imatrix = {"unused.weight": np.ones(4, np.float32)} if has_imatrix else None
    log = llama_quantize(source(model), tmp_path / "dry.gguf", ftype, dry_run=True, imatrix=imatrix, **options)
    theirs = dry_run_types(log)
    choices = _plan(m, ftype, has_imatrix=has_imatrix, leave_output_tensor=options.pop("leave_output", False),
                    **options)
    ours = {c.name: c.type for c in choices}
    assert sorted(theirs) == sorted(ours), "the log parser missed tensors"
    diff = {n: (ours[n], theirs[n]) for n in ours if ours[n] != theirs[n]}
    assert not diff, f"(ours, llama.cpp) differ for {len(diff)}/{len(ours)} tensors: {diff}"
    assert fallback_report(choices).splitlines() == fallback_lines(log)


@pytest.mark.parametrize("model,ftype,imatrix", DRY_CASES, ids=["-".join(filter(None, c)) for c in DRY_CASES])
def test_every_file_type_matches_llama_cpp_dry_run(source, tmp_path, model, ftype, imatrix):
    _compare_dry_run(source, tmp_path, model, ftype, has_imatrix=imatrix == "imatrix")


@pytest.mark.parametrize("model,override", OVERRIDE_CASES, ids=["-".join(c) for c in OVERRIDE_CASES])
def test_overrides_match_llama_cpp(source, tmp_path, model, override):
    ftype, options = OVERRIDES[override]
    _compare_dry_run(source, tmp_path, model, ftype, **options)


def test_requires_imatrix_and_names():
    m = MODELS["llama"]
    needs = {c.name for c in _plan(m, "IQ2_XXS") if c.requires_imatrix}
    # llama.cpp's tensor_requires_imatrix: every IQ2_XXS/Q2_K... matrix but token_embd and output
    assert "blk.3.attn_q.weight" in needs and "token_embd.weight" not in needs and "output.weight" not in needs
    assert not any(c.requires_imatrix for c in _plan(m, "IQ4_XS"))
    assert mix_for("q4_k_m") is FTYPES["Q4_K_M"] and mix_for("Q4_K") is FTYPES["Q4_K_M"]
    with pytest.raises(FuselmError, match="unknown GGML type"):
        _plan(m, "Q4_K_M", output_tensor_type="Q9_9")
    with pytest.raises(FuselmError, match="bad regular expression"):
        _plan(m, "Q4_K_M", tensor_types=[("attn_(", "Q8_0")])


def test_cases_exercise_the_rules():
    """Guard the fixtures: the tiny models must actually hit the bumps, the fallbacks and F16."""
    seen = set()
    for model, ftype, variant in CASES:
        m = MODELS[model]
        choices = plan_types(
            m.tensors(), ftype, arch=m.arch, n_layers=m.n_layers, n_head=m.n_head, n_head_kv=m.n_head_kv,
            n_expert=m.n_expert, pure=variant == "pure", leave_output_tensor=variant == "leave",
        )  # fmt: skip
        seen |= {(c.intended, c.type) for c in choices}
    for pair in [("Q6_K", "Q6_K"), ("Q5_K", "Q5_K"), ("Q8_0", "Q8_0"), ("Q4_K", "Q5_0"), ("Q5_K", "Q5_1"),
                 ("Q6_K", "Q8_0"), ("Q2_K", "Q4_0"), ("Q3_K", "Q4_0"), ("F16", "F16")]:  # fmt: skip
        assert pair in seen, pair


def test_use_more_bits_layers():
    # the notes' worked values: n=32 -> 0-3, 6, 9, ..., 27, 28-31; n=16 -> 0, 1, 4, 7, 10, 13, 14, 15
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, *range(6, 28, 3), 28, 29, 30, 31]
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]


def test_fallback_to_f16_and_errors():
    # a 32-block target on a row that is not a multiple of 32 goes straight to F16
    assert fallback("x.weight", 100, "Q8_0")[0] == "F16"
    assert fallback("x.weight", 100, "Q4_K")[0] == "F16"
    assert fallback("x.weight", 4544, "Q3_K")[0] == "Q4_0"
    # llama.cpp's line, as the reference notes quote it from a verified run
    assert fallback("blk.0.attn_k.weight", 96, "Q2_K") == (
        "Q4_0",
        "warning: blk.0.attn_k.weight                  - ncols     96 not divisible by 256 (required for type    q2_K) "
        "-> falling back to    q4_0",
    )
    with pytest.raises(FuselmError, match="unknown file type"):
        plan_types([], "Q7_K", arch="llama", n_layers=1, n_head=1, n_head_kv=1)
    with pytest.raises(FuselmError, match="architecture"):
        plan_types([], "Q4_K_M", arch="gpt2", n_layers=1, n_head=1, n_head_kv=1)
    with pytest.raises(FuselmError, match="listed twice"):
        plan_types([("a.weight", (2, 32))] * 2, "Q4_0", arch="llama", n_layers=1, n_head=1, n_head_kv=1)
