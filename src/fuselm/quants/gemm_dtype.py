"""Which dtype the prefill GEMM runs in on this CPU: float32, fp16 or bf16 weight tiles.

The fastest GEMM depends on the machine, not on what it was built on: with AMX-BF16 but no AMX-FP16 torch's
bf16 GEMM is ~5x its fp16 one; on an AVX2-only CPU fp16 and bf16 are emulated and float32 wins. The choice is
made once per process from the CPU's flags and a first-use micro-benchmark of torch.mm at a prefill shape,
preferring the more accurate dtype unless a less accurate one is clearly faster:
- float32: exact products of the dequantized weights (error ~1e-6 of max |y|);
- fp16: weights, activations and outputs rounded to fp16 (~4e-4), with bf16 where fp16 would overflow;
- bf16: ~4e-3.
`FUSELM_GEMM=float32|float16|bfloat16` overrides the choice.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch

from fuselm.errors import FuselmError

CANDIDATES = (torch.float32, torch.float16, torch.bfloat16)  # most accurate first
CLEAR_WIN = 1.3  # a less accurate dtype must be this much faster to be chosen
NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# /proc/cpuinfo flags under which a dtype has a native matrix or vector unit (else torch emulates it)
FAST_FLAGS = {torch.float16: ("amx_fp16", "avx512_fp16"), torch.bfloat16: ("amx_bf16", "avx512_bf16")}


def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _gemm_seconds(dtype: torch.dtype, m: int = 128, n: int = 1024, k: int = 2048, reps: int = 3) -> float:
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(n, k).to(dtype)
    torch.mm(a, b.t())
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b.t())
        best = min(best, time.perf_counter() - t0)
    return best


def measure() -> dict[torch.dtype, float]:
    """Seconds of one 128x1024x2048 GEMM per candidate dtype (best of 3); dtypes without a native unit on
    this CPU's flags are measured too (torch may still be fast there), they just cost a few ms more."""
    return {dtype: _gemm_seconds(dtype) for dtype in CANDIDATES}


def choose(seconds: dict[torch.dtype, float]) -> torch.dtype:
    """The most accurate dtype unless a later one is CLEAR_WIN times faster than every earlier choice."""
    best = CANDIDATES[0]
    for dtype in CANDIDATES[1:]:
        if seconds[dtype] * CLEAR_WIN < seconds[best]:
            best = dtype
    return best


@functools.cache
def prefill_dtype() -> torch.dtype:
    """The GEMM dtype for prefill on this machine (FUSELM_GEMM, else measured once)."""
    forced = os.environ.get("FUSELM_GEMM", "").strip().lower()
    if forced:
        if forced not in NAMES:
            raise FuselmError(f"FUSELM_GEMM={forced!r}: expected one of {', '.join(NAMES)}")
        return NAMES[forced]
    return choose(measure())
