"""Write a generation as an interleaved HTML page and a Markdown file, with the pictures as PNG files beside them.

`story.html` gets `story.md`, `story-1.png`, `story-2.png`, ... (and `story-prompt-1.png` ... for pictures in the
prompt). Every file is written atomically (temporary file, then rename); the pictures first, the HTML last, so a
page never points at a missing file. The output depends only on the content (no timings, no dates), so the
same generation gives byte-identical files.
"""

from __future__ import annotations

import html
import io
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from ..errors import FuselmError
from .stream import Done, ImageDone, ImageProgress, ImageStart, TextDelta


@dataclass(frozen=True)
class Picture:
    image: Image.Image | None  # None: generated, but the model has no VQGAN decoder
    file: str | None = None


Part = str | Picture

STYLE = """body{max-width:46rem;margin:2rem auto;padding:0 1rem;font:16px/1.5 system-ui,sans-serif;color:#222}
.text{white-space:pre-wrap}
figure{margin:1rem 0}
img{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}
.prompt{color:#555;border-left:3px solid #ccc;padding-left:1rem;margin-bottom:2rem}
.missing{color:#a00}"""


def document_parts(items: Iterable) -> list[Part]:
    """Events (TextDelta, ImageDone; others are skipped) or plain parts (strings, PIL images) -> merged parts."""
    parts: list[Part] = []
    for i, item in enumerate(items):
        if isinstance(item, TextDelta):
            item = item.text
        if isinstance(item, str):
            if parts and isinstance(parts[-1], str):
                parts[-1] += item
            elif item:
                parts.append(item)
        elif isinstance(item, ImageDone):
            parts.append(Picture(item.image))
        elif isinstance(item, Image.Image):
            parts.append(Picture(item))
        elif not isinstance(item, (ImageStart, ImageProgress, Done)):
            raise FuselmError(f"document item {i} is {type(item).__name__}; expected events, strings or PIL images")
    return parts


def document_path(out_path: str | Path) -> Path:
    """The HTML path for an output name (.html/.htm, or .md with the HTML beside it); an error for anything else."""
    out_path = Path(out_path)
    if out_path.suffix.lower() not in (".html", ".htm", ".md"):
        raise FuselmError(f"{out_path}: the document must end in .html (a .md file is written beside it)")
    return out_path if out_path.suffix.lower() != ".md" else out_path.with_suffix(".html")


def write_document(events_or_parts: Iterable, out_path: str | Path, *, prompt=None, title: str | None = None) -> Path:
    """Write `out_path` (.html; .md beside it) and the PNGs; returns the HTML path.

    prompt: optional string or list of strings and PIL images, shown above the generation.
    """
    html_path = document_path(out_path)
    md_path = html_path.with_suffix(".md")
    try:
        html_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FuselmError(f"{html_path.parent}: cannot create the output folder ({err.strerror})") from None
    stem = html_path.stem
    body = _named(document_parts(events_or_parts), f"{stem}-")
    asked = _named(document_parts([prompt] if isinstance(prompt, str) else (prompt or [])), f"{stem}-prompt-")
    for part in asked + body:
        if isinstance(part, Picture) and part.image is not None:
            buf = io.BytesIO()
            part.image.save(buf, format="PNG")
            _atomic_write(html_path.parent / part.file, buf.getvalue())
    title = title or _title(asked, body)
    _atomic_write(md_path, _markdown(asked, body, title).encode("utf-8"))
    _atomic_write(html_path, _html(asked, body, title).encode("utf-8"))
    return html_path


def _named(parts: list[Part], prefix: str) -> list[Part]:
    out, n = [], 0
    for part in parts:
        if isinstance(part, Picture):
            n += 1
            part = Picture(part.image, f"{prefix}{n}.png" if part.image is not None else None)
        out.append(part)
    return out


def _title(asked: list[Part], body: list[Part]) -> str:
    for part in asked + body:
        if isinstance(part, str) and part.strip():
            line = part.strip().splitlines()[0]
            return line[:80] + ("…" if len(line) > 80 else "")
    return "fuselm generation"


def _html_parts(parts: list[Part]) -> list[str]:
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(f'<span class="text">{html.escape(part)}</span>')
        elif part.image is None:
            out.append('<p class="missing">[picture not drawn: the model has no VQGAN decoder]</p>')
        else:
            w, h = part.image.size
            out.append(f'<figure><img src="{quote(part.file)}" width="{w}" height="{h}" '
                       f'alt="{html.escape(part.file)}"></figure>')
    return out


def _html(asked: list[Part], body: list[Part], title: str) -> str:
    lines = ["<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>"]
    if asked:
        lines += ['<section class="prompt">', *_html_parts(asked), "</section>"]
    lines += ["<article>", *_html_parts(body), "</article>", "</body>", "</html>", ""]
    return "\n".join(lines)


def _md_parts(parts: list[Part]) -> list[str]:
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif part.image is None:
            out.append("\n\n*[picture not drawn: the model has no VQGAN decoder]*\n\n")
        else:
            out.append(f"\n\n![{part.file}](<{part.file}>)\n\n")
    return out


def _markdown(asked: list[Part], body: list[Part], title: str) -> str:
    text = f"# {title}\n\n"
    if asked:
        quoted = "".join(_md_parts(asked)).strip("\n")
        text += "\n".join("> " + line if line else ">" for line in quoted.split("\n")) + "\n\n"
    return text + "".join(_md_parts(body)).strip("\n") + "\n"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
