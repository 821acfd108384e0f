"""`fuselm quantize SRC OUT.gguf --type Q4_K_M`: llama.cpp's mixes, our bit-exact codecs, one atomic GGUF."""

from __future__ import annotations

import argparse
import sys
import time

from ..quants.mixes import FTYPES
from ..reshape.quantize import quantize_model, summary_table

HELP = """\
Quantize a model to GGUF with llama.cpp's per-tensor type mixes, bit-exact with llama.cpp's quantizer.

SRC is an HF directory or a GGUF with F32/F16/BF16 weights (a quantized GGUF is requantized, with a warning:
quality drops twice). OUT is written atomically: an interrupted run leaves no file. For a Chameleon model the
image tokenizer goes into a companion OUT-vqgan.gguf, because llama.cpp rejects unknown tensors in the main file.

Types: {types}.
Rows whose length is not a multiple of 256 (Falcon-7B: 4544) fall back as llama.cpp does (Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0), and each fallback is reported.

examples:
  fuselm quantize ./TinyLlama-1.1B tinyllama-q4km.gguf --type Q4_K_M
  fuselm quantize model-f16.gguf model-q8.gguf --type Q8_0 --leave-output-tensor
"""


def cmd_quantize(args) -> int:
    t0 = time.perf_counter()
    reports, fallbacks = quantize_model(args.src, args.out, args.type, pure=args.pure,
                                        leave_output_tensor=args.leave_output_tensor)
    if fallbacks:
        print(fallbacks, file=sys.stderr)
    print(summary_table(reports))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model to GGUF (llama.cpp's mixes, bit-exact)",
                       description=HELP.format(types=", ".join(FTYPES)),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="HF directory or .gguf (F32/F16/BF16)")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--type", default="Q4_K_M", help="file type (default Q4_K_M)")
    p.add_argument("--pure", action="store_true", help="one type for every quantizable tensor: no mix bumps")
    p.add_argument("--leave-output-tensor", action="store_true", help="keep output.weight unquantized")
    p.set_defaults(func=cmd_quantize)
