"""`fuselm imatrix MODEL --text FILE -o imatrix.gguf`: importance matrices as llama.cpp's llama-imatrix makes them."""

from __future__ import annotations

import argparse
import math
import time

HELP = """\
Compute an importance matrix for quantization, as llama.cpp's llama-imatrix does: the model runs over the text
in chunks of --ctx tokens, and for every weight matrix the sum of squared input activations and the token count
are collected. The output is llama.cpp's GGUF imatrix format (llama-quantize --imatrix reads it too).

The perplexity of each chunk's second half is printed as the run goes, as llama-imatrix prints it.

examples:
  fuselm imatrix model-f16.gguf --text wiki.train.txt -o imatrix.gguf --chunks 100
  fuselm quantize model-f16.gguf model-iq2xs.gguf --type IQ2_XS --imatrix imatrix.gguf
"""


def cmd_imatrix(args) -> int:
    from ..evals.imatrix import compute_imatrix
    from ..threads import set_threads

    if args.threads is not None:
        set_threads(args.threads)
    t0 = time.perf_counter()
    result = compute_imatrix(args.model, args.text, args.output, ctx=args.ctx, chunks=args.chunks,
                             process_output=args.process_output)
    err = "" if math.isnan(result.ppl_error) else f" +/- {result.ppl_error:.5f}"
    print(f"Final estimate: PPL = {result.ppl:.4f}{err}")
    print(f"wrote {args.output}: {len(result.entries)} entries, {result.chunks} chunks of {result.chunk_size} tokens "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("imatrix", help="compute an importance matrix for quantization (llama-imatrix's format)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="HF directory, .gguf file (quantized weights are dequantized) or 'demo'")
    p.add_argument("--text", required=True, help="UTF-8 text file to run the model over")
    p.add_argument("-o", "--output", default="imatrix.gguf", help="output file (default imatrix.gguf)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512, as llama-imatrix)")
    p.add_argument("--chunks", type=int, default=None, help="at most this many chunks (default: all the text)")
    p.add_argument("--process-output", action="store_true", help="also collect output.weight")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    p.set_defaults(func=cmd_imatrix)
