"""`fuselm flashify | regroup-qknorm | convert`: checkpoint transforms from files to files."""

from __future__ import annotations

import argparse
import sys

from ..reshape.checkpoint import convert_model, flashify_model, regroup_model

RAW = argparse.RawDescriptionHelpFormatter


def cmd_flashify(args) -> int:
    out, report = flashify_model(args.src, args.out, strict=args.strict, fmt=args.format)
    for line in report:
        print(line, file=sys.stderr)
    print(f"wrote {out} ({'strict' if args.strict else 'compat'} mode)")
    return 0


def cmd_regroup(args) -> int:
    out, deviation = regroup_model(args.src, args.out, args.groups, average=args.average, fmt=args.format)
    if deviation is not None:
        print(f"averaged heads within groups (max deviation {deviation:.3g})", file=sys.stderr)
    print(f"wrote {out}")
    return 0


def cmd_convert(args) -> int:
    out, report = convert_model(args.meta_dir, args.out, qk_norm=args.qk_norm, fmt=args.format)
    for line in report:
        print(line, file=sys.stderr)
    print(f"wrote {out}")
    return 0


def register(sub) -> None:
    from ..load.meta import HELP_CONVERT, HELP_CONVERT_QK_NORM
    from ..transforms.flashnorm import HELP_FLASHIFY, HELP_FLASHIFY_STRICT
    from ..transforms.qknorm import HELP_REGROUP_AVERAGE, HELP_REGROUP_GROUPS, HELP_REGROUP_QKNORM

    fmt_help = "output format: hf (a directory) or gguf (default: gguf when OUT ends in .gguf, else hf)"
    p = sub.add_parser("flashify", help="fold norm weights into the following linears (FlashNorm)",
                       description=HELP_FLASHIFY, formatter_class=RAW)
    p.add_argument("src", help="HF directory or .gguf")
    p.add_argument("out", help="output directory (hf) or .gguf file")
    p.add_argument("--strict", action="store_true", help=HELP_FLASHIFY_STRICT)
    p.add_argument("--format", choices=["hf", "gguf"], default=None, help=fmt_help)
    p.set_defaults(func=cmd_flashify)

    p = sub.add_parser("regroup-qknorm", help="convert Chameleon qk-norm weights between per-head and grouped",
                       description=HELP_REGROUP_QKNORM, formatter_class=RAW)
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--groups", required=True, help=HELP_REGROUP_GROUPS)
    p.add_argument("--average", action="store_true", help=HELP_REGROUP_AVERAGE)
    p.add_argument("--format", choices=["hf", "gguf"], default=None, help=fmt_help)
    p.set_defaults(func=cmd_regroup)

    p = sub.add_parser("convert", help="convert Meta's original Chameleon release to an HF directory",
                       description=HELP_CONVERT, formatter_class=RAW)
    p.add_argument("meta_dir", help="Meta checkpoint directory (params.json + consolidated*.pth)")
    p.add_argument("out")
    p.add_argument("--qk-norm", choices=["per-head", "grouped"], default="per-head", help=HELP_CONVERT_QK_NORM)
    p.add_argument("--format", choices=["hf", "gguf"], default=None, help=fmt_help)
    p.set_defaults(func=cmd_convert)
