"""fuselm's GGML quantizers side by side with llama.cpp's (ggml_quantize_chunk via ctypes).

Quantizes a 5632x2048 and a 2048x2048 float32 tensor (TinyLlama ffn and attention shapes) to each type,
both with the same number of threads, checks the bytes are identical and prints the time ratio: the numpy codec
(the spec) and, where it has the type, the native quantizer (csrc/quantize.cpp) that `fuselm quantize` uses.

    python benchmarks/quantize_codecs.py [--threads 2] [--types Q4_K,Q6_K] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ggml_ref import ggml_quantize  # noqa: E402

from fuselm.quants import quantize  # noqa: E402
from fuselm.quants.native_quantize import native_quantize, native_types  # noqa: E402

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
SHAPES = [(5632, 2048), (2048, 2048)]


def best_time(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--repeat", type=int, default=2, help="best of N runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    data = {shape: (rng.standard_normal(shape) * 0.02).astype(np.float32) for shape in SHAPES}
    print(f"threads={args.threads}, best of {args.repeat}; ratio = fuselm time / llama.cpp time")
    native = native_types()
    print(f"{'type':8s} {'shape':>10s} {'llama.cpp s':>12s} {'numpy s':>10s} {'ratio':>7s} {'native s':>9s} "
          f"{'ratio':>7s}  bytes")
    for type_name in args.types.split(","):
        for shape, x in data.items():
            t_ref, ref = best_time(partial(ggml_quantize, x, type_name, threads=args.threads), args.repeat)
            xt = torch.from_numpy(x)
            t_ours, ours = best_time(partial(quantize, xt, type_name, threads=args.threads), args.repeat)
            same = np.array_equal(ours.numpy(), ref)
            nat = ""
            if type_name in native:
                t_nat, out = best_time(partial(native_quantize, x, type_name), args.repeat)
                same = same and np.array_equal(out, ref)
                nat = f"{t_nat:9.3f} {t_nat / t_ref:7.2f}"
            label = f"{shape[0]}x{shape[1]}"
            print(f"{type_name:8s} {label:>10s} {t_ref:12.3f} {t_ours:10.3f} {t_ours / t_ref:7.2f} {nat:>17s}  "
                  f"{'identical' if same else 'DIFFER'}", flush=True)


if __name__ == "__main__":
    main()
