"""`fuselm demo eval`: how well the demo model (and its quantized and FlashNorm-folded versions) reads and draws.

- Caption accuracy: the model captions n held-out pictures (greedy); right when the caption parses back
  (`world.parse_caption`) to exactly the scene: the shape, colour and place of every object (and the size of a
  single one).
- Drawn-image correctness: the model draws n held-out captions (greedy, no guidance); right when the
  non-learned picture checker reads exactly the scene (`picture_checker.scene_matches`).
Held-out scenes are combinations of objects never seen together in training. n scenes are drawn with
replacement from the held-out split (55 distinct scenes); greedy decoding is deterministic, so each distinct
scene is generated once and counted as often as it was drawn (the same figure, about four times faster).

Rows: the model as given; its Q8_0, Q4_K_M and Q4_0 quantizations (`fuselm quantize`, llama.cpp's mixes); its
FlashNorm-folded version (`fuselm flashify --strict`). Two reference rows bound what is reachable: the world's own
pictures and their VQGAN reconstructions, both read by the same checker.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..demo.world import Scene, caption, parse_caption, render, sample_scenes
from ..errors import FuselmError
from .picture_checker import scene_matches

QUANT_TYPES = ("Q8_0", "Q4_K_M", "Q4_0")


@dataclass
class Row:
    name: str
    caption_accuracy: float | None = None
    drawn_correctness: float | None = None
    seconds_per_caption: float | None = None
    seconds_per_drawing: float | None = None
    size_bytes: int | None = None
    note: str = ""


def eval_scenes(n: int, seed: int) -> tuple[list[Scene], list[Scene]]:
    """(pictures to caption, captions to draw): n held-out scenes each, drawn with replacement."""
    return sample_scenes(n, seed, "heldout"), sample_scenes(n, seed + 1, "heldout")


def evaluate_model(model, name: str, n: int = 200, seed: int = 0, progress: bool = True) -> Row:
    from ..demo.showcase import describe, draw

    to_caption, to_draw = eval_scenes(n, seed)
    row = Row(name)
    caption_counts, draw_counts = Counter(to_caption), Counter(to_draw)
    bar = tqdm(total=len(caption_counts) + len(draw_counts), desc=name, unit="scene", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    warm = sample_scenes(1, seed, "train")[0]  # one untimed round first: lazy setup is not per-image cost
    draw(model, caption(warm), seed=seed)
    describe(model, render(warm), seed=seed)
    right, t0 = 0, time.perf_counter()
    for scene, count in caption_counts.items():
        right += count * (parse_caption(describe(model, render(scene), seed=seed)) == scene)
        bar.update()
    row.seconds_per_caption = (time.perf_counter() - t0) / len(caption_counts)
    row.caption_accuracy = right / n
    right, t0 = 0, time.perf_counter()
    for scene, count in draw_counts.items():
        right += count * scene_matches(scene, draw(model, caption(scene), seed=seed))
        bar.update()
    row.seconds_per_drawing = (time.perf_counter() - t0) / len(draw_counts)
    row.drawn_correctness = right / n
    bar.close()
    return row


def reference_rows(model, n: int, seed: int) -> list[Row]:
    """The checker on the world's own pictures, and on their VQGAN reconstructions (the drawing ceiling)."""
    _, to_draw = eval_scenes(n, seed)
    truth = Row("world's pictures (checker ground truth)",
                drawn_correctness=sum(scene_matches(s, render(s)) for s in to_draw) / n)
    it = model.image_tokenizer
    pictures = it.decode(it.encode([render(s) for s in to_draw]))
    recon = Row("VQGAN reconstructions of them",
                drawn_correctness=sum(scene_matches(s, p) for s, p in zip(to_draw, pictures)) / n)
    return [truth, recon]


def _model_file(model_arg: str | Path) -> Path:
    """The .gguf (or HF directory) that `fuselm.load` reads for this argument."""
    from ..load import DEMO_DIR

    path = DEMO_DIR if model_arg in (None, "demo") else Path(model_arg)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(p for p in path.glob("*.gguf") if not p.name.endswith("-vqgan.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    return path


def _beside(src: Path, out: Path) -> None:
    """Copy tokenizer.json/tokenizer_config.json next to a derived GGUF, as they sit next to the source."""
    folder = src if src.is_dir() else src.parent
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            shutil.copy(folder / name, out.parent / name)


def _size(path: Path) -> int:
    from ..formats.gguf import companion_path

    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size + (companion_path(path).stat().st_size if companion_path(path).is_file() else 0)


def quantized_variant(src: Path, work: Path, ftype: str) -> Path:
    from ..reshape.quantize import quantize_model

    out = work / f"demo-{ftype.lower()}.gguf"
    quantize_model(src, out, ftype, progress=False)
    _beside(src, out)
    return out


def flashnorm_variant(src: Path, work: Path) -> Path:
    from ..load import read_source
    from ..reshape.checkpoint import write_model
    from ..transforms.flashnorm import flashify

    source = read_source(src)
    config, state, _ = flashify(source.config, source.state, strict=True)
    out = write_model(work / "demo-flashnorm.gguf", "gguf", config, state, source)
    _beside(src, out)
    return out


def quality_table(model_arg: str | Path = "demo", n: int = 200, seed: int = 0,
                  variants: tuple[str, ...] = (*QUANT_TYPES, "flashnorm"), progress: bool = True) -> list[Row]:
    from .. import load

    src = _model_file(model_arg)
    model = load(src)
    base = evaluate_model(model, f"shipped ({model.file_type})", n, seed, progress)
    base.size_bytes = _size(src)
    rows = [base]
    with tempfile.TemporaryDirectory(prefix="fuselm-eval-demo-") as tmp:
        work = Path(tmp)
        for variant in variants:
            name = variant if variant != "flashnorm" else "FlashNorm-folded (strict)"
            try:
                path = flashnorm_variant(src, work) if variant == "flashnorm" else \
                    quantized_variant(src, work, variant)
                row = evaluate_model(load(path), name, n, seed, progress)
                row.size_bytes = _size(path)
            except (FuselmError, ImportError, NotImplementedError) as err:
                row = Row(name, note=f"not produced: {err}")
            rows.append(row)
    rows += reference_rows(model, n, seed)
    return rows


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def _ms(v: float | None) -> str:
    return "" if v is None else f"{1000 * v:.0f} ms"


def format_table(rows: list[Row], n: int) -> str:
    lines = [f"| model | caption accuracy (n={n}) | drawn-image correctness (n={n}) | time per caption | "
             "time per picture | size | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        size = "" if r.size_bytes is None else f"{r.size_bytes / 2**20:.2f} MiB"
        lines.append(f"| {r.name} | {_pct(r.caption_accuracy)} | {_pct(r.drawn_correctness)} | "
                     f"{_ms(r.seconds_per_caption)} | {_ms(r.seconds_per_drawing)} | {size} | {r.note} |")
    return "\n".join(lines)


DESCRIPTION = """\
The demo model's quality table: caption accuracy on n held-out pictures and drawn-image correctness on n
held-out captions (judged by the world's non-learned picture checker), with the time per picture, for the model
and for its Q8_0, Q4_K_M and Q4_0 quantizations and its FlashNorm-folded version.

examples:
  fuselm demo eval                        the shipped model, n = 200
  fuselm demo eval --n 50 --only Q8_0     a quick look at one quantization
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="model to evaluate (default: the bundled demo model)")
    p.add_argument("--n", type=int, default=200, help="held-out pictures and captions each (default 200)")
    p.add_argument("--seed", type=int, default=0, help="which held-out scenes are drawn (default 0)")
    p.add_argument("--only", action="append", choices=[*QUANT_TYPES, "flashnorm"], default=None,
                   help="evaluate only these variants besides the model itself (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")


def run(args: argparse.Namespace) -> int:
    from ..threads import set_threads

    if args.n < 1:
        raise FuselmError(f"--n must be a positive integer, got {args.n}")
    if args.threads is not None:
        set_threads(args.threads)
    variants = tuple(args.only) if args.only else (*QUANT_TYPES, "flashnorm")
    rows = quality_table(args.model, n=args.n, seed=args.seed, variants=variants)
    print(format_table(rows, args.n))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`fuselm demo eval ARGS` as a function."""
    p = argparse.ArgumentParser(prog="fuselm demo eval", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))
