"""Serving throughput as clients see it: fuselm serve vs llama.cpp's batched decoding, 1-8 concurrent streams.

    python benchmarks/serve.py [--model FILE.gguf | --keep DIR] [--layers 22] [--threads 2] [--streams 1,2,4,8]

The TinyLlama-1.1B-shape Q4_K_M model of benchmarks/decode.py (random weights; built once, or given with --model).
fuselm: `fuselm serve FILE --parallel 8` as a subprocess; each stream is a streamed /v1/completions request at
temperature 0 with its own prompt of random token ids, all sent at once. llama.cpp: llama-cpp-python's low-level
batch API in one process, one sequence per stream, all prompts prefilled in one batch, then one batched
llama_decode per step, greedy sampling from each sequence's logits.

Per level, printed for both: aggregate decode tok/s = sum(tokens - 1) / (last token arrival - first token arrival,
over all streams), single-stream rate (tokens - 1) / (its last - its first arrival), p50/p95 time to first token
(from sending to the first token), and whether every concurrent answer equals the same prompt's solo answer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(streams: list[dict]) -> dict:
    """streams: {"sent", "arrivals" (one time per token), "tokens" (ids or text)} -> the level's figures."""
    firsts = [s["arrivals"][0] for s in streams if s["arrivals"]]
    lasts = [s["arrivals"][-1] for s in streams if s["arrivals"]]
    decoded = sum(len(s["arrivals"]) - 1 for s in streams if s["arrivals"])
    span = max(lasts) - min(firsts) if firsts else 0.0
    single = [(len(s["arrivals"]) - 1) / (s["arrivals"][-1] - s["arrivals"][0]) for s in streams
              if len(s["arrivals"]) > 1 and s["arrivals"][-1] > s["arrivals"][0]]
    ttft = [s["arrivals"][0] - s["sent"] for s in streams if s["arrivals"]]
    return {"aggregate": decoded / span if span > 0 else float("nan"),
            "per_stream": statistics.median(single) if single else float("nan"),
            "ttft_p50": percentile(ttft, 50), "ttft_p95": percentile(ttft, 95)}


# ---- fuselm: a real server and real HTTP clients ------------------------------------------------------------

class Server:
    def __init__(self, model: Path, threads: int, parallel: int):
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        self.proc = subprocess.Popen([sys.executable, "-m", "fuselm", "serve", str(model), "--port", "0", "--threads",
                                      str(threads), "--parallel", str(parallel), "--alias", "bench", "--quiet"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in self.proc.stdout:
            match = re.search(r"serving \S+ on (http://\S+)", line)
            if match:
                self.url = match.group(1)
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                return
        raise RuntimeError("fuselm serve did not start")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def fuselm_stream(url: str, prompt: list[int], max_tokens: int, out: dict, start: threading.Barrier) -> None:
    import httpx

    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "logprobs": 0}
    start.wait()
    out["sent"], out["arrivals"], out["tokens"] = time.perf_counter(), [], []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            tokens = json.loads(line[6:])["choices"][0]["logprobs"]["tokens"]
            out["arrivals"] += [now] * len(tokens)  # tokens held back (incomplete UTF-8) arrive together
            out["tokens"] += tokens


def fuselm_level(url: str, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    outs = [{} for _ in prompts]
    start = threading.Barrier(len(prompts))
    threads = [threading.Thread(target=fuselm_stream, args=(url, p, max_tokens, o, start))
               for p, o in zip(prompts, outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs


# ---- llama.cpp: its batch API, one sequence per stream ------------------------------------------------------

class LlamaBatched:
    def __init__(self, model: Path, threads: int, max_streams: int, context: int):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(model).encode(), L.llama_model_default_params())
        params = L.llama_context_default_params()
        params.n_ctx = context * max_streams
        params.n_batch = params.n_ubatch = context * max_streams
        params.n_seq_max = max_streams
        params.n_threads = params.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, params)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(context * max_streams, 0, 1)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        row = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
        return int(row.argmax())

    def run(self, prompts: list[list[int]], max_tokens: int) -> list[dict]:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        sent = time.perf_counter()
        entries, last_index = [], []
        for s, p in enumerate(prompts):
            entries += [(t, j, s, j == len(p) - 1) for j, t in enumerate(p)]
            last_index.append(len(entries) - 1)
        self._decode(entries)
        tokens = [[self._argmax(i)] for i in last_index]
        now = time.perf_counter()
        arrivals = [[now] for _ in prompts]
        for _ in range(max_tokens - 1):
            self._decode([(tok[-1], len(p) + len(tok) - 1, s, True) for s, (p, tok) in enumerate(zip(prompts, tokens))])
            for s in range(len(prompts)):
                tokens[s].append(self._argmax(s))
            now = time.perf_counter()
            for a in arrivals:
                a.append(now)
        return [{"sent": sent, "arrivals": a, "tokens": t} for a, t in zip(arrivals, tokens)]


# ---- the run ------------------------------------------------------------------------------------------------

def model_file(args) -> Path:
    if args.model:
        return Path(args.model)
    import decode

    if args.vocab:
        decode.VOCAB = Path(args.vocab)
    if not decode.VOCAB.is_file():
        sys.exit(f"missing {decode.VOCAB}: run `make .venv/llama-sdist/.ok` or pass --vocab / --model")
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fuselm-serve-bench-"))
    return decode.kept_files(folder, ["Q4_K_M"], args.layers)["Q4_K_M"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a GGUF file to use instead of building the TinyLlama shape")
    parser.add_argument("--keep", default=None, metavar="DIR", help="build (or reuse) the model files in DIR")
    parser.add_argument("--vocab", default=None,
                        help="llama.cpp's ggml-vocab-llama-spm.gguf (default: benchmarks/decode.py's path)")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--gen-tokens", type=int, default=32)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a killed run still stops its server (finally below)
    levels = [int(n) for n in args.streams.split(",")]
    path = model_file(args)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 31000, args.prompt_tokens).tolist() for _ in range(max(levels))]
    print(f"{path.name}: {args.threads} threads, {args.prompt_tokens}-token prompts, {args.gen_tokens} tokens per "
          "stream, temperature 0", flush=True)

    results = {}
    server = Server(path, args.threads, max(levels))
    try:
        fuselm_level(server.url, prompts[:1], 4)  # warm-up
        solo = [fuselm_level(server.url, [p], args.gen_tokens)[0]["tokens"] for p in prompts]
        for n in levels:
            outs = fuselm_level(server.url, prompts[:n], args.gen_tokens)
            results["fuselm", n] = {**summarize(outs), "same": all(o["tokens"] == s for o, s in zip(outs, solo))}
    finally:
        server.close()

    llama = LlamaBatched(path, args.threads, max(levels), args.prompt_tokens + args.gen_tokens + 8)
    llama.run(prompts[:1], 4)  # warm-up
    solo = [llama.run([p], args.gen_tokens)[0]["tokens"] for p in prompts]
    for n in levels:
        outs = llama.run(prompts[:n], args.gen_tokens)
        results["llama.cpp", n] = {**summarize(outs), "same": all(o["tokens"] == s for o, s in zip(outs, solo))}

    print(f"{'streams':>7} | {'aggregate tok/s f / l':>22} {'ratio':>6} | {'per stream f / l':>17} | "
          f"{'TTFT p50 s f / l':>17} | {'TTFT p95 s f / l':>17} | same as solo f / l")
    for n in levels:
        f, ll = results["fuselm", n], results["llama.cpp", n]
        print(f"{n:>7} | {f['aggregate']:>10.1f} / {ll['aggregate']:<9.1f} {f['aggregate'] / ll['aggregate']:>5.2f}x | "
              f"{f['per_stream']:>7.1f} / {ll['per_stream']:<7.1f} | {f['ttft_p50']:>7.2f} / {ll['ttft_p50']:<7.2f} | "
              f"{f['ttft_p95']:>7.2f} / {ll['ttft_p95']:<7.2f} | {f['same']} / {ll['same']}")
    one = results["fuselm", levels[0]]["aggregate"]
    top = max(levels)
    print(f"fuselm at {top} streams: {results['fuselm', top]['aggregate'] / one:.2f}x its {levels[0]}-stream figure "
          f"(goal 4x), {results['fuselm', top]['aggregate'] / results['llama.cpp', top]['aggregate']:.2f}x llama.cpp "
          "batched (goal 1.5x)")


if __name__ == "__main__":
    main()
