"""`fuselm demo` with the bundled model: draw a picture, caption a picture, write an interleaved answer.

Every picture the model draws is checked by the world's non-learned picture checker, and every caption it writes
is parsed back into a scene, so the page says plainly whether the model got it right. The scenes come from the
held-out split: the model never saw these combinations during training.
"""

from __future__ import annotations

import html
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import FuselmError
from ..generation.sampling import GREEDY, SamplingParams
from ..generation.stream import Done, ImageDone, TextDelta
from ..vision.vocab import END_TURN
from .picture_checker import read_scene, scene_matches
from .world import STORY_REQUEST, caption, parse_caption, render, sample_scenes

SHOW_SIZE = 128  # pixels on the page (the world's pictures are 32x32, upscaled with NEAREST)
# Deterministic reading and drawing: the demo shows the model's most likely answer. The interleaved answer samples
# its text (seeded) so that the model chooses what to add; no repetition penalty, since captions repeat words.
STORY_TEXT = SamplingParams(temperature=0.8, top_p=0.95)


@dataclass
class Section:
    title: str
    prompt: list  # strings and PIL images, as shown to the model
    parts: list  # strings and PIL images the model wrote
    verdict: str
    seconds: float


def draw(model, text: str, seed: int = 0) -> Image.Image:
    """The model's picture for a caption (greedy, no guidance): `caption<reserved08706>` then one image."""
    events = list(model_generate(model, text + END_TURN, images="only", cfg="off", image_sampling=GREEDY,
                                 seed=seed))
    pictures = [e.image for e in events if isinstance(e, ImageDone)]
    if len(pictures) != 1:
        raise FuselmError(f"demo: expected one picture for {text!r}, the model drew {len(pictures)}")
    return pictures[0]


def describe(model, picture: Image.Image, seed: int = 0, max_tokens: int = 32) -> str:
    """The model's caption of a picture (greedy): `<racm3:break> image <eoss> <reserved08706>` then text."""
    events = model_generate(model, [picture, END_TURN], images="off", text_sampling=GREEDY, temperature=0,
                            max_tokens=max_tokens, seed=seed)
    return "".join(e.text for e in events if isinstance(e, TextDelta)).strip()


def model_generate(model, prompt, **options):
    from .. import generate

    return generate(model, prompt, **options)


def _story(model, seed: int) -> tuple[list, float]:
    """An interleaved answer to "draw two pictures": the model chooses the captions and draws them."""
    t0 = time.perf_counter()
    parts: list = []
    for e in model_generate(model, STORY_REQUEST + END_TURN, images="on", cfg="off", text_sampling=STORY_TEXT,
                            image_sampling=GREEDY, max_tokens=200, seed=seed):
        if isinstance(e, TextDelta):
            if parts and isinstance(parts[-1], str):
                parts[-1] += e.text
            else:
                parts.append(e.text)
        elif isinstance(e, ImageDone):
            parts.append(e.image)
        elif isinstance(e, Done):
            break
    return parts, time.perf_counter() - t0


def _story_verdict(parts: list) -> str:
    """Each picture judged against the caption the model wrote just before it."""
    said, checks = "", []
    for part in parts:
        if isinstance(part, str):
            said = part.strip() or said
        else:
            scene = parse_caption(said)
            if scene is None:
                checks.append(f"a picture after text that is not a caption of the world ({said!r})")
            else:
                ok = scene_matches(scene, part)
                checks.append(f"picture of “{caption(scene)}”: " + ("drawn right" if ok else "drawn WRONG"))
    return "; ".join(checks) if checks else "the model drew no picture"


def run_showcase(out: Path, seed: int = 0) -> int:
    from .. import load

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load("demo")
    asked, shown = sample_scenes(2, seed, split="heldout")

    t0 = time.perf_counter()
    picture = draw(model, caption(asked), seed=seed)
    ok = scene_matches(asked, picture)
    seen = read_scene(picture)
    verdict = "the checker reads the picture as asked" if ok else \
        f"WRONG: the checker reads {caption(seen)!r}" if seen else "WRONG: the checker cannot read the picture"
    sections = [Section("1. Draw a picture from a caption", [caption(asked)], [picture], verdict,
                        time.perf_counter() - t0)]

    t0 = time.perf_counter()
    fresh = render(shown)
    text = describe(model, fresh, seed=seed)
    parsed = parse_caption(text)
    verdict = "right" if parsed == shown else f"WRONG: the world drew “{caption(shown)}”"
    sections.append(Section("2. Caption a picture the world draws fresh", [fresh], [text], verdict,
                            time.perf_counter() - t0))

    parts, seconds = _story(model, seed)
    sections.append(Section("3. An interleaved answer: text and pictures", [STORY_REQUEST], parts,
                            _story_verdict(parts), seconds))

    for s in sections:
        print(f"\n{s.title}  ({s.seconds:.2f} s)")
        print("  prompt: " + " ".join(p if isinstance(p, str) else "[picture]" for p in s.prompt))
        print("  model:  " + " ".join(p.strip() if isinstance(p, str) else "[picture]" for p in s.parts))
        print(f"  check:  {s.verdict}")
    page = write_page(out, sections, model)
    print(f"\nwrote {page.resolve()} in {time.perf_counter() - t_start:.1f} s (open it in a browser)",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------- the page


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.convert("RGB").resize((SHOW_SIZE, SHOW_SIZE), Image.Resampling.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def _html_parts(parts: list, out: Path, name: str) -> list[str]:
    lines, n = [], 0
    for part in parts:
        if isinstance(part, str):
            if part.strip():
                lines.append(f'<p class="text">{html.escape(part.strip())}</p>')
        else:
            n += 1
            file = f"{name}-{n}.png"
            _atomic_write(out / file, _png(part))
            lines.append(f'<img src="{file}" width="{SHOW_SIZE}" height="{SHOW_SIZE}" alt="{file}">')
    return lines


STYLE = """body{max-width:46rem;margin:2rem auto;padding:0 1rem;font:16px/1.5 system-ui,sans-serif;color:#222}
section{margin:1.5rem 0;padding-bottom:1rem;border-bottom:1px solid #eee}
.row{display:flex;gap:2rem;align-items:flex-start}.row>div{flex:1}
h2{font-size:1.1rem}h3{font-size:.8rem;color:#777;text-transform:uppercase;margin:.2rem 0}
img{image-rendering:pixelated;border:1px solid #ccc;margin:.3rem .6rem .3rem 0;vertical-align:middle}
.text{margin:.3rem 0;font-family:ui-monospace,monospace}.check{color:#555;font-size:.9rem}"""


def write_page(out: Path, sections: list[Section], model) -> Path:
    lines = ["<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             "<title>fuselm demo</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
             "<h1>fuselm demo</h1>",
             f"<p>A tiny Chameleon-architecture model ({model.num_parameters():,} parameters, "
             f"{html.escape(model.file_type)}) trained by fuselm on a procedural picture world. "
             "It reads and writes text and pictures as one token stream. The scenes asked for in 1 and 2 are "
             "combinations the model never saw in training (in 3 it picks its own); pictures are judged by a "
             "non-learned checker.</p>"]
    for i, s in enumerate(sections, 1):
        lines += ["<section>", f"<h2>{html.escape(s.title)}</h2>", '<div class="row">',
                  "<div><h3>prompt</h3>", *_html_parts(s.prompt, out, f"demo-{i}-prompt"), "</div>",
                  "<div><h3>model</h3>", *_html_parts(s.parts, out, f"demo-{i}"), "</div>", "</div>",
                  f'<p class="check">check: {html.escape(s.verdict)} · {s.seconds:.2f} s</p>', "</section>"]
    lines += ["</body>", "</html>", ""]
    page = out / "demo.html"
    _atomic_write(page, "\n".join(lines).encode("utf-8"))
    return page
