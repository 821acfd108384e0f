"""Tensor parallelism on one machine: TP=1 vs TP=2 (torchrun, gloo on loopback, one thread per rank) on the
TinyLlama-1.1B-shape Q4_K_M file of benchmarks/decode.py (random weights, 22 layers).

    python benchmarks/tensor_parallel.py [--layers 22] [--tokens 32] [--work /tmp/decodebench]

Per rank: resident memory before loading and its peak after (the growth is what the rank's share of the model
costs), decode tok/s (batch 1, greedy, after a 16-token prompt; best of 3 windows), and the time per token spent
inside collectives (all-reduce / all-gather / broadcast, waiting for the other rank included) with their count.
Then what the figures predict for 4 machines of this kind (see `predict`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decode import kept_files  # noqa: E402 (the same files as the decode benchmark)

WORKER = r"""
import json, sys, time, resource, torch
import fuselm
from fuselm.parallel import group
from fuselm.threads import set_threads

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

path, n_gen = sys.argv[1], int(sys.argv[2])
set_threads(1)
spent = {"s": 0.0, "n": 0}
original = group.Ranks._call
def timed(self, what, fn, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        return original(self, what, fn, *args, **kwargs)
    finally:
        spent["s"] += time.perf_counter() - t0
        spent["n"] += 1
group.Ranks._call = timed
before = rss_mb()
model = fuselm.load(path, tensor_parallel=True)
t = model.transformer
prompt = torch.arange(16).reshape(1, 16) + 100
best = None
with torch.inference_mode():
    for _ in range(3):
        cache = t.new_cache(1, 16 + n_gen + 1)
        token = t(prompt, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        spent.update(s=0.0, n=0)
        t0 = time.perf_counter()
        for _ in range(n_gen):
            token = t(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
        run = {"decode_tok_s": n_gen / (time.perf_counter() - t0), "collective_ms_per_token": 1e3 * spent["s"] / n_gen,
               "collectives_per_token": spent["n"] / n_gen}
        best = run if best is None or run["decode_tok_s"] > best["decode_tok_s"] else best
mine = {"rss_before_mb": before, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **best}
ranks = [mine]
if model.ranks is not None and model.ranks.world > 1:
    import torch.distributed as dist
    ranks = [None] * model.ranks.world
    dist.all_gather_object(ranks, mine)
if model.ranks is None or model.ranks.rank == 0:
    print("RESULT " + json.dumps(ranks), flush=True)
"""


def run(ranks: int, path: Path, n_gen: int) -> list[dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), f.name,
            str(path), str(n_gen)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    os.unlink(f.name)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"TP={ranks} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def predict(tp1: dict, tp2: list[dict], machines: int = 4, hop_us: float = 50.0) -> list[str]:
    """Decode time per token on `machines` machines = one rank's compute (TP=1's time over the number of ranks:
    each holds 1/N of the weights and streams 1/N of the bytes) + the collectives. A ring all-reduce over N ranks
    takes 2(N-1) steps where 2 ranks take 2, so a collective costs (N-1) times what it costs at TP=2. Two cases:
    the per-collective cost measured here at TP=2 (gloo between two processes of this VM: dominated by waking the
    idle peer, which a network between VMs of this kind will not make cheaper), and a `hop_us` one-way latency per
    step, typical of a 10-25 GbE link between bare-metal hosts (the 8 KiB payload adds under 10 us at 10 Gb/s)."""
    compute_ms = 1e3 / tp1["decode_tok_s"]
    per_token = tp2[0]["collectives_per_token"]
    measured_ms = tp2[0]["collective_ms_per_token"] / per_token
    out = []
    for label, each_ms in (("with this VM's measured gloo latency", measured_ms * (machines - 1)),
                           (f"at {hop_us:g} us per ring step", 2 * (machines - 1) * hop_us / 1e3)):
        ms = compute_ms / machines + per_token * each_ms
        out.append(f"{machines} machines {label}: {compute_ms:.1f} ms / {machines} + {per_token:.0f} collectives x "
                   f"{each_ms:.2f} ms = {ms:.1f} ms/token, {1e3 / ms:.1f} tok/s ({compute_ms / ms:.2f}x TP=1)")
    share = (tp2[0]["peak_rss_mb"] - tp2[0]["rss_before_mb"]) / 2
    out.append(f"memory: about {share:.0f} MiB of this model per machine (half of a TP=2 rank's growth)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded per window")
    ap.add_argument("--work", type=Path, default=Path("/tmp/decodebench"), help="where the model files are kept")
    args = ap.parse_args()
    path = kept_files(args.work, ["Q4_K_M"], args.layers)["Q4_K_M"]
    print(f"model: {path} ({path.stat().st_size / 2**20:.0f} MiB), one thread per rank, gloo on loopback")
    tp1 = run(1, path, args.tokens)[0]
    tp2 = run(2, path, args.tokens)
    print(f"{'':8} {'rank':>4} {'RSS before':>11} {'peak RSS':>9} {'growth':>7} {'decode tok/s':>12} "
          f"{'collectives/token':>17} {'ms/token in them':>16}")
    for label, rows in (("TP=1", [tp1]), ("TP=2", tp2)):
        for rank, r in enumerate(rows):
            print(f"{label:8} {rank:>4} {r['rss_before_mb']:>9.0f}MB {r['peak_rss_mb']:>7.0f}MB "
                  f"{r['peak_rss_mb'] - r['rss_before_mb']:>5.0f}MB {r['decode_tok_s']:>12.2f} "
                  f"{r['collectives_per_token']:>17.0f} {r['collective_ms_per_token']:>16.2f}")
    growth1 = tp1["peak_rss_mb"] - tp1["rss_before_mb"]
    shares = [(r["peak_rss_mb"] - r["rss_before_mb"]) / growth1 for r in tp2]
    print(f"TP=2 / TP=1: decode {tp2[0]['decode_tok_s'] / tp1['decode_tok_s']:.2f}x, memory growth per rank "
          + ", ".join(f"{s:.2f}" for s in shares) + " of TP=1's")
    print("\n".join(predict(tp1, tp2)))


if __name__ == "__main__":
    main()
