"""`fuselm eval TASK ...`: passkey retrieval, sliding-window perplexity, RoPE methods side by side.

The demo model's quality table is `fuselm demo eval`."""

from __future__ import annotations

import argparse
import json
import re

from ..errors import FuselmError
from .tensor_parallel import load_for_command

HELP = """\
Offline evaluations on local files. TASK is one of:
  passkey   hide a five-digit key in filler text at a random depth, ask for it, decode greedily:
            accuracy per prompt length (the test of the YaRN paper and of LightOn's NTK-YaRN study)
  ppl       sliding-window perplexity of a text file
  compare   several RoPE scaling methods side by side: a table (stdout, .md, .csv) and a PNG plot

`fuselm eval TASK --help` explains each task's options.

examples:
  fuselm eval passkey ./Llama-2-7b --lengths 4k,8k,16k --rope yarn --rope-factor 4
  fuselm eval ppl ./Llama-2-7b --text book.txt --ctx 8192 --stride 256 --rope ntk-yarn --rope-factor 2
  fuselm eval compare ./Llama-2-7b --lengths 2k,4k,8k,16k --factor auto --text book.txt --out rope-cmp
"""

_ROPE_HELP = """\
RoPE scaling: --rope (compare: --methods) picks the method, --rope-factor (compare: --factor) the scale
s = target length / trained length, and --original-context the trained length (default: the checkpoint's).
Methods: none (plain RoPE, even if the
checkpoint configures a scaling), linear (position interpolation), ntk (base * s^(d/(d-2))), dynamic (NTK
recomputed for the current length), yarn (NTK-by-parts + attention temperature), llama3 (Llama-3.1 bands,
low/high freq factors 1 and 4), ntk-margin (base * (s+1)^(d/(d-2))), ntk-yarn (ntk-margin + q, k scaled by
1 + 0.1 ln s). Without --rope the checkpoint runs as configured. A factor of "auto" uses length / trained
length at each length (at least 1), reloading the model per length.
"""

LENGTH_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}


def parse_lengths(text: str) -> list[int]:
    """"1k,2k,1536" -> [1024, 2048, 1536] (k = 1024 tokens)."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", part)
        if not m:
            raise FuselmError(f"--lengths: {part!r} is not a length; expected numbers like 1k,2k,4096")
        n = int(float(m.group(1)) * LENGTH_UNITS[m.group(2).lower()])
        if n < 2:
            raise FuselmError(f"--lengths: {part!r} is below 2 tokens")
        out.append(n)
    return out


def parse_factor(text: str) -> float | None:
    """A number, or "auto" (None): length / trained length at each length."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise FuselmError(f"--factor/--rope-factor is {text!r}; expected a number such as 4, or auto") from None
    if not value > 0:
        raise FuselmError(f"--factor/--rope-factor is {text!r}; expected a number > 0")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF directory, .gguf file, Meta checkpoint directory, or 'demo'")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: the checkpoint's own float dtype)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument("--original-context", type=int, default=None, metavar="N",
                   help="the length the model was trained at (default: the checkpoint's)")


def _passkey_options(p: argparse.ArgumentParser) -> None:
    from ..evals.passkey import STYLES

    p.add_argument("--lengths", default="1k,2k,4k,8k",
                   help="lengths in tokens (prompt + answer), comma separated, k = 1024 (default 1k,2k,4k,8k)")
    p.add_argument("--trials", type=int, default=20, help="prompts per length (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed for keys and depths; the same seed gives the same "
                                                       "prompts to every method (default 0)")
    p.add_argument("--style", choices=sorted(STYLES), default="yarn",
                   help="prompt wording: yarn (the YaRN repository's, default) or compact (no task line)")


def _add_rope(p: argparse.ArgumentParser) -> None:
    from ..evals.compare import METHODS

    p.add_argument("--rope", "--rope-scaling", dest="rope", choices=METHODS, default=None,
                   help="RoPE scaling method (default: the checkpoint as configured)")
    p.add_argument("--rope-factor", default=None, metavar="S",
                   help="scale s = target length / trained length, or auto (= length / trained length)")


def _setup(args) -> None:
    if args.threads is not None:
        from ..threads import set_threads

        set_threads(args.threads)


def _method_and_factor(args) -> tuple[str, float | None]:
    from ..evals.compare import CHECKPOINT

    if args.rope is None:
        if args.rope_factor is not None:
            raise FuselmError("--rope-factor needs --rope (the method to scale with)")
        return CHECKPOINT, 1.0
    if args.rope == "none":
        return "none", 1.0
    if args.rope_factor is None:
        raise FuselmError(f"--rope {args.rope} needs --rope-factor (a number such as 4, or auto)")
    return args.rope, parse_factor(args.rope_factor)


def cmd_passkey(args) -> int:
    from ..evals.compare import compare_methods, format_table
    from ..evals.passkey import STYLES

    _setup(args)
    method, factor = _method_and_factor(args)
    result = compare_methods(args.model, [method], parse_lengths(args.lengths), factor=factor,
                             original_context=args.original_context, trials=args.trials, seed=args.seed,
                             style=STYLES[args.style], dtype=args.dtype, load=load_for_command)
    print(format_table(result.rows, result.original_context), end="")
    if args.json:
        print(json.dumps([{"length": r.length, "factor": r.factor, "accuracy": r.accuracy, "correct": r.correct,
                           "trials": r.trials} for r in result.rows]))
    return 0


def cmd_ppl(args) -> int:
    from ..evals.compare import CHECKPOINT, original_context_of, rope_scaling_for
    from ..evals.perplexity import encode_text_file, sliding_window_perplexity

    _setup(args)
    method, factor = _method_and_factor(args)
    scaling = None
    if method != CHECKPOINT:
        probe = load_for_command(args.model, dtype=args.dtype)
        original = args.original_context or original_context_of(probe.config)
        s = factor if factor is not None else max(1.0, args.ctx / original)
        scaling = rope_scaling_for(method, s, original)
        del probe
    model = load_for_command(args.model, dtype=args.dtype, rope_scaling=scaling)
    ids = encode_text_file(model, args.text)
    r = sliding_window_perplexity(model, ids, args.ctx, args.stride, progress=True)
    label = "" if scaling is None else f", rope {method}" + (f" s={scaling['factor']:g}" if method != "none" else "")
    print(f"perplexity {r.ppl:.4f} (mean NLL {r.nll:.4f} nats over {r.scored_tokens} tokens; {r.windows} windows "
          f"of {r.ctx} tokens, stride {r.stride}{label})")
    if args.json:
        print(json.dumps({"ppl": r.ppl, "nll": r.nll, "scored_tokens": r.scored_tokens, "windows": r.windows,
                          "ctx": r.ctx, "stride": r.stride, "rope_scaling": scaling}))
    return 0


def cmd_compare(args) -> int:
    from ..evals.compare import (
        METHODS,
        compare_methods,
        format_table,
        plot_comparison,
        require_matplotlib,
        write_tables,
    )
    from ..evals.passkey import STYLES

    _setup(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise FuselmError(f"--methods has {unknown or 'nothing'}; expected a comma list of {', '.join(METHODS)}")
    if args.no_passkey and not args.text:
        raise FuselmError("--no-passkey leaves nothing to measure without --text")
    if not args.no_plot:
        require_matplotlib()  # fail before the long evaluation, not after it
    lengths = parse_lengths(args.lengths)
    result = compare_methods(args.model, methods, lengths, factor=parse_factor(args.factor),
                             original_context=args.original_context, trials=args.trials, seed=args.seed,
                             style=STYLES[args.style], text=args.text, stride=args.stride,
                             passkey=not args.no_passkey, dtype=args.dtype, load=load_for_command)
    rows, original = result.rows, result.original_context
    preamble = (f"# RoPE scaling comparison: {args.model}\n\nfactor: {args.factor} "
                f"(auto = length / trained length); passkey style: {args.style}; seed {args.seed}"
                + (f"; perplexity text: {args.text}, stride {args.stride or 'length/2'}" if args.text else ""))
    md, csv_path = write_tables(rows, args.out, original_context=original, preamble=preamble)
    print(format_table(rows, original), end="")
    written = [md, csv_path]
    if not args.no_plot:
        written.append(plot_comparison(rows, f"{args.out}.png", original_context=original,
                                       title=f"RoPE scaling methods, {args.model}"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def register(sub) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("eval", help="evaluations: passkey, perplexity, RoPE comparison, demo quality",
                       description=HELP, formatter_class=raw)
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True

    t = tasks.add_parser("passkey", help="passkey retrieval accuracy per length", formatter_class=raw,
                         description="Passkey retrieval: filler text ('The grass is green. The sky is blue. ...') "
                                     "repeated to the requested length in tokens, with 'The pass key is NNNNN. "
                                     "Remember it.' at a random depth and 'What is the pass key? The pass key is' "
                                     "at the end. The model decodes greedily; a trial counts when the first "
                                     "number it writes is the key. Depths are spread evenly over the prompt, and "
                                     "the same seed gives the same prompts to every method.\n\n" + _ROPE_HELP
                                     + "\nexample:\n  fuselm eval passkey ./model --lengths 1k,2k,4k,8k "
                                       "--rope yarn --rope-factor 4 --trials 20")
    _common(t)
    _add_rope(t)
    _passkey_options(t)
    t.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    t.set_defaults(func=cmd_passkey)

    t = tasks.add_parser("ppl", help="sliding-window perplexity of a text file", formatter_class=raw,
                         description="Sliding-window perplexity (HF's strided method): windows of --ctx tokens "
                                     "start every --stride tokens, and each window scores only the tokens no "
                                     "earlier window scored, so every token gets at least ctx - stride tokens of "
                                     "context. stride = ctx is fastest (disjoint windows); a small stride (YaRN "
                                     "uses 256) is closest to 'every token sees a full window'.\n\n" + _ROPE_HELP
                                     + "\nexample:\n  fuselm eval ppl ./model --text book.txt --ctx 8192 "
                                       "--stride 1024 --rope ntk-yarn --rope-factor 4")
    _common(t)
    _add_rope(t)
    t.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to score")
    t.add_argument("--ctx", type=int, required=True, metavar="N", help="window length in tokens")
    t.add_argument("--stride", type=int, default=None, metavar="S", help="window step (default ctx/2)")
    t.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    t.set_defaults(func=cmd_ppl)

    from ..evals.compare import METHODS

    t = tasks.add_parser("compare", help="RoPE methods side by side: table and PNG plot", formatter_class=raw,
                         description="Run the passkey test (and the perplexity of --text with a window of each "
                                     "length) for every method in --methods, on the same prompts, and write "
                                     "OUT.md and OUT.csv (the table, also printed) and OUT.png (accuracy and "
                                     "perplexity against length, one line per method). The plot needs "
                                     "matplotlib (pip install 'fuselm[plot]').\n\n" + _ROPE_HELP
                                     + "\nexample:\n  fuselm eval compare ./model --methods none,linear,ntk,yarn,"
                                       "ntk-yarn --factor auto --lengths 2k,4k,8k --text book.txt --out cmp")
    _common(t)
    t.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma list of methods (default: all: {','.join(METHODS)})")
    t.add_argument("--factor", default="auto", metavar="S",
                   help="scale s for every method, or auto (default): length / trained length at each length")
    _passkey_options(t)
    t.add_argument("--text", default=None, metavar="FILE", help="also measure perplexity on this UTF-8 text")
    t.add_argument("--stride", type=int, default=None, metavar="S", help="perplexity window step (default length/2)")
    t.add_argument("--no-passkey", action="store_true", help="perplexity only (needs --text)")
    t.add_argument("--out", default="rope-compare", metavar="PREFIX",
                   help="output prefix: PREFIX.md, PREFIX.csv, PREFIX.png (default rope-compare)")
    t.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    t.set_defaults(func=cmd_compare)

