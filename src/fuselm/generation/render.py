"""Terminal front-ends for generate and chat: print the event stream as it comes."""

from __future__ import annotations

import re
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


CHAT_HELP = """commands:
  /help          this text
  /reset         forget the conversation (the system prompt stays)
  /image PATH    attach a picture to your next message (models that read pictures)
  /quit          leave (Ctrl-D too); Ctrl-C stops an answer and returns to the prompt"""
IMAGE_MARK = "\ue000{}\ue001"  # private-use characters: a picture's place in the rendered template


def chat_parts(model, messages: list[dict]) -> tuple[list, tuple[str, ...]]:
    """Chat messages whose content is a string or a list of strings and PIL images, as the list of text and
    pictures that fuselm.generate reads (the chat template rendered around the pictures), and the template's
    stop strings."""
    from .chat import render
    from .prompt import chat_template_for

    template, stops = chat_template_for(model)
    pictures: list = []
    flat = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            pieces = []
            for part in content:
                if isinstance(part, str):
                    pieces.append(part)
                else:
                    pieces.append(IMAGE_MARK.format(len(pictures)))
                    pictures.append(part)
            content = "".join(pieces)
        flat.append({"role": m["role"], "content": content})
    tok = model.tokenizer
    # no bos text here: fuselm.generate puts the bos token in front of a list prompt itself
    text = render(template, flat, bos_token="", eos_token=tok.eos_token or "")
    parts: list = []
    for i, piece in enumerate(re.split("\ue000(\\d+)\ue001", text)):
        if i % 2:
            parts.append(pictures[int(piece)])
        elif piece:
            parts.append(piece)
    return parts, stops


def _readline() -> None:
    try:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    except ImportError:  # not on every platform; plain input() still works
        pass


def run_chat(model, *, system: str | None = None, picture_dir: str | Path = ".", **options) -> int:
    """A terminal chat: the model's chat template, /help, /reset, /image PATH; Ctrl-C stops an answer.
    Pictures the model draws are saved in `picture_dir` and their paths printed."""
    _readline()
    draws = model.image_tokenizer is not None
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    pending: list = []  # pictures for the next message
    saved = 0
    print("fuselm chat: /help for commands, /quit or Ctrl-D to leave", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        command, _, arg = line.strip().partition(" ")
        if command in ("/quit", "/exit"):
            return 0
        if command == "/help":
            print(CHAT_HELP, file=sys.stderr)
            continue
        if command == "/reset":
            messages, pending = (messages[:1] if system else []), []
            print("[conversation reset]", file=sys.stderr)
            continue
        if command == "/image":
            if not draws:
                print(f"[{model.source} does not read pictures]", file=sys.stderr)
                continue
            try:
                from ..vision import open_image

                pending.append(open_image(Path(arg.strip()).expanduser()))
                print(f"[picture {arg.strip()} attached to your next message]", file=sys.stderr)
            except (FuselmError, OSError) as err:
                print(f"[cannot read {arg.strip()!r}: {err}]", file=sys.stderr)
            continue
        if command.startswith("/"):
            print(f"[unknown command {command}; /help lists them]", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": [*pending, line] if pending else line})
        pending = []
        events: list = []
        try:
            has_pictures = any(not isinstance(m["content"], str) for m in messages)
            prompt, stops = chat_parts(model, messages) if has_pictures else (messages, ())
            extra = {"images": "on"} if draws else {}
            stream_to_terminal(generate(model, prompt, **extra, **{**options, "stop": tuple(options.get("stop", ()))
                                                                   + stops}), collect=events)
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
        except FuselmError as err:
            print(f"\n[error: {err}]", file=sys.stderr)
            messages.pop()
            continue
        print()
        reply: list = []
        for e in events:
            if isinstance(e, TextDelta):
                reply.append(e.text)
            elif isinstance(e, ImageDone):
                saved += 1
                path = Path(picture_dir) / f"fuselm-chat-{saved}.png"
                e.image.save(path)
                print(f"[picture saved: {path}]", file=sys.stderr)
                reply.append(e.image)
        text_only = all(isinstance(r, str) for r in reply)
        messages.append({"role": "assistant", "content": "".join(reply) if text_only else reply})
