"""Quantize a model to GGUF: llama.cpp's per-tensor type mixes, our bit-exact codecs, one atomic file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import archs
from ..errors import FuselmError
from ..load import read_source
from ..quants import quantize, row_bytes
from ..quants.mixes import FTYPES, fallback_report, plan_types


@dataclass(frozen=True)
class TensorReport:
    name: str
    type: str
    shape: tuple[int, ...]
    nbytes: int


def quantize_model(src: str | Path, out: str | Path, ftype: str, *, pure: bool = False,
                   leave_output_tensor: bool = False, progress: bool = True) -> tuple[list[TensorReport], str]:
    """Quantize SRC to OUT. Returns per-tensor reports and llama.cpp-style fallback warnings ('' if none)."""
    src, out = Path(src), Path(out)
    if ftype not in FTYPES:
        raise FuselmError(f"unknown --type {ftype!r}; expected one of {', '.join(FTYPES)}")
    if out.suffix != ".gguf":
        raise FuselmError(f"{out}: output must be a .gguf file")
    source = read_source(src)
    config, state = source.config, source.state
    tokenizer, template, vq = source.tokenizer, source.chat_template, source.vqgan
    tensors = archs.internal_to_gguf(config, state)
    choices = plan_types([(n, tuple(t.shape)) for n, t in tensors.items()], ftype, arch=config.arch,
                         n_layers=config.num_hidden_layers, n_head=config.num_attention_heads,
                         n_head_kv=config.num_key_value_heads, pure=pure, leave_output_tensor=leave_output_tensor)
    plans: dict[str, tuple] = {}
    reports: list[TensorReport] = []
    for choice in choices:
        t = tensors[choice.name]
        shape = tuple(t.shape)
        if choice.type in ("F32", "F16", "BF16"):
            plans[choice.name] = (t, choice.type)
            nbytes = t.numel() * {"F32": 4, "F16": 2, "BF16": 2}[choice.type]
        else:
            rows = t.numel() // shape[-1]

            def produce(t=t, qtype=choice.type, name=choice.name, rows=rows):
                return quantize(t.reshape(rows, -1).float(), qtype, name=name).numpy()

            plans[choice.name] = (produce, choice.type, shape)
            nbytes = rows * row_bytes(choice.type, shape[-1])
        reports.append(TensorReport(choice.name, choice.type, shape, nbytes))
    archs.write_gguf(out, config, plans, tokenizer=tokenizer, chat_template=template, progress=progress, vqgan=vq)
    return reports, fallback_report(choices)


def summary_table(reports: list[TensorReport]) -> str:
    by_type: dict[str, list[int]] = {}
    for r in reports:
        n = 1
        for s in r.shape:
            n *= s
        entry = by_type.setdefault(r.type, [0, 0, 0])
        entry[0] += 1
        entry[1] += n
        entry[2] += r.nbytes
    lines = [f"{'type':<8} {'tensors':>8} {'weights':>14} {'MiB':>10} {'bits/weight':>12}"]
    total_n = total_b = 0
    for t, (count, n, b) in sorted(by_type.items(), key=lambda kv: -kv[1][2]):
        lines.append(f"{t:<8} {count:>8} {n:>14,} {b / 2**20:>10.2f} {8 * b / max(n, 1):>12.3f}")
        total_n += n
        total_b += b
    lines.append(f"{'total':<8} {len(reports):>8} {total_n:>14,} {total_b / 2**20:>10.2f} "
                 f"{8 * total_b / max(total_n, 1):>12.3f}")
    return "\n".join(lines)
