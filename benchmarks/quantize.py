"""fuselm vs llama.cpp quantizing the same TinyLlama-1.1B-shape F16 GGUF, side by side in one run.

    python benchmarks/quantize.py [--types Q4_K_M,Q8_0] [--layers 22] [--threads 2]

Random weights (dim 2048, 22 layers, 32/4 heads, ffn 5632, vocab 32000). Every llama-quantize file type by
default. Prints each tool's wall time (llama.cpp: llama_model_quantize), the fuselm/llama.cpp time ratio, and
whether the two output files are identical byte for byte; exits non-zero when any pair differs. File types that
need an importance matrix get the same generated one on both sides; a type fuselm cannot write yet is listed
with the reason.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


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


IMATRIX_TYPES = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S"}


def make_imatrix(src: Path, path: Path) -> dict[str, np.ndarray]:
    """A random importance matrix for every blk.* matrix; the vectors llama-quantize derives from it."""
    from fuselm.formats.gguf import read_gguf
    from fuselm.formats.imatrix import ImatrixEntry, read_imatrix, write_imatrix

    rng = np.random.default_rng(1)
    entries = {n: ImatrixEntry(rng.random((1, t.shape[-1]), np.float32) * 512, np.array([512], np.int64))
               for n, t in read_gguf(src).tensors.items() if n.startswith("blk.") and len(t.shape) == 2}
    write_imatrix(path, entries, datasets=("random",), chunk_count=1, chunk_size=512)
    return read_imatrix(path).importance()


def llama_cpp_quantize(src: Path, dst: Path, ftype: str, threads: int, imatrix: dict | None) -> float:
    from llama_quantize_ref import llama_quantize

    t0 = time.perf_counter()
    llama_quantize(src, dst, ftype, nthread=threads, imatrix=imatrix)
    return time.perf_counter() - t0


def fuselm_quantize(src: Path, dst: Path, ftype: str, threads: int, imatrix: Path | None) -> float:
    from fuselm.reshape import quantize_model
    from fuselm.threads import set_threads

    set_threads(threads)
    t0 = time.perf_counter()
    quantize_model(src, dst, ftype, progress=False, imatrix=imatrix)
    return time.perf_counter() - t0


def same_tensors(a: Path, b: Path) -> bool:
    from fuselm.formats.gguf import read_gguf

    ta, tb = read_gguf(a).tensors, read_gguf(b).tensors
    return list(ta) == list(tb) and all(
        ta[n].type_name == tb[n].type_name and np.array_equal(ta[n].data.view(np.uint8), tb[n].data.view(np.uint8))
        for n in ta)


def main() -> None:
    from fuselm.errors import FuselmError
    from fuselm.quants.mixes import FTYPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default=",".join(f for f in FTYPES if f not in ("F32", "F16", "BF16")))
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where to put the GGUF files (default: a temp dir)")
    args = parser.parse_args()
    differ = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = Path(tmp) / "tinyllama-f16.gguf"
        make_f16_gguf(src, args.layers)
        imatrix_path = Path(tmp) / "imatrix.gguf"
        vectors = make_imatrix(src, imatrix_path)
        print(f"source: {src.stat().st_size / 2**30:.2f} GiB F16, {args.layers} layers, {args.threads} threads")
        print(f"{'type':<10} {'llama.cpp s':>12} {'fuselm s':>10} {'ratio':>7}  bytes")
        for ftype in args.types.split(","):
            theirs, ours = Path(tmp) / f"theirs-{ftype}.gguf", Path(tmp) / f"ours-{ftype}.gguf"
            needs = ftype in IMATRIX_TYPES
            t_ref = llama_cpp_quantize(src, theirs, ftype, args.threads, vectors if needs else None)
            try:
                t_ours = fuselm_quantize(src, ours, ftype, args.threads, imatrix_path if needs else None)
            except (FuselmError, KeyError, TypeError) as err:
                print(f"{ftype:<10} {t_ref:>12.1f} {'n/a':>10} {'':>7}  fuselm cannot write it yet: {err}", flush=True)
                theirs.unlink()
                continue
            # whole files differ by the quantize.imatrix.* keys llama-quantize's CLI adds; compare tensors then
            same = same_tensors(ours, theirs) if needs else ours.read_bytes() == theirs.read_bytes()
            if not same:
                differ.append(ftype)
            label = ("identical tensors" if needs else "identical file") if same else "DIFFER"
            print(f"{ftype:<10} {t_ref:>12.1f} {t_ours:>10.1f} {t_ours / t_ref:>6.2f}x  {label}", flush=True)
            theirs.unlink()
            ours.unlink()
    if differ:
        sys.exit(f"bytes differ for {', '.join(differ)}")


if __name__ == "__main__":
    main()
