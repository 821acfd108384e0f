"""One rank of a tensor-parallel test (run by torchrun, or with RANK/WORLD_SIZE/MASTER_* set by the test).

  tp_worker.py logits OUT MODEL...   every rank loads each MODEL with tensor_parallel=True; rank 0 saves, per model,
                                     the full-forward logits, the logits of a prefill + cached decode, greedy ids,
                                     and every rank's weight bytes and peak RSS growth over the load
  tp_worker.py die MODEL              rank 1 is killed after the first forward; rank 0 keeps going and reports
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time

import torch
import torch.distributed as dist

import fuselm

MAX_NEW = 12
IDS = torch.tensor([[1, 5, 9, 3, 7, 11, 2, 4, 6, 8], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]])


def peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def weight_bytes(model) -> int:
    """Bytes of weights this rank holds: parameters, and the GGML bytes the kernels read."""
    from fuselm.quants.embedding import QuantizedEmbedding
    from fuselm.quants.kernels import QuantLinear

    total = 0
    for module in model.transformer.modules():
        total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        if isinstance(module, QuantLinear):
            packed = module._w  # the kernels' repacked copy, when there is one
            total += packed.nbytes if packed is not None else sum(p.data.nbytes for p in module.parts)
        elif isinstance(module, QuantizedEmbedding):
            total += module.weight.data.nbytes
    return total


def sampled_ids(model, seed: int | None) -> list[int]:
    from fuselm.generation.decoder import decode_ids
    from fuselm.generation.sampling import SamplingParams

    sampling = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    return list(decode_ids(model.transformer, [1, 5, 9], max_new_tokens=MAX_NEW, sampling=sampling, seed=seed))


def logits(out: str, paths: list[str]) -> None:
    results = {}
    for path in paths:
        before = peak_rss_kb()
        model = fuselm.load(path, tensor_parallel=True)
        full = model(IDS)
        cache = model.transformer.new_cache(2, 32)
        with torch.inference_mode():
            prefill = model.transformer(IDS[:, :6], cache=cache)
            steps = [model.transformer(IDS[:, i:i + 1], cache=cache) for i in range(6, 10)]
        cached = torch.cat([prefill, *steps], dim=1)
        seeded = sampled_ids(model, seed=3)
        unseeded = sampled_ids(model, seed=None)  # every rank draws differently: rank 0's tokens must win
        # plain tensors, not all_gather_object: see fuselm.parallel.group.Ranks.broadcast_object
        mine = torch.full((2 + MAX_NEW,), -1, dtype=torch.long)
        mine[0], mine[1] = weight_bytes(model), peak_rss_kb() - before
        mine[2:2 + len(unseeded)] = torch.tensor(unseeded, dtype=torch.long)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        ranks = [{"weight_bytes": int(t[0]), "rss_growth_kb": int(t[1]),
                  "unseeded": [i for i in t[2:].tolist() if i >= 0]} for t in gathered]
        results[path] = {"full": full, "cached": cached, "seeded": seeded, "ranks": ranks}
        del model
    if dist.get_rank() == 0:
        torch.save(results, out)


def die(path: str) -> None:
    model = fuselm.load(path, tensor_parallel=True)
    model(IDS)
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        for _ in range(1000):
            model(IDS)
    except fuselm.FuselmError as err:
        print(f"rank 0 stopped after {time.monotonic() - t0:.1f} s: {err}", flush=True)
        sys.exit(3)
    print("rank 0 never noticed", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "logits":
        logits(sys.argv[2], sys.argv[3:])
    elif mode == "die":
        die(sys.argv[2])
