"""`fuselm demo train` and `fuselm demo eval`: train the bundled demo model, and measure its quality."""

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
  fuselm demo train --seed 0                      replace the shipped model (src/fuselm/demo/weights/)
  fuselm demo train --out-dir /tmp/demo-model     train elsewhere; load it with fuselm.load('/tmp/demo-model')
"""


def cmd_train_demo(args) -> int:
    from ..demo.train import train_demo
    from ..load import DEMO_DIR

    train_demo(Path(args.out_dir) if args.out_dir else DEMO_DIR, seed=args.seed, minutes=args.minutes)
    return 0


def _train_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="train the bundled demo model (CPU, about 8-20 minutes on 2 cores)",
                       description=HELP_TRAIN, formatter_class=RAW)
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out-dir", default=None, help="output directory (default: the shipped src/fuselm/demo/weights)")
    p.add_argument("--minutes", type=float, default=60.0,
                   help="stop the decoder's training early after this many minutes in all (default 60)")
    p.set_defaults(func=cmd_train_demo)


def _eval_parser(sub, name: str) -> None:
    from ..demo import quality as demo_quality

    p = sub.add_parser(name, help="the demo model's quality table (captioning, drawing, quantizations)",
                       description=demo_quality.DESCRIPTION, formatter_class=RAW)
    demo_quality.add_arguments(p)
    p.set_defaults(func=demo_quality.run)


def register_actions(sub) -> None:
    """`fuselm demo train` and `fuselm demo eval`."""
    _train_parser(sub, "train")
    _eval_parser(sub, "eval")
