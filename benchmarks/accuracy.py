"""Logit error of each accuracy mode: fuselm's default (float32 residual), `--dtype bfloat16`, and llama.cpp.

    python benchmarks/accuracy.py [--keep DIR] [--types F16,Q8_0,Q4_K_M] [--layers 22] [--tokens 40]

On benchmarks/decode.py's TinyLlama-shape GGUFs (random weights; written with fuselm's quantizer, bit-exact with
llama.cpp's), the reference is fuselm's own float32 computation on the same weights (every weight dequantized,
float32 throughout; it equals transformers to 1e-6). For a prompt of random token ids it prints, per file, the
relative RMS error of all positions' logits (RMS of the difference over RMS of the reference) for fuselm's default,
for `--dtype bfloat16` and for llama.cpp 0.3.36, and each fuselm mode's decode tok/s (`fuselm bench`'s
measurement, 32-token prompt, 32 tokens). tests/test_default_accuracy.py asserts the default's side of this on
small llama.cpp-made files.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import numpy as np

# isort: off
import fuselm  # first, as the CLI: passive OpenMP waiting is set before torch loads libgomp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode  # noqa: E402  (the model files)
# isort: on


def rel_rms(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


def llama_cpp_logits(path: Path, ids: list[int], threads: int) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + 8, n_batch=len(ids), logits_all=True,
                          verbose=False, n_threads=threads)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def fuselm_logits(path: Path, ids: list[int], **options) -> tuple[np.ndarray, float | None]:
    from fuselm.commands.bench import run_bench

    model = fuselm.load(path, **options)
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0].float().numpy()
    speed = None if options.get("dequantize_all") else run_bench(model, 32, 32, repeats=2)["decode_tok_s"]
    del model
    gc.collect()
    return logits, speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="F16,Q8_0,Q4_K_M")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", default=None, metavar="DIR", help="as in decode.py: keep and reuse the model files")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    types = args.types.split(",")
    ids = torch.randint(3, 31000, (args.tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        files = decode.model_files(types, args.layers, args.keep, Path(tmp))
        print(f"{args.tokens}-token prompt, {args.threads} threads; relative RMS of all logits vs fuselm float32 "
              "(weights dequantized); decode tok/s")
        print(f"{'type':<8} | {'default':>9} {'bfloat16':>9} {'llama.cpp':>9} | {'default tok/s':>13} "
              f"{'bfloat16 tok/s':>14}")
        for t in types:
            reference, _ = fuselm_logits(files[t], ids, dtype="float32", dequantize_all=True)
            default, s_default = fuselm_logits(files[t], ids)
            bf16, s_bf16 = fuselm_logits(files[t], ids, dtype="bfloat16")
            theirs = llama_cpp_logits(files[t], ids, args.threads)
            print(f"{t:<8} | {rel_rms(default, reference):>9.2e} {rel_rms(bf16, reference):>9.2e} "
                  f"{rel_rms(theirs, reference):>9.2e} | {s_default:>13.1f} {s_bf16:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
