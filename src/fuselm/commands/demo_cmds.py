"""`fuselm train-demo` and `fuselm eval-demo`: train the bundled demo model, and measure its quality."""

from __future__ import annotations

import argparse
from pathlib import Path

RAW = argparse.RawDescriptionHelpFormatter

HELP_TRAIN = """\
Train the bundled demo model from scratch on the CPU: a small Chameleon VQGAN (VQ-VAE losses) and a small
Chameleon decoder with qk-norm over a BPE vocab, on the procedural picture world (caption -> image,
image -> caption, interleaved documents). Writes demo.gguf, demo-vqgan.gguf, tokenizer.json and TRAINING.md.

The step counts are fixed, so the same seed gives the same weights on the same machine type and thread count
(2 threads). --minutes only stops a run that would take longer, and TRAINING.md then says so.

examples:
  fuselm train-demo --seed 0                      replace the shipped model (src/fuselm/demo/weights/)
  fuselm train-demo --out-dir /tmp/demo-model     train elsewhere; load it with fuselm.load('/tmp/demo-model')
"""

HELP_EVAL = """\
The demo model's quality table: caption accuracy on n held-out pictures and drawn-image correctness on n
held-out captions (judged by the world's non-learned picture checker), with the time per picture, for the model
and for its Q8_0, Q4_K_M and Q4_0 quantizations and its FlashNorm-folded version.

examples:
  fuselm eval-demo                       the shipped model, n = 200
  fuselm eval-demo --n 50 --only Q8_0    a quick look at one quantization
"""


def cmd_train_demo(args) -> int:
    from ..demo.train import train_demo
    from ..loader import DEMO_DIR

    train_demo(Path(args.out_dir) if args.out_dir else DEMO_DIR, seed=args.seed, minutes=args.minutes)
    return 0


def cmd_eval_demo(args) -> int:
    from ..evals.demo_quality import QUANT_TYPES, format_table, quality_table
    from ..threads import set_threads

    if args.threads is not None:
        set_threads(args.threads)
    variants = tuple(args.only) if args.only else (*QUANT_TYPES, "flashnorm")
    rows = quality_table(args.model, n=args.n, seed=args.seed, variants=variants)
    print(format_table(rows, args.n))
    return 0


def register(sub) -> None:
    p = sub.add_parser("train-demo", help="train the bundled demo model (CPU, about 10-20 minutes on 2 cores)",
                       description=HELP_TRAIN, formatter_class=RAW)
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out-dir", default=None, help="output directory (default: the shipped src/fuselm/demo/weights)")
    p.add_argument("--minutes", type=float, default=30.0,
                   help="stop the decoder's training early after this many minutes in all (default 30)")
    p.set_defaults(func=cmd_train_demo)

    p = sub.add_parser("eval-demo", help="the demo model's quality table (captioning, drawing, quantizations)",
                       description=HELP_EVAL, formatter_class=RAW)
    p.add_argument("--model", default="demo", help="model to evaluate (default: the bundled demo model)")
    p.add_argument("--n", type=int, default=200, help="held-out pictures and captions each (default 200)")
    p.add_argument("--seed", type=int, default=0, help="which held-out scenes are drawn (default 0)")
    p.add_argument("--only", action="append", choices=["Q8_0", "Q4_K_M", "Q4_0", "flashnorm"], default=None,
                   help="evaluate only these variants besides the model itself (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    p.set_defaults(func=cmd_eval_demo)
