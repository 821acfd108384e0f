"""`fuselm bench MODEL`: prefill and decode speed and peak memory, in the spirit of llama-bench."""

from __future__ import annotations

import argparse
import json
import time

import torch

HELP = """\
Measure prefill tok/s (one batched forward over the prompt), decode tok/s (batch 1, one token a step,
end-of-sequence ignored) and peak resident memory.

examples:
  fuselm bench model-q4km.gguf --prompt-tokens 128 --gen-tokens 64 --threads 2
  fuselm bench ./hf-model --dtype bfloat16 --json      # last line is a JSON object
"""


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_bench(model, prompt_tokens: int, gen_tokens: int, repeats: int = 1, seed: int = 0) -> dict:
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_tokens), generator=gen)
    best_prefill = best_decode = float("inf")
    with torch.inference_mode():
        model.transformer(prompt[:, :8])  # warm-up: first-call allocations and kernel selection
        for _ in range(repeats):
            cache = model.transformer.new_cache(1, prompt_tokens + gen_tokens + 1)
            t0 = time.perf_counter()
            logits = model.transformer(prompt, cache=cache, last_only=True)
            best_prefill = min(best_prefill, time.perf_counter() - t0)
            token = logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(gen_tokens):
                token = model.transformer(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
            best_decode = min(best_decode, time.perf_counter() - t0)
    return {"prefill_tok_s": prompt_tokens / best_prefill, "decode_tok_s": gen_tokens / best_decode,
            "peak_rss_mb": peak_rss_mb(), "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
            "threads": torch.get_num_threads()}


def cmd_bench(args) -> int:
    from ..threads import set_threads
    from .tensor_parallel import load_for_command

    if args.threads:
        set_threads(args.threads)
    model = load_for_command(args.model, dtype=args.dtype)
    r = run_bench(model, args.prompt_tokens, args.gen_tokens, repeats=args.repeats)
    from ..quants.gemm_dtype import prefill_dtype
    from ..quants.kernel_build import kernel_isa

    r["model"] = str(args.model)
    r["file_type"] = model.file_type
    mode = str(model.transformer.dtype).replace("torch.", "")
    r["accuracy_mode"] = f"{mode} residual" + (" (float32 is the default)" if mode != "float32" else "")
    r["kernels"], r["prefill_gemm"] = kernel_isa(), str(prefill_dtype()).replace("torch.", "")
    print(f"model {args.model} ({model.file_type}), {r['threads']} threads")
    print(f"accuracy mode: {r['accuracy_mode']}; kernels {r['kernels']}, prefill GEMM in {r['prefill_gemm']}")
    print(f"prefill {args.prompt_tokens} tokens: {r['prefill_tok_s']:.1f} tok/s")
    print(f"decode  {args.gen_tokens} tokens: {r['decode_tok_s']:.1f} tok/s")
    print(f"peak RSS: {r['peak_rss_mb']:.0f} MiB")
    if args.json:
        print(json.dumps(r))
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="prefill/decode tok/s and peak RSS", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="demo")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--repeats", type=int, default=1, help="best of N runs")
    p.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    p.set_defaults(func=cmd_bench)
