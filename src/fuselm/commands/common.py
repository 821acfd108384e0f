"""Arguments and model loading shared by the commands that run a model."""

from __future__ import annotations

import argparse

from ..errors import FuselmError


def add_model_args(p: argparse.ArgumentParser, optional: bool = True) -> None:
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


def add_sampling_args(p: argparse.ArgumentParser) -> None:
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


def load_model_from_args(args):
    from ..threads import set_threads
    from .tensor_parallel import load_for_command

    if args.threads is not None:
        set_threads(args.threads)
    rope = None
    if args.rope_scaling:
        if args.rope_factor is None:
            raise FuselmError("--rope-scaling needs --rope-factor")
        rope = {"rope_type": args.rope_scaling, "factor": args.rope_factor}
        if args.original_context:
            rope["original_max_position_embeddings"] = args.original_context
    return load_for_command(args.model, dtype=args.dtype, rope_scaling=rope)


def max_tokens_from_args(args, model) -> int:
    if args.max_tokens is not None:
        return args.max_tokens
    if getattr(args, "images", "off") == "on" and model.image_tokenizer is not None:
        h, w = model.image_tokenizer.grid
        return min(256 + 4 * (h * w + 2), model.config.max_position_embeddings)
    return 256


def sampling_kwargs_from_args(args, model) -> dict:
    return dict(max_tokens=max_tokens_from_args(args, model), temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repeat_penalty, seed=args.seed, stop=tuple(args.stop))
