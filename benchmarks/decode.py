"""Decode and prefill speed and peak RSS: fuselm vs llama.cpp on the same GGUF files, plus transformers bf16.

    python benchmarks/decode.py [--types F16,Q8_0,Q4_0,Q4_K_M] [--layers 22] [--threads 2]

A TinyLlama-1.1B-shape model with random weights (dim 2048, 22 layers, 32/4 heads, ffn 5632, vocab 32000), its
vocabulary taken from llama.cpp's models/ggml-vocab-llama-spm.gguf (llama-cpp-python sdist, see the Makefile).
Files are written with fuselm's own quantizer (bit-exact with llama.cpp's). Every measurement runs in a fresh
process so that peak RSS is its own; each process times three prompt + decode windows and keeps the fastest.
Prints prefill tok/s (128-token prompt), decode tok/s (64 tokens, batch 1), the decode roofline (the memory
read bandwidth measured in the same run over the weight bytes one decode step must read) and each engine's share
of it, and peak RSS, each as a fuselm / llama.cpp ratio, and peak RSS over the file size, whole and less the process's
resident memory before loading (Python, torch or llama.cpp's library: about 220 MiB for fuselm).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ROOT / ".venv/llama-sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"


def make_files(workdir: Path, types: list[str], layers: int) -> dict[str, Path]:
    from fuselm import archs
    from fuselm.archs import write_gguf
    from fuselm.config import ModelConfig
    from fuselm.formats.gguf import read_gguf
    from fuselm.formats.hf import write_hf_dir
    from fuselm.model.transformer import Transformer
    from fuselm.reshape import quantize_model

    config = ModelConfig(arch="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=64,
                         max_position_embeddings=2048, norm_eps=1e-5, bos_token_id=1, eos_token_ids=(2,))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) if len(s) == 2 else torch.ones(s)
             for k, s in shapes.items()}
    hf_dir = workdir / "hf-bf16"
    write_hf_dir(hf_dir, {**archs.config_to_hf(config), "torch_dtype": "bfloat16"}, archs.internal_to_hf(config, state))
    vocab = {k: v for k, v in read_gguf(VOCAB).metadata.items() if k.startswith("tokenizer.")}
    files = {"F16": workdir / "model-F16.gguf"}
    tensors = {n: (t.to(torch.float16) if t.ndim == 2 else t.float(), "F16" if t.ndim == 2 else "F32")
               for n, t in archs.internal_to_gguf(config, state).items()}
    write_gguf(files["F16"], config, tensors, tokenizer=vocab, progress=False)
    del state, tensors
    for t in types:
        if t != "F16":
            files[t] = workdir / f"model-{t}.gguf"
            quantize_model(files["F16"], files[t], t, progress=False)
    files["hf"] = hf_dir
    return files


def kept_files(folder: Path, types: list[str], layers: int) -> dict[str, Path]:
    """make_files into folder/<layers>-layers once; later runs reuse what is there (a stamp marks completion)."""
    folder = folder / f"{layers}-layers"
    stamp = folder / ("done-" + "-".join(sorted(types)))
    if not stamp.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        files = make_files(folder, types, layers)
        stamp.write_text("\n".join(f"{k} {v.name}" for k, v in files.items()))
    return {k: folder / name for k, name in (line.split(" ", 1) for line in stamp.read_text().splitlines())}


def model_files(types: list[str], layers: int, keep: str | None, scratch: Path) -> dict[str, Path]:
    """The benchmark's model files: kept in (and reused from) `keep` when given, else written into `scratch`."""
    if not VOCAB.is_file():
        sys.exit(f"missing {VOCAB}: run `make .venv/llama-sdist/.ok` first")
    return kept_files(Path(keep), types, layers) if keep else make_files(scratch, types, layers)


WORKER = r"""
import json, sys, time
if sys.argv[1] == "fuselm":
    import fuselm  # first, as the CLI does: it sets passive OpenMP waiting before torch loads libgomp
import torch
kind, path, threads, n_prompt, n_gen = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
REPEATS = 3  # prompt + decode windows per process; the fastest counts (noise only ever slows a run down)
def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
def peak_mb():
    return status_mb("VmHWM")
torch.set_num_threads(threads)
prompt = torch.randint(3, 31000, (1, n_prompt), generator=torch.Generator().manual_seed(0))
if kind == "llama.cpp":
    import llama_cpp
    base = status_mb("VmRSS")
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    ids = prompt[0].tolist()
    llm.eval(ids[:8])
    prefill = decode = float("inf")
    for _ in range(REPEATS):
        llm.reset()
        t0 = time.perf_counter(); llm.eval(ids); prefill = min(prefill, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(n_gen):
            llm.eval([int(ids[i % len(ids)])])
        decode = min(decode, time.perf_counter() - t0)
elif kind == "transformers":
    from transformers import LlamaForCausalLM
    base = status_mb("VmRSS")
    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).eval()
    with torch.no_grad():
        model(prompt[:, :8])
        prefill = decode = float("inf")
        for _ in range(REPEATS):
            t0 = time.perf_counter(); out = model(prompt, use_cache=True)
            prefill = min(prefill, time.perf_counter() - t0)
            past = out.past_key_values; tok = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(n_gen):
                out = model(tok, past_key_values=past, use_cache=True); past = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
            decode = min(decode, time.perf_counter() - t0)
else:
    import fuselm
    from fuselm.commands.bench import run_bench
    from fuselm.quants.kernel_build import native_library
    native_library()
    base = status_mb("VmRSS")
    r = run_bench(fuselm.load(path), n_prompt, n_gen, repeats=REPEATS)
    prefill, decode = n_prompt / r["prefill_tok_s"], n_gen / r["decode_tok_s"]
print(json.dumps({"prefill_tok_s": n_prompt / prefill, "decode_tok_s": n_gen / decode, "peak_rss_mb": peak_mb(),
                  "base_rss_mb": base}))
"""


def measure(kind: str, path: Path, threads: int, n_prompt: int, n_gen: int) -> dict | None:
    proc = subprocess.run([sys.executable, "-c", WORKER, kind, str(path), str(threads), str(n_prompt), str(n_gen)],
                          capture_output=True, text=True)
    if proc.returncode:
        print(f"  {kind} on {path.name} failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


BANDWIDTH = r"""
import sys, time
import fuselm  # passive OpenMP waiting, as in the workers
import torch
torch.set_num_threads(int(sys.argv[1]))
x = torch.ones(1 << 28)  # 1 GiB of float32: far past any cache
best = float("inf")
for _ in range(7):
    t0 = time.perf_counter()
    x.sum()
    best = min(best, time.perf_counter() - t0)
print(x.numel() * 4 / best / 1e9)
"""


def read_bandwidth(threads: int) -> float:
    """GB/s of a streaming read of 1 GiB with `threads` threads (torch's sum, best of 7), in a fresh process."""
    out = subprocess.run([sys.executable, "-c", BANDWIDTH, str(threads)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bytes_per_token(path: Path) -> int:
    """Weight bytes one decode step reads: every tensor but the token embedding (one row of it is gathered)."""
    from fuselm.formats.gguf_read import read_gguf

    return sum(t.data.nbytes for name, t in read_gguf(path).tensors.items() if name != "token_embd.weight")


def best_of(runs: list[dict | None]) -> dict | None:
    """Fastest speeds of the runs; memory of the first (it does not change between runs)."""
    runs = [r for r in runs if r]
    if not runs:
        return None
    return {**runs[0], "prefill_tok_s": max(r["prefill_tok_s"] for r in runs),
            "decode_tok_s": max(r["decode_tok_s"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="F16,Q8_0,Q4_0,Q4_K_M")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--workdir", default=None, help="where the temporary model files go (default: /tmp)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side per type; the best is shown")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="write the model files into DIR and keep them; reuse them when they are already there")
    args = parser.parse_args()
    types = args.types.split(",")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t0 = time.perf_counter()
        files = model_files(types, args.layers, args.keep, Path(tmp))
        print(f"model files written in {time.perf_counter() - t0:.0f}s; {args.threads} threads, "
              f"{args.prompt_tokens}-token prompt, {args.gen_tokens} decoded tokens", flush=True)
        ref = measure("transformers", files["hf"], args.threads, args.prompt_tokens, args.gen_tokens)
        if ref:
            print(f"transformers bf16: prefill {ref['prefill_tok_s']:.1f} tok/s, decode {ref['decode_tok_s']:.1f} "
                  f"tok/s, peak RSS {ref['peak_rss_mb']:.0f} MiB", flush=True)
        bandwidth = read_bandwidth(args.threads)
        print(f"memory read bandwidth ({args.threads} threads, 1 GiB): {bandwidth:.1f} GB/s; 'roof' = that over the "
              "weight bytes a decode step reads (all but the token embedding): the decode speed no engine can pass")
        header = (f"{'type':<8} {'file MiB':>9} | {'prefill f/l tok/s':>18} {'ratio':>6} | {'decode f/l tok/s':>17} "
                  f"{'ratio':>6} {'roof':>6} {'f/l of roof':>12} | {'RSS f/l MiB':>12} {'ratio':>6} {'RSS/file':>8} "
                  f"{'(RSS-base)/file f/l':>19}")
        print(header)
        for t in types:
            size = files[t].stat().st_size / 2**20
            runs = {"fuselm": [], "llama.cpp": []}
            for _ in range(args.rounds):  # alternating, so that both see the same spells of machine noise
                for kind in runs:
                    runs[kind].append(measure(kind, files[t], args.threads, args.prompt_tokens, args.gen_tokens))
            ours, theirs = (best_of(r) for r in runs.values())
            if not (ours and theirs):
                continue
            roof = bandwidth * 1e9 / bytes_per_token(files[t])
            print(f"{t:<8} {size:>9.0f} | {ours['prefill_tok_s']:>8.1f}/{theirs['prefill_tok_s']:<9.1f} "
                  f"{ours['prefill_tok_s'] / theirs['prefill_tok_s']:>5.2f}x | "
                  f"{ours['decode_tok_s']:>7.1f}/{theirs['decode_tok_s']:<9.1f} "
                  f"{ours['decode_tok_s'] / theirs['decode_tok_s']:>5.2f}x {roof:>6.1f} "
                  f"{ours['decode_tok_s'] / roof:>5.2f}/{theirs['decode_tok_s'] / roof:<6.2f} | "
                  f"{ours['peak_rss_mb']:>5.0f}/{theirs['peak_rss_mb']:<6.0f} "
                  f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:>5.2f}x {ours['peak_rss_mb'] / size:>7.2f} "
                  f"{(ours['peak_rss_mb'] - ours['base_rss_mb']) / size:>10.2f}/"
                  f"{(theirs['peak_rss_mb'] - theirs['base_rss_mb']) / size:<8.2f}", flush=True)


if __name__ == "__main__":
    main()
