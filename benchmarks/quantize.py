"""fuselm vs llama.cpp quantizing the same TinyLlama-1.1B-shape F16 GGUF, side by side in one run.

    python benchmarks/quantize.py [--types Q4_K_M,Q8_0,Q4_0] [--layers 22] [--threads 2]

Random weights (dim 2048, 22 layers, 32/4 heads, ffn 5632, vocab 32000). Prints each tool's wall time, the
fuselm/llama.cpp time ratio, and whether the two output files hold identical tensor bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_f16_gguf(path: Path, layers: int) -> None:
    from fuselm import archs
    from fuselm.archs import write_gguf
    from fuselm.config import ModelConfig
    from fuselm.model.transformer import Transformer

    config = ModelConfig(arch="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=64,
                         max_position_embeddings=2048)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)

    def lazy(shape):
        def produce():
            if len(shape) == 1:
                return torch.ones(shape)
            return (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
        return produce

    placeholder = {k: torch.empty(0) for k in shapes}
    names = archs.internal_to_gguf(config, placeholder)  # only the names; layouts don't matter for random data
    inverse = dict(zip(names, shapes.values()))
    tensors = {name: (lazy(shape), "F16" if len(shape) == 2 else "F32", shape) for name, shape in inverse.items()}
    write_gguf(path, config, tensors, progress=True)


def llama_cpp_quantize(src: Path, dst: Path, ftype: str, threads: int) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc:
        raise RuntimeError(f"llama.cpp quantize failed with {rc}")
    return time.perf_counter() - t0


def fuselm_quantize(src: Path, dst: Path, ftype: str, threads: int) -> float:
    from fuselm.reshape import quantize_model
    from fuselm.threads import set_threads

    set_threads(threads)
    t0 = time.perf_counter()
    quantize_model(src, dst, ftype, progress=False)
    return time.perf_counter() - t0


def same_bytes(a: Path, b: Path) -> bool:
    from fuselm.formats.gguf import read_gguf

    ta, tb = read_gguf(a).tensors, read_gguf(b).tensors
    return sorted(ta) == sorted(tb) and all(
        ta[n].type_name == tb[n].type_name and np.array_equal(ta[n].data.view(np.uint8), tb[n].data.view(np.uint8))
        for n in ta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="Q4_K_M,Q8_0,Q4_0")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where to put the GGUF files (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = Path(tmp) / "tinyllama-f16.gguf"
        make_f16_gguf(src, args.layers)
        print(f"source: {src.stat().st_size / 2**30:.2f} GiB F16, {args.threads} threads")
        print(f"{'type':<8} {'llama.cpp s':>12} {'fuselm s':>10} {'ratio':>7}  identical bytes")
        for ftype in args.types.split(","):
            theirs, ours = Path(tmp) / f"theirs-{ftype}.gguf", Path(tmp) / f"ours-{ftype}.gguf"
            t_ref = llama_cpp_quantize(src, theirs, ftype, args.threads)
            t_ours = fuselm_quantize(src, ours, ftype, args.threads)
            print(f"{ftype:<8} {t_ref:>12.1f} {t_ours:>10.1f} {t_ours / t_ref:>6.2f}x  {same_bytes(ours, theirs)}",
                  flush=True)
            theirs.unlink()
            ours.unlink()


if __name__ == "__main__":
    main()
