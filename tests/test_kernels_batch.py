"""Batched decode (M = 2..16 activation rows, one per sequence) is batch-invariant, and the portable builds agree.

- Row i of an M-row QuantLinear call equals the 1-row call on that row, bit for bit, for every type the native
  kernels run and every M the serving engine uses: a sequence's tokens never depend on what else is batched.
- The AVX2 build (FUSELM_KERNELS=avx2, what AVX2-only CPUs get) matches "dequantize with gguf-py, then a
  float64 product" within the documented bounds; on an AVX-512 CPU its quantized GEMV equals the AVX-512 one
  bit for bit (both compute exact integer dot products, then the same float32 operations per row).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from fuselm.quants import quantize
from fuselm.quants.kernel_build import kernel_isa, native_library
from fuselm.quants.kernels import NATIVE_TYPES, QuantLinear
from fuselm.quants.tensor import QuantizedWeight

TYPES = sorted(NATIVE_TYPES)
N = 72  # 4.5 tiles of 16 rows: a partial last tile


def weight(qtype: str, seed: int = 0) -> tuple[QuantizedWeight, np.ndarray]:
    k = 512 if qtype.endswith("_K") else 608
    w = torch.randn(N, k, generator=torch.Generator().manual_seed(seed))
    if qtype == "F16":
        data = w.half().view(torch.uint8)
    elif qtype == "BF16":
        data = w.bfloat16().view(torch.uint8)
    else:
        data = quantize(w, qtype)
    return QuantizedWeight(data, qtype, (N, k)), data.numpy()


@pytest.fixture(scope="module", autouse=True)
def native():
    if native_library() is None:
        pytest.fail("native kernels missing here: tests/test_kernels.py::test_native_kernels_build_here says why")


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_do_not_depend_on_the_batch(qtype, dtype):
    qw, _ = weight(qtype)
    bias = torch.randn(N)
    layer = QuantLinear(qw, bias)
    x = (torch.randn(16, qw.in_features) * 3).to(dtype)
    solo = torch.cat([layer(x[i : i + 1]) for i in range(16)])
    for m in (2, 3, 4, 5, 8, 16):
        batched = layer(x[:m])
        for i in range(m):
            assert torch.equal(batched[i], solo[i]), f"{qtype} {dtype}: row {i} of M={m} differs from M=1"


_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from test_kernels_batch import TYPES, weight
from fuselm.quants.kernel_build import kernel_isa
from fuselm.quants.kernels import QuantLinear
out = {"isa": kernel_isa()}
for qtype in TYPES:
    qw, _ = weight(qtype, seed=1)
    x = torch.randn(6, qw.in_features, generator=torch.Generator().manual_seed(2))
    out[qtype] = QuantLinear(qw)(x).tolist()
print(json.dumps(out))
"""


def run_build(mode: str) -> dict:
    env = dict(os.environ, FUSELM_KERNELS=mode)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(Path(__file__).parent)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_avx2_build_matches_the_reference():
    avx2 = run_build("avx2")
    assert avx2["isa"] == "avx2"
    for qtype in TYPES:
        qw, data = weight(qtype, seed=1)
        ref_w = gguf_dequantize(data, GGMLQuantizationType[qtype]).astype(np.float64).reshape(N, -1)
        x = torch.randn(6, qw.in_features, generator=torch.Generator().manual_seed(2)).double().numpy()
        ref = x @ ref_w.T
        err = np.abs(np.array(avx2[qtype]) - ref).max() / np.abs(ref).max()
        assert err <= (1e-4 if qtype not in ("F16", "BF16") else 1e-5), f"{qtype}: AVX2 build error {err:.1e}"


def test_avx2_and_avx512_builds_agree():
    if kernel_isa() != "avx512":
        pytest.skip(f"this CPU runs the {kernel_isa()} build only; the comparison needs an AVX-512 CPU")
    avx2, wide = run_build("avx2"), run_build("native")
    assert wide["isa"] == "avx512"
    for qtype in TYPES:
        a, b = np.array(avx2[qtype]), np.array(wide[qtype])
        if qtype in ("F16", "BF16"):  # float32 sums in 8 vs 16 lanes: equal to rounding
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), qtype
        else:
            assert np.array_equal(a, b), f"{qtype}: AVX2 and AVX-512 GEMVs differ"
