"""Decode speed with one core kept busy by another process: fuselm and llama.cpp, quiet and loaded.

    python benchmarks/under_load.py [--model FILE.gguf | --types Q4_K_M --layers 8] [--threads 2]

A laptop always has something else running. This runs each engine's decode (benchmarks/decode.py's worker:
a 32-token prompt, 32 decoded tokens, best of three windows per process) on a TinyLlama-shape GGUF, first on
a quiet machine, then while a `python -c "while True: pass"` process spins (one per --busy, unpinned: the
scheduler places it, as it would a browser). For fuselm it also compares OpenMP waiting policies, each set in
the environment before torch starts its thread pool:
- default: what fuselm does by itself (fuselm.threads.configure_openmp: passive waiting unless the user chose);
- passive: OMP_WAIT_POLICY=PASSIVE set explicitly (the same as default once fuselm/__init__.py applies it);
- spin 10k: a bounded spin (GOMP_SPINCOUNT=10000, a few microseconds) before sleeping;
- spin: libgomp's own default (a waiting thread spins 300k iterations before sleeping), the old behaviour;
- 1 thread.
Prints tok/s per setting and the loaded / quiet ratio (goal: >= 0.45 at default settings).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode  # noqa: E402  (the model files and the per-engine worker)

POLICIES = {  # name -> (threads override, extra environment)
    "default": (None, {}),
    "passive": (None, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "spin 10k": (None, {"GOMP_SPINCOUNT": "10000"}),
    "spin": (None, {"GOMP_SPINCOUNT": "300000"}),
    "1 thread": (1, {}),
}


def run(kind: str, path: Path, threads: int, env: dict[str, str], n_prompt: int, n_gen: int) -> float | None:
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    proc = subprocess.run(
        [sys.executable, "-c", decode.WORKER, kind, str(path), str(threads), str(n_prompt), str(n_gen)],
        capture_output=True, text=True, env={**full, **env}, timeout=900,
    )  # fmt: skip
    if proc.returncode:
        print(f"  {kind} failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["decode_tok_s"]


def busy_processes(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a GGUF to run (default: build a TinyLlama-shape one)")
    ap.add_argument("--types", default="Q4_K_M")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--keep", default=None, metavar="DIR", help="as in decode.py: keep and reuse model files")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy", type=int, default=1, help="spinning processes during the loaded runs")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--engines", default="fuselm,llama.cpp")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            files = {Path(args.model).stem: Path(args.model)}
        else:
            folder = Path(args.keep) if args.keep else Path(tmp)
            made = decode.kept_files(folder, args.types.split(","), args.layers)
            files = {t: made[t] for t in args.types.split(",")}
        print(f"{args.threads} threads, {args.busy} busy process(es) when loaded, {os.cpu_count()} CPUs", flush=True)
        for name, path in files.items():
            rows = []
            for engine in args.engines.split(","):
                for policy, (threads, env) in POLICIES.items() if engine == "fuselm" else [("default", (None, {}))]:
                    n = threads or args.threads
                    quiet = run(engine, path, n, env, args.tokens, args.tokens)
                    procs = busy_processes(args.busy)
                    try:
                        time.sleep(0.5)
                        loaded = run(engine, path, n, env, args.tokens, args.tokens)
                    finally:
                        for p in procs:
                            p.kill()
                            p.wait()
                    rows.append((engine, policy, n, quiet, loaded))
            print(f"{name}: decode tok/s   {'engine':<10} {'policy':<9} {'thr':>3} {'quiet':>7} {'loaded':>7} ratio")
            for engine, policy, n, quiet, loaded in rows:
                ratio = f"{loaded / quiet:5.2f}" if quiet and loaded else "  n/a"
                q = f"{quiet:7.1f}" if quiet else "    n/a"
                ld = f"{loaded:7.1f}" if loaded else "    n/a"
                print(f"{'':21}{engine:<10} {policy:<9} {n:>3} {q} {ld} {ratio}", flush=True)


if __name__ == "__main__":
    main()
