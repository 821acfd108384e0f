"""Where one decode step's time goes: torch.profiler over decode steps of a GGUF model, grouped by op.

    python benchmarks/decode_profile.py MODEL.gguf [--steps 16] [--threads 2] [--dtype float32]

Loads the model with fuselm.load, prefills a 32-token prompt, then profiles --steps single-token steps through
the model's KV cache. Prints the ops' self CPU time per step (QuantLinear's native kernel shows as the ctypes
call inside QuantLinear.forward, so matmuls are listed under "QuantLinear"), the share of the step each takes,
and the step's wall time.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

# isort: off
import fuselm  # first, as the CLI does: passive OpenMP waiting is set before torch loads libgomp
import torch
# isort: on
from torch.profiler import ProfilerActivity, profile, record_function


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="fuselm.load's dtype (default: the loader's)")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    from fuselm.quants.kernels import QuantLinear
    from fuselm.threads import set_threads

    set_threads(args.threads)
    model = fuselm.load(args.model, **({"dtype": args.dtype} if args.dtype else {}))
    net = model.transformer

    def tagged(module: QuantLinear, forward=QuantLinear.forward):
        def run(x):
            with record_function("QuantLinear"):
                return forward(module, x)

        return run

    for m in net.modules():
        if isinstance(m, QuantLinear):
            m.forward = tagged(m)
    prompt = torch.randint(3, model.config.vocab_size - 1, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = net.new_cache(1, 32 + 2 * args.steps + 2)
        token = net(prompt, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        for _ in range(args.steps):  # warm-up steps
            token = net(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                token = net(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
            wall = (time.perf_counter() - t0) / args.steps
    # self time per op; QuantLinear's own self time is the native kernel call plus its Python
    self_us: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        self_us[evt.key] += evt.self_cpu_time_total
    total = sum(self_us.values())
    print(f"{args.model}: {wall * 1e3:.2f} ms per decode step (wall), dtype {net.dtype}, {args.threads} threads")
    print(f"{'op':<40} {'ms/step':>8} {'share':>6}")
    for key, us in sorted(self_us.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{key[:40]:<40} {us / 1e3 / args.steps:8.3f} {us / total:6.1%}")


if __name__ == "__main__":
    main()
