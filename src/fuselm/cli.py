"""Command line: a thin layer over library functions. `fuselm COMMAND --help` explains each command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
  fuselm serve model.gguf --port 8080            OpenAI-style HTTP endpoints, plus /v1/generate for pictures
"""


def _add_model(p: argparse.ArgumentParser, optional: bool = True) -> None:
    p.add_argument("model", nargs="?" if optional else None, default="demo",
                   help="HF directory, .gguf file, Meta checkpoint directory, or 'demo' (default)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: the checkpoint's own float dtype)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument("--rope-scaling", default=None,
                   choices=["linear", "ntk", "dynamic", "yarn", "llama3", "ntk-margin", "ntk-yarn"],
                   help="extend the context with this RoPE scaling method")
    p.add_argument("--rope-factor", type=float, default=None, help="RoPE scaling factor s (e.g. 4)")
    p.add_argument("--original-context", type=int, default=None,
                   help="context length the model was trained with (default: its max_position_embeddings)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="maximum new tokens (default 256; with --images on, image tokens count too, so the default "
                        "then leaves room for images: 256 + 4 images' worth, within the context)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default 40; 0 = off)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 0.95)")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min-p × the top probability "
                                                             "(default 0.05)")
    g.add_argument("--repeat-penalty", type=float, default=None, help="repetition penalty (default 1.0 = off)")
    g.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same output")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _load_model(args):
    from . import load
    from .threads import set_threads

    if args.threads is not None:
        set_threads(args.threads)
    rope = None
    if args.rope_scaling:
        if args.rope_factor is None:
            raise FuselmError("--rope-scaling needs --rope-factor")
        rope = {"rope_type": args.rope_scaling, "factor": args.rope_factor}
        if args.original_context:
            rope["original_max_position_embeddings"] = args.original_context
    return load(args.model, dtype=args.dtype, rope_scaling=rope)


def _max_tokens(args, model) -> int:
    if args.max_tokens is not None:
        return args.max_tokens
    if getattr(args, "images", "off") == "on" and model.image_tokenizer is not None:
        h, w = model.image_tokenizer.grid
        return min(256 + 4 * (h * w + 2), model.config.max_position_embeddings)
    return 256


def _sampling_kwargs(args, model) -> dict:
    return dict(max_tokens=_max_tokens(args, model), temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repeat_penalty, seed=args.seed, stop=tuple(args.stop))


def cmd_generate(args) -> int:
    from .generation.render import run_generation

    model = _load_model(args)
    return run_generation(model, args.prompt, images=args.images, image_paths=args.image, out=args.out,
                          **_sampling_kwargs(args, model))


def cmd_chat(args) -> int:
    from .generation.render import run_chat

    model = _load_model(args)
    return run_chat(model, system=args.system, **_sampling_kwargs(args, model))


def cmd_inspect(args) -> int:
    from .inspect import describe

    print(describe(args.model, verbose=args.verbose))
    return 0


def cmd_demo(args) -> int:
    from .demo.showcase import run_showcase

    return run_showcase(Path(args.out), seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuselm", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("generate", help="generate text (and images) from a prompt, streaming", formatter_class=raw,
                       description="Generate from a prompt and stream the result to the terminal.\n\n"
                                   "With a Chameleon model, --images on lets the model draw pictures in its answer, "
                                   "--images only draws one picture for the prompt, and --out writes an HTML page "
                                   "(plus Markdown) with the pictures as PNG files beside it.")
    _add_model(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an input image, placed after the prompt text (repeatable; Chameleon models)")
    p.add_argument("--images", choices=["on", "off", "only"], default="off",
                   help="may the model draw images: on, off (default), only (one image, no text)")
    p.add_argument("--out", default=None, help="write an interleaved HTML document here (e.g. story.html)")
    _add_sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat using the model's chat template",
                       formatter_class=raw,
                       description="Chat in the terminal. The model's own chat template is used when it ships one; "
                                   "otherwise a built-in one (Chameleon, Alfred/Falcon, Llama-3) chosen from the "
                                   "vocabulary. Type /reset to start over, /quit (or Ctrl-D) to leave.")
    _add_model(p)
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling(p)
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


if __name__ == "__main__":
    sys.exit(main())
