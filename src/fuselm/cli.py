"""Command line: a thin layer over library functions. `fuselm COMMAND --help` explains each command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .commands.common import add_model_args, add_sampling_args, load_model_from_args, sampling_kwargs_from_args
from .errors import FuselmError

DESCRIPTION = """\
fuselm runs early-fusion transformers (Chameleon) and their text-only kin (Llama, Falcon) on the CPU,
and reshapes their checkpoints (GGUF quantization, FlashNorm, qk-norm regrouping, RoPE scaling).

MODEL is an HF directory (config.json + safetensors), a .gguf file, a Meta Chameleon checkpoint directory,
or "demo" for the bundled model (the default when omitted).

examples:
  fuselm demo                                   draw and caption pictures with the bundled model
  fuselm generate demo -p "a red circle" --images on --out story.html
  fuselm generate ./Llama-3.2-1B -p "The capital of France is" --temperature 0
  fuselm chat ./model-dir
  fuselm inspect model.gguf -v
  fuselm serve model.gguf --port 8080            OpenAI-style HTTP API (pictures too) and a web page
"""


def cmd_generate(args) -> int:
    from .generation.render import run_generation

    model = load_model_from_args(args)
    return run_generation(model, args.prompt, images=args.images, image_paths=args.image, out=args.out,
                          **sampling_kwargs_from_args(args, model))


def cmd_chat(args) -> int:
    from .generation.render import run_chat

    model = load_model_from_args(args)
    return run_chat(model, system=args.system, **sampling_kwargs_from_args(args, model))


def cmd_inspect(args) -> int:
    from .describe import describe

    print(describe(args.model, verbose=args.verbose))
    return 0


def cmd_demo(args) -> int:
    from .demo.showcase import run_showcase

    return run_showcase(Path(args.out), seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuselm", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fuselm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("generate", help="generate text (and images) from a prompt, streaming", formatter_class=raw,
                       description="Generate from a prompt and stream the result to the terminal.\n\n"
                                   "With a Chameleon model, --images on lets the model draw pictures in its answer, "
                                   "--images only draws one picture for the prompt, and --out writes an HTML page "
                                   "(plus Markdown) with the pictures as PNG files beside it.")
    add_model_args(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an input image, placed after the prompt text (repeatable; Chameleon models)")
    p.add_argument("--images", choices=["on", "off", "only"], default="off",
                   help="may the model draw images: on, off (default), only (one image, no text)")
    p.add_argument("--out", default=None, help="write an interleaved HTML document here (e.g. story.html)")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat using the model's chat template",
                       formatter_class=raw,
                       description="Chat in the terminal. The model's own chat template is used when it ships one; "
                                   "otherwise a built-in one (Chameleon, Alfred/Falcon, Llama-3) chosen from the "
                                   "vocabulary. Type /reset to start over, /quit (or Ctrl-D) to leave.")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inspect", help="print architecture, parameter count, dtypes (-v: every tensor)",
                       description="Describe a checkpoint: architecture and its switches (norms, qk-norm, swin, "
                                   "parallel blocks, FlashNorm), sizes, RoPE settings, parameter count by dtype or "
                                   "GGML type, the image tokenizer and the tokenizer. -v lists every tensor.")
    p.add_argument("model", nargs="?", default="demo", help="HF directory, .gguf, Meta directory or 'demo'")
    p.add_argument("-v", "--verbose", action="store_true", help="also list every tensor with shape and type")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="run the bundled model: draw, caption, and write demo.html",
                       description="Run the bundled tiny Chameleon: draw a picture from a caption, caption a "
                                   "freshly drawn picture, and write an interleaved answer; writes DIR/demo.html.")
    p.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    from .commands import demo_cmds

    demo_cmds.register_actions(p.add_subparsers(dest="demo_action", metavar="ACTION",
                                                title="actions (without one: run the demo)"))

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Commands whose implementation lives with its library (each module exposes register(subparsers))."""
    from .commands import REGISTRY

    return REGISTRY


def main(argv: list[str] | None = None) -> int:
    from .commands.tensor_parallel import quiet_followers, release_followers

    quiet_followers()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FuselmError as err:
        print(f"fuselm: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        release_followers()


if __name__ == "__main__":
    sys.exit(main())
