"""`fuselm demo`: the first command a newcomer runs.

Until the trained bundled model ships in demo/weights/, this is a plumbing demo: it builds a tiny Chameleon with
random weights, saves it in the real HF format, loads it back and generates from it. The output is noise; what it
shows is that loading, generation and the HTML writer work end to end.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..loader import DEMO_DIR


def bundled_model_available() -> bool:
    return DEMO_DIR.is_dir() and any(DEMO_DIR.glob("*.gguf"))


def run_demo(out: Path, seed: int = 0) -> int:
    if bundled_model_available():
        from .showcase import run_showcase

        return run_showcase(out, seed=seed)
    return run_plumbing_demo(out, seed=seed)


def run_plumbing_demo(out: Path, seed: int = 0) -> int:
    from .. import generate, load
    from ..generation.render import stream_to_terminal
    from .random_model import build_random_chameleon

    out.mkdir(parents=True, exist_ok=True)
    print("fuselm demo (plumbing): the trained bundled model is not shipped yet, so this builds a tiny Chameleon "
          "with RANDOM weights; its text is noise.", file=sys.stderr)
    t0 = time.perf_counter()
    model_dir = build_random_chameleon(out / "random-chameleon", seed=seed)
    model = load(model_dir)
    print(f"saved and loaded {model_dir} ({model.num_parameters():,} parameters)", file=sys.stderr)
    events: list = []
    stream_to_terminal(generate(model, "a red circle on the left", max_tokens=24, seed=seed, temperature=0.8),
                       collect=events)
    print(file=sys.stderr)
    text = "".join(getattr(e, "text", "") for e in events)
    page = out / "demo.html"
    page.write_text("<!doctype html><meta charset='utf-8'><title>fuselm plumbing demo</title>"
                    "<h1>fuselm plumbing demo</h1><p>Random weights: the text below is noise.</p>"
                    f"<pre>{_escape(text)}</pre>", encoding="utf-8")
    print(f"wrote {page} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
