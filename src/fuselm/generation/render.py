"""Terminal front-ends for generate and chat: print the event stream as it comes."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import FuselmError
from .generate import generate
from .stream import Done, ImageDone, ImageProgress, ImageStart, TextDelta


def _print_done(event: Done) -> None:
    t = event.timings
    parts = [f"{event.generated_tokens} tokens, stop: {event.reason}"]
    if "prefill_tok_s" in t:
        parts.append(f"prefill {t['prefill_tok_s']:.1f} tok/s")
    if "decode_tok_s" in t:
        parts.append(f"decode {t['decode_tok_s']:.1f} tok/s")
    print(f"\n[{', '.join(parts)}]", file=sys.stderr)


def stream_to_terminal(events, *, collect: list | None = None):
    """Print text deltas as they arrive and a progress bar per image; return the Done event."""
    from tqdm import tqdm

    bar = None
    done = None
    for event in events:
        if collect is not None:
            collect.append(event)
        if isinstance(event, TextDelta):
            print(event.text, end="", flush=True)
        elif isinstance(event, ImageStart):
            bar = tqdm(total=event.height, desc=f"drawing image {event.index + 1}", unit="row", leave=False,
                       file=sys.stderr)
        elif isinstance(event, ImageProgress) and bar is not None:
            bar.update(event.rows_done - bar.n)
        elif isinstance(event, ImageDone):
            if bar is not None:
                bar.close()
                bar = None
            print(f"[image {event.index + 1}]", end="", flush=True)
        elif isinstance(event, Done):
            done = event
    return done


def run_generation(model, prompt: str, *, images: str = "off", image_paths: list[str] = (), out: str | None = None,
                   **options) -> int:
    if out:
        from .document import document_path

        document_path(out)  # a bad name fails now, not after the generation
    parts: list = [prompt]
    if image_paths:
        if model.image_tokenizer is None:
            raise FuselmError(f"{model.source}: --image needs a model with an image tokenizer (Chameleon)")
        from ..vision import open_image

        parts += [open_image(Path(p)) for p in image_paths]
    extra = {} if model.image_tokenizer is None else {"images": images}
    if images != "off" and model.image_tokenizer is None:
        raise FuselmError(f"{model.source}: --images {images} needs a model with an image tokenizer (Chameleon)")
    events: list = []
    done = stream_to_terminal(generate(model, parts if len(parts) > 1 else prompt, **extra, **options),
                              collect=events)
    if done is not None:
        _print_done(done)
    if out:
        from .document import write_document

        written = write_document(events, Path(out), prompt=parts)
        print(f"wrote {written}", file=sys.stderr)
    return 0


def run_chat(model, *, system: str | None = None, **options) -> int:
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    print("fuselm chat: /reset to start over, /quit or Ctrl-D to leave", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply: list[str] = []
        events = []
        stream_to_terminal(generate(model, messages, **options), collect=events)
        reply = "".join(e.text for e in events if isinstance(e, TextDelta))
        print()
        messages.append({"role": "assistant", "content": reply})
