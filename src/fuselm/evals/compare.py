"""RoPE scaling methods side by side: passkey accuracy (and sliding-window perplexity) against length, as a
table (Markdown + CSV) and a PNG plot.

Every method loads the same checkpoint through `fuselm.load(path, rope_scaling=...)` and sees exactly the same
passkey prompts (keys and depths depend only on the seed and the length). "none" is plain RoPE run past the
trained length: the baseline the other methods must beat.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.rope import ROPE_TYPES, normalize_rope_scaling
from ..errors import FuselmError
from .passkey import STYLES, PasskeyStyle, passkey_accuracy
from .perplexity import sliding_window_perplexity

METHODS = ("none", *ROPE_TYPES)
CHECKPOINT = "checkpoint"  # not a method: the checkpoint as its own config sets it (no override)
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}  # Llama-3.1's own values
PASS_THRESHOLD = 0.8  # YaRN's "passkey context": the longest length retrieved at least this often


def rope_scaling_for(method: str, factor: float, original_context: int) -> dict | None:
    """The `rope_scaling` dict that applies `method` at `factor` to a model trained at `original_context`.

    "none" forces plain RoPE even when the checkpoint's own config carries a scaling; CHECKPOINT gives None
    (load as configured).
    """
    if method == CHECKPOINT:
        return None
    if method not in METHODS:
        raise FuselmError(f"RoPE method {method!r} is unknown; expected one of {', '.join(METHODS)}")
    if method == "none":
        return {"rope_type": "default"}
    scaling = {"rope_type": method, "factor": float(factor), "original_max_position_embeddings": int(original_context)}
    if method == "llama3":
        scaling.update(LLAMA3_DEFAULTS)
    return scaling


def factor_for(length: int, original_context: int, factor: float | None) -> float:
    """The fixed factor, or with factor None ("auto") length / original context (never below 1)."""
    return float(factor) if factor is not None else max(1.0, length / original_context)


def original_context_of(config) -> int:
    """The length a checkpoint was trained at: its scaling's original context, else max_position_embeddings."""
    scaling = config.rope_scaling or {}
    return int(scaling.get("original_max_position_embeddings") or config.max_position_embeddings)


@dataclass(frozen=True)
class CompareRow:
    method: str
    length: int
    factor: float  # 1.0 and meaningless for "none" and CHECKPOINT
    accuracy: float | None  # None when passkey was not run
    correct: int
    trials: int
    ppl: float | None  # None when no text was given


@dataclass(frozen=True)
class Comparison:
    rows: list[CompareRow]
    original_context: int  # the trained length the factors were computed from


def compare_methods(path: str | Path, methods: Sequence[str], lengths: Sequence[int], *,
                    factor: float | None = None, original_context: int | None = None, trials: int = 20,
                    seed: int = 0, style: PasskeyStyle = STYLES["yarn"], text: str | Path | None = None,
                    text_ids: torch.Tensor | None = None, stride: int | None = None, passkey: bool = True,
                    dtype=None, progress: bool = True, load: Callable | None = None) -> Comparison:
    """Passkey accuracy (and perplexity when `text`/`text_ids` is given) for every method at every length.

    factor: the scaling factor s for every length, or None for length / original_context at each length.
    original_context: the trained length (default: the checkpoint's, see original_context_of).
    Perplexity at length L uses windows of L tokens every `stride` (default L // 2) over the text.
    """
    if load is None:
        from ..load import load
    bad = [m for m in methods if m not in (*METHODS, CHECKPOINT)]
    if bad or not methods:
        raise FuselmError(f"--methods has {bad or 'nothing'}; expected a comma list of {', '.join(METHODS)}")
    if not lengths or any(not isinstance(n, int) or n < 2 for n in lengths):
        raise FuselmError(f"--lengths is {list(lengths)}; expected positive token counts")
    probe = load(path, dtype=dtype)
    original = int(original_context or original_context_of(probe.config))
    plan = [(m, n, 1.0 if m in ("none", CHECKPOINT) else factor_for(n, original, factor))
            for m in methods for n in lengths]
    for m, _, s in plan:  # every scaling checked before the first (slow) evaluation
        normalize_rope_scaling(rope_scaling_for(m, s, original), source=f"--methods {m} --factor {s:g}")
    if text is not None and text_ids is None:
        from .perplexity import encode_text_file

        text_ids = encode_text_file(probe, text)
    if text_ids is not None and len(text_ids) < max(lengths):
        raise FuselmError(f"{text or 'text'}: {len(text_ids)} tokens, but --lengths goes up to {max(lengths)}; "
                          "perplexity at a length needs at least that many tokens of text")
    del probe
    bar = None
    if progress:
        from tqdm import tqdm

        steps = len(plan) * (trials if passkey else 0) + (len(plan) if text_ids is not None else 0)
        bar = tqdm(total=steps, desc="rope compare", unit="step", dynamic_ncols=True)
    rows: list[CompareRow] = []
    loaded: tuple[tuple[str, float], object] | None = None
    for method, length, s in plan:
        if loaded is None or loaded[0] != (method, s):
            loaded = model = None  # free the previous model before loading the next
            loaded = ((method, s), load(path, dtype=dtype, rope_scaling=rope_scaling_for(method, s, original)))
        model = loaded[1]
        if bar is not None:
            bar.set_postfix_str(f"{method} @ {length}")
        acc, correct = None, 0
        if passkey:
            r = passkey_accuracy(model, length, trials=trials, seed=seed, style=style,
                                 progress=None if bar is None else (lambda: bar.update(1)))
            acc, correct = r.accuracy, r.correct
        ppl = None
        if text_ids is not None:
            ppl = sliding_window_perplexity(model, text_ids, length, stride).ppl
            if bar is not None:
                bar.update(1)
        rows.append(CompareRow(method=method, length=length, factor=s, accuracy=acc, correct=correct,
                               trials=trials if passkey else 0, ppl=ppl))
    if bar is not None:
        bar.close()
    return Comparison(rows=rows, original_context=original)


# ------------------------------------------------------------------------------------------------ tables

def _grid(rows: Sequence[CompareRow]) -> tuple[list[str], list[int], dict[tuple[str, int], CompareRow]]:
    methods = list(dict.fromkeys(r.method for r in rows))
    lengths = sorted({r.length for r in rows})
    return methods, lengths, {(r.method, r.length): r for r in rows}


def passkey_context(rows: Sequence[CompareRow], method: str) -> int | None:
    """The longest length at which `method` retrieves the key at least PASS_THRESHOLD of the time, counting
    only lengths reached without a failure at a shorter one."""
    best = None
    for r in sorted((r for r in rows if r.method == method and r.accuracy is not None), key=lambda r: r.length):
        if r.accuracy < PASS_THRESHOLD:
            break
        best = r.length
    return best


def _factor_label(rows: Sequence[CompareRow], length: int) -> str:
    factors = {r.factor for r in rows if r.length == length and r.method not in ("none", CHECKPOINT)}
    return f"s={factors.pop():g}" if len(factors) == 1 else ""


def format_table(rows: Sequence[CompareRow], original_context: int | None = None) -> str:
    """Markdown: a passkey-accuracy table (when run) and a perplexity table (when run), methods by lengths."""
    methods, lengths, cell = _grid(rows)
    head = [f"{n} ({_factor_label(rows, n)})" if _factor_label(rows, n) else str(n) for n in lengths]
    parts = []
    if any(r.accuracy is not None for r in rows):
        trials = max(r.trials for r in rows)
        title = f"Passkey accuracy ({trials} trials per cell"
        title += f"; trained context {original_context})" if original_context else ")"
        lines = [title, "", "| method | " + " | ".join(head) + f" | ≥{PASS_THRESHOLD:.0%} up to |",
                 "|---" * (len(lengths) + 2) + "|"]
        for m in methods:
            vals = [cell[(m, n)].accuracy if (m, n) in cell else None for n in lengths]
            ctx = passkey_context(rows, m)
            lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals)
                         + f" | {ctx if ctx is not None else '-'} |")
        parts.append("\n".join(lines))
    if any(r.ppl is not None for r in rows):
        lines = ["Sliding-window perplexity (window = length)", "", "| method | " + " | ".join(head) + " |",
                 "|---" * (len(lengths) + 1) + "|"]
        for m in methods:
            vals = [cell[(m, n)].ppl if (m, n) in cell else None for n in lengths]
            lines.append(f"| {m} | " + " | ".join("-" if v is None else _fmt_ppl(v) for v in vals) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _fmt_ppl(v: float) -> str:
    if not math.isfinite(v):
        return "inf"
    return f"{v:.3f}" if v < 100 else f"{v:.3g}"


def to_csv(rows: Sequence[CompareRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "length", "factor", "passkey_accuracy", "correct", "trials", "perplexity"])
    for r in rows:
        w.writerow([r.method, r.length, f"{r.factor:g}", "" if r.accuracy is None else f"{r.accuracy:.4f}",
                    r.correct, r.trials, "" if r.ppl is None else f"{r.ppl:.6g}"])
    return buf.getvalue()


def _write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_tables(rows: Sequence[CompareRow], prefix: str | Path, *, original_context: int | None = None,
                 preamble: str = "") -> tuple[Path, Path]:
    """Write PREFIX.md (preamble + Markdown tables) and PREFIX.csv (one row per method and length)."""
    prefix = Path(prefix)
    md, csv_path = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".csv")
    _write_atomic(md, (preamble + "\n\n" if preamble else "") + format_table(rows, original_context))
    _write_atomic(csv_path, to_csv(rows))
    return md, csv_path


# ------------------------------------------------------------------------------------------------ plot

def require_matplotlib():
    """matplotlib.pyplot on the Agg backend, or one clear error (it is the optional extra "plot")."""
    try:
        import matplotlib
    except ImportError:
        raise FuselmError("the comparison plot needs matplotlib: pip install 'fuselm[plot]' "
                          "(or pass --no-plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_comparison(rows: Sequence[CompareRow], path: str | Path, *, original_context: int | None = None,
                    title: str = "RoPE scaling methods") -> Path:
    """A PNG with passkey accuracy (and perplexity, when measured) against length, one line per method."""
    plt = require_matplotlib()
    from matplotlib.ticker import FuncFormatter, LogLocator

    methods, lengths, cell = _grid(rows)
    panels = [("accuracy", "passkey accuracy")] if any(r.accuracy is not None for r in rows) else []
    if any(r.ppl is not None for r in rows):
        panels.append(("ppl", "perplexity (window = length)"))
    if not panels:
        raise FuselmError("nothing to plot: the comparison has neither passkey nor perplexity results")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels) + 1.4, 4.4), squeeze=False)
    markers = "osD^v<>Xph*"
    for ax, (attr, label) in zip(axes[0], panels):
        for i, m in enumerate(methods):
            xs = [n for n in lengths if (m, n) in cell and getattr(cell[(m, n)], attr) is not None]
            ys = [getattr(cell[(m, n)], attr) for n in xs]
            ax.plot(xs, ys, marker=markers[i % len(markers)], linestyle="--" if m == "none" else "-",
                    linewidth=1.6, markersize=5, label=m, alpha=0.9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        if original_context:
            ax.axvline(original_context, color="grey", linestyle=":", linewidth=1)
            ax.text(original_context, 0.5, "trained context ", transform=ax.get_xaxis_transform(), rotation=90,
                    ha="right", va="center", fontsize=8, color="grey")
        if attr == "accuracy":
            ax.set_ylim(-0.03, 1.03)
        else:
            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")  # 3, 10, 30 rather than 3x10^0
            ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method",
                       title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    path = Path(path)
    _write_atomic(path, buf.getvalue())
    return path
