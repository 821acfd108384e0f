"""`fuselm quantize SRC OUT.gguf --type Q4_K_M`: llama-quantize's mixes and controls, our bit-exact codecs."""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import FuselmError
from ..quants.mixes import FTYPES
from ..reshape.quantize import parse_split_size, quantize_model, summary_table

HELP = """\
Quantize a model to GGUF with llama.cpp's per-tensor type mixes, bit-exact with llama.cpp's quantizer.

SRC is an HF directory or a GGUF with F32/F16/BF16 weights (a quantized GGUF is requantized, with a warning:
quality drops twice). OUT is written atomically: an interrupted run leaves no file. For a Chameleon model the
image tokenizer goes into a companion OUT-vqgan.gguf, because llama.cpp rejects unknown tensors in the main file.

Types (case-insensitive; Q3_K, Q4_K, Q5_K mean their _M mix): {types}.
Rows whose length is not a multiple of 256 (Falcon-7B: 4544) fall back as llama.cpp does (Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, IQ types -> IQ4_NL), and each fallback is reported.
IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS (and Q2_K_S) need an importance matrix: --imatrix FILE.

examples:
  fuselm quantize ./TinyLlama-1.1B tinyllama-q4km.gguf --type q4_k_m
  fuselm quantize model-f16.gguf model-q8.gguf --type Q8_0 --leave-output-tensor
  fuselm imatrix model-f16.gguf --text wiki.txt -o imatrix.gguf
  fuselm quantize model-f16.gguf model-iq2xs.gguf --type IQ2_XS --imatrix imatrix.gguf
  fuselm quantize model-f16.gguf model.gguf --type Q4_K_M --tensor-type 'attn_v=q8_0' --output-tensor-type q8_0
  fuselm quantize model-f16.gguf model.gguf --type Q4_K_M --split-max-size 2G
"""


def parse_tensor_type(text: str) -> tuple[str, str]:
    """llama-quantize's --tensor-type REGEX=TYPE (the pattern is lower-cased, as llama-quantize does)."""
    pattern, sep, type_ = text.partition("=")
    if not sep or not pattern or not type_:
        raise FuselmError(f"--tensor-type {text!r}: expected REGEX=TYPE, e.g. 'attn_v=q8_0'")
    return pattern.lower(), type_.upper()


def parse_kv_override(text: str) -> tuple[str, int | float | bool | str]:
    """llama.cpp's --override-kv KEY=TYPE:VALUE with TYPE int, float, bool (true/false) or str."""
    key, sep, rest = text.partition("=")
    kind, colon, value = rest.partition(":")
    if not sep or not key or not colon:
        raise FuselmError(f"--override-kv {text!r}: expected KEY=TYPE:VALUE with TYPE int, float, bool or str")
    try:
        if kind == "int":
            return key, int(value)
        if kind == "float":
            return key, float(value)
    except ValueError:
        raise FuselmError(f"--override-kv {text!r}: {value!r} is not a valid {kind}") from None
    if kind == "bool":
        if value not in ("true", "false"):
            raise FuselmError(f"--override-kv {text!r}: a bool is 'true' or 'false'")
        return key, value == "true"
    if kind == "str":
        return key, value
    raise FuselmError(f"--override-kv {text!r}: unknown type {kind!r}; expected int, float, bool or str")


def cmd_quantize(args) -> int:
    t0 = time.perf_counter()
    reports, fallbacks = quantize_model(
        args.src, args.out, args.type, pure=args.pure, leave_output_tensor=args.leave_output_tensor,
        output_tensor_type=args.output_tensor_type, token_embedding_type=args.token_embedding_type,
        tensor_types=[parse_tensor_type(t) for t in args.tensor_type],
        kv_overrides=[parse_kv_override(o) for o in args.override_kv], imatrix=args.imatrix,
        split_max_bytes=None if args.split_max_size is None else parse_split_size(args.split_max_size),
        split_max_tensors=args.split_max_tensors)
    if fallbacks:
        print(fallbacks, file=sys.stderr)
    print(summary_table(reports))
    shards = " as gguf-split shards (-00001-of-...)" if args.split_max_size or args.split_max_tensors else ""
    print(f"wrote {args.out}{shards} in {time.perf_counter() - t0:.1f}s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model to GGUF (llama.cpp's mixes, bit-exact)",
                       description=HELP.format(types=", ".join(FTYPES)),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="HF directory or .gguf (F32/F16/BF16)")
    p.add_argument("out", help="output .gguf path (with a split limit: OUT-0000k-of-0000n.gguf)")
    p.add_argument("--type", default="Q4_K_M", help="file type, case-insensitive (default Q4_K_M)")
    p.add_argument("--pure", action="store_true", help="one type for every quantizable tensor: no mix bumps")
    p.add_argument("--leave-output-tensor", action="store_true", help="keep output.weight unquantized")
    p.add_argument("--output-tensor-type", metavar="TYPE", help="GGML type for output.weight")
    p.add_argument("--token-embedding-type", metavar="TYPE", help="GGML type for token_embd.weight")
    p.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="GGML type for tensors whose name matches REGEX (repeatable; the first match wins)")
    p.add_argument("--override-kv", action="append", default=[], metavar="KEY=TYPE:VALUE",
                   help="set a metadata key; TYPE is int, float, bool or str (repeatable)")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix (GGUF or legacy .dat) from `fuselm imatrix` "
                                                     "or llama-imatrix")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--split-max-size", metavar="N(M|G)", help="write gguf-split shards of at most this many "
                                                              "tensor bytes (M = 10^6, G = 10^9)")
    g.add_argument("--split-max-tensors", type=int, metavar="N", help="write gguf-split shards of N tensors")
    p.set_defaults(func=cmd_quantize)
