"""The prefill GEMM dtype: the choice rule, the FUSELM_GEMM override, and each dtype's documented error on
every machine (weights quantized by fuselm, reference = gguf-py's dequantization, float64 product)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from fuselm.quants import quantize
from fuselm.quants.gemm_dtype import CLEAR_WIN, choose

BOUNDS = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 2e-2}  # of max |y|, as tests/test_kernels.py documents
TYPES = ["Q4_K", "Q8_0", "Q6_K", "F16"]


def test_choice_prefers_accuracy_unless_clearly_faster():
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    assert choose({f32: 1.0, f16: 1.0 / (CLEAR_WIN * 0.9), bf16: 1.0 / (CLEAR_WIN * 0.9)}) == f32
    assert choose({f32: 5.0, f16: 1.0, bf16: 1.0 / (CLEAR_WIN * 0.9)}) == f16
    assert choose({f32: 5.0, f16: 5.0, bf16: 1.0}) == bf16  # the AMX-BF16-without-AMX-FP16 case


_CHILD = r"""
import json, sys, torch
from fuselm.quants import quantize
from fuselm.quants.gemm_dtype import prefill_dtype
from fuselm.quants.kernels import QuantLinear
from fuselm.quants.tensor import QuantizedWeight
out = {"dtype": str(prefill_dtype())}
for qtype in sys.argv[1].split(","):
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(1))
    data = w.half().view(torch.uint8) if qtype == "F16" else quantize(w, qtype)
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(2))
    out[qtype] = QuantLinear(QuantizedWeight(data, qtype, (48, 512)))(x).tolist()
print(json.dumps(out))
"""


@pytest.mark.parametrize("forced", list(BOUNDS))
def test_forced_gemm_dtype_keeps_its_error_bound(forced):
    env = dict(os.environ, FUSELM_GEMM=forced)
    proc = subprocess.run([sys.executable, "-c", _CHILD, ",".join(TYPES)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["dtype"] == f"torch.{forced}"
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(2)).double().numpy()
    for qtype in TYPES:
        w = torch.randn(48, 512, generator=torch.Generator().manual_seed(1))
        data = w.half().view(torch.uint8) if qtype == "F16" else quantize(w, qtype)
        ref_w = gguf_dequantize(data.numpy(), GGMLQuantizationType[qtype]).astype(np.float64).reshape(48, 512)
        ref = x @ ref_w.T
        err = np.abs(np.array(got[qtype]) - ref).max() / np.abs(ref).max()
        assert err <= BOUNDS[forced], f"{qtype} with {forced} tiles: error {err:.1e} > {BOUNDS[forced]:.0e}"


def test_bad_override_is_refused():
    env = dict(os.environ, FUSELM_GEMM="float8")
    code = "from fuselm.quants.gemm_dtype import prefill_dtype; prefill_dtype()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "FUSELM_GEMM='float8'" in proc.stderr
