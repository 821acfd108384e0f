"""QuantLinear equals "dequantize, then dense" for every GGML type, on every path.

Weights are quantized by llama.cpp itself (ggml_quantize_chunk via ctypes) and dequantized by gguf-py, so the
reference is independent of fuselm's codecs. The reference product is float64.

Documented error bounds, as a fraction of max |y_ref| over the output:
- native GEMV (M <= DECODE_MAX_ROWS), quantized types: 1e-4 (16-bit activations; measured ~3e-5);
- native GEMV, F16/BF16, and the torch and dense paths: 1e-5 (float32 arithmetic);
- native prefill, in the GEMM dtype chosen for this CPU (quants.gemm_dtype): float32 tiles 1e-5; fp16 tiles
  4e-3 (fp16 rounding; measured ~4e-4), and where fp16 would overflow it runs in bf16: 2e-2 (measured ~4e-3);
  bf16 tiles 2e-2; BF16 weights take the bf16 GEMM unless float32 was chosen;
- bf16 inputs give bf16 outputs: add 2^-8 for the output's rounding.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ggml_ref import ggml_quantize, libggml_base
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from fuselm.errors import FuselmError
from fuselm.quants import kernels
from fuselm.quants.gemm_dtype import prefill_dtype
from fuselm.quants.kernel_build import kernel_isa, native_library, native_unavailable_reason
from fuselm.quants.kernels import QuantLinear
from fuselm.quants.tensor import QuantizedWeight
from fuselm.threads import set_threads

QUANT_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
DENSE_TYPES = ["F16", "BF16", "F32"]
N = 40  # output rows: not a multiple of the thread count or of any unrolling
BF16_OUT = 2.0**-8


def cols_for(qtype: str) -> int:
    # legacy 32-blocks: 19 blocks, so rows end in a partial 4-block unit; K-quants need multiples of 256
    return 512 if qtype.endswith("_K") else 608


def weight_bytes(qtype: str, w: np.ndarray) -> np.ndarray:
    if qtype == "F32":
        return w.view(np.uint8)
    if qtype == "F16":
        return w.astype(np.float16).view(np.uint8)
    if qtype == "BF16":
        return torch.from_numpy(w).bfloat16().view(torch.uint8).numpy()
    return ggml_quantize(w, qtype)


@pytest.fixture(scope="module", params=QUANT_TYPES + DENSE_TYPES + ["IQ4_XS"])
def case(request):
    qtype = request.param
    k = 512 if qtype == "IQ4_XS" else cols_for(qtype)
    rng = np.random.default_rng(sum(map(ord, qtype)))
    w = rng.standard_normal((N, k), dtype=np.float32)
    data = weight_bytes(qtype, w)
    ref_w = gguf_dequantize(data, GGMLQuantizationType[qtype]).astype(np.float64)
    bias = torch.from_numpy(rng.standard_normal(N, dtype=np.float32))
    return qtype, QuantizedWeight.from_numpy(data, qtype, (N, k)), torch.from_numpy(ref_w), bias


def check(layer: QuantLinear, ref_w: torch.Tensor, bias: torch.Tensor, m: int, dtype: torch.dtype, tol: float):
    k = ref_w.shape[1]
    x = torch.randn(2, m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, m, N)
    ref = x.double() @ ref_w.T + bias.double()
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    bound = tol + (BF16_OUT if dtype == torch.bfloat16 else 0.0)
    assert err <= bound, f"{layer.qtype} {layer.backend} M={m} {dtype}: error {err:.2e} > {bound:.1e}"


class _TraitsCPU(ctypes.Structure):  # ggml-cpu.h: struct ggml_type_traits_cpu
    _fields_ = [
        ("from_float", ctypes.c_void_p),
        ("vec_dot", ctypes.c_void_p),
        ("vec_dot_type", ctypes.c_int),
        ("nrows", ctypes.c_int64),
    ]


@functools.cache
def libggml_cpu() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
    lib.ggml_cpu_init()
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TraitsCPU)
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    return lib


def llama_cpp_matmul(data: np.ndarray, qtype: str, x: np.ndarray) -> np.ndarray:
    """x [M, K] @ W.T the way llama.cpp's CPU backend computes it: the activation row quantized to the
    type's vec_dot_type (Q8_0 / Q8_1 / Q8_K: 8 bits), then ggml's vec_dot per weight row."""
    lib = libggml_cpu()
    traits = lib.ggml_get_type_traits_cpu(int(GGMLQuantizationType[qtype])).contents
    act = lib.ggml_get_type_traits_cpu(traits.vec_dot_type).contents
    from_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(act.from_float)
    size_t, vp = ctypes.c_size_t, ctypes.c_void_p
    vec_dot = ctypes.CFUNCTYPE(None, ctypes.c_int, vp, size_t, vp, size_t, vp, size_t, ctypes.c_int)(traits.vec_dot)
    k = x.shape[1]
    qx = np.zeros(libggml_base().ggml_row_size(traits.vec_dot_type, k), dtype=np.uint8)
    out = np.zeros((x.shape[0], data.shape[0]))
    s = ctypes.c_float()
    for m in range(x.shape[0]):
        row = np.ascontiguousarray(x[m], dtype=np.float32)
        from_float(row.ctypes.data, qx.ctypes.data, k)
        for n in range(data.shape[0]):
            vec_dot(k, ctypes.byref(s), 0, data[n].ctypes.data, 0, qx.ctypes.data, 0, 1)
            out[m, n] = s.value
    return out


def test_native_kernels_build_here():
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    avx512 = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi")
    mode = os.environ.get("FUSELM_KERNELS", "").lower()
    if mode == "torch":  # the documented switch to the torch path
        assert native_library() is None and native_unavailable_reason() == "FUSELM_KERNELS=torch"
    elif all(f in flags for f in ("avx2", "fma", "f16c")):
        assert native_library() is not None, native_unavailable_reason()
        wide = all(f in flags for f in avx512) and mode != "avx2"
        assert kernel_isa() == ("avx512" if wide else "avx2")
    else:
        assert native_library() is None and native_unavailable_reason()


def prefill_tolerance(qtype: str) -> float:
    dtype = prefill_dtype()
    if dtype == torch.float32:
        return 1e-5
    return 2e-2 if qtype == "BF16" or dtype == torch.bfloat16 else 4e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_path_matches_dequantized_dense(case, dtype):
    qtype, qw, ref_w, bias = case
    layer = QuantLinear(qw, bias)
    native = layer.backend == "native"
    assert 6 <= kernels.DECODE_MAX_ROWS < 33  # M=1 and M=6 decode, M=33 prefill
    quantized = qtype not in DENSE_TYPES
    check(layer, ref_w, bias, 1, dtype, 1e-4 if native and quantized else 1e-5)
    check(layer, ref_w, bias, 6, dtype, 1e-4 if native and quantized else 1e-5)  # GEMV in chunks of 4 rows
    check(layer, ref_w, bias, 33, dtype, prefill_tolerance(qtype) if native else 1e-5)


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_error_is_below_llama_cpp(qtype):
    """On the same weights and activations, both native paths stay at or below the error of llama.cpp's own
    CPU matmul (8-bit activations); the decode GEMV by more than 10x."""
    rng = np.random.default_rng(7)
    k = cols_for(qtype)
    data = ggml_quantize(rng.standard_normal((N, k), dtype=np.float32), qtype)
    ref_w = gguf_dequantize(data, GGMLQuantizationType[qtype]).astype(np.float64)
    layer = QuantLinear(QuantizedWeight.from_numpy(data, qtype, (N, k)))
    for m, margin in ((1, 10.0), (33, 1.0)):
        x = rng.standard_normal((m, k), dtype=np.float32)
        ref = x.astype(np.float64) @ ref_w.T
        scale = np.abs(ref).max()
        ours = np.abs(layer(torch.from_numpy(x)).double().numpy() - ref).max() / scale
        theirs = np.abs(llama_cpp_matmul(data, qtype, x) - ref).max() / scale
        assert ours * margin <= theirs, f"{qtype} M={m}: error {ours:.1e}, llama.cpp {theirs:.1e}"


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_prefill_falls_back_to_bf16_where_fp16_overflows(qtype):
    k = 256
    rng = np.random.default_rng(3)
    data = weight_bytes(qtype, rng.standard_normal((N, k), dtype=np.float32) * 100)
    ref_w = torch.from_numpy(gguf_dequantize(data, GGMLQuantizationType[qtype]).astype(np.float64))
    layer = QuantLinear(QuantizedWeight.from_numpy(data, qtype, (N, k)))
    for x in (torch.randn(40, k) * 100, torch.randn(40, k) * 7e4):  # outputs past 65504; inputs past 6e4
        y = layer(x)
        ref = x.double() @ ref_w.T
        assert torch.isfinite(y).all() and ref.abs().max() > 65504
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() <= 2e-2


@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_fallback_paths(case, backend):
    qtype, qw, ref_w, bias = case
    layer = QuantLinear(qw, bias, backend=backend)
    for m in (1, 33):
        check(layer, ref_w, bias, m, torch.float32, 1e-5)


def smaps_fields(addr: int) -> dict[str, int]:
    """/proc/self/smaps fields (kB or flags) of the mapping that contains addr."""
    fields, found = None, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and not parts[0].endswith(":"):
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            found = lo <= addr < hi
            if found:
                fields = {}
        elif found and parts[0].endswith(":") and len(parts) >= 2 and parts[1].isdigit():
            fields[parts[0][:-1]] = int(parts[1])
    if fields is None:
        raise AssertionError(f"no mapping contains {addr:#x}")
    return fields


def mapping_rss_kb(addr: int) -> int:
    """Resident kB of the /proc/self/smaps mapping that contains addr."""
    return smaps_fields(addr)["Rss"]


def test_memory_mapped_weight_is_repacked_once_and_its_pages_dropped(tmp_path):
    rows, k = 512, 1024  # 288 KiB of Q4_K
    w = np.random.default_rng(1).standard_normal((rows, k), dtype=np.float32)
    data = ggml_quantize(w, "Q4_K")
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 96 + data.tobytes())  # at an offset, as in a GGUF file
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=96, shape=data.shape)
    qw = QuantizedWeight.from_numpy(mm, "Q4_K", (rows, k))
    assert qw.nbytes == data.nbytes and qw.data.data_ptr() == mm.ctypes.data  # a view, not a copy
    assert int(mm.sum()) > 0 and mapping_rss_kb(mm.ctypes.data) >= data.nbytes // 1024 - 8  # pages now resident
    layer = QuantLinear(qw)
    if layer.backend == "native":
        assert layer._w.numel() == data.nbytes  # the tiles take the file's size, nothing more
        assert mapping_rss_kb(mm.ctypes.data) <= 8  # and the file's pages left the resident set
    x = torch.randn(3, k)
    ref = QuantLinear(QuantizedWeight(torch.from_numpy(data.copy()), "Q4_K", (rows, k)))(x)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)
    ref_w = torch.from_numpy(gguf_dequantize(data, GGMLQuantizationType.Q4_K).astype(np.float64))
    assert torch.allclose(qw.dequantize().double(), ref_w)


@pytest.mark.parametrize("written", [False, True])
def test_private_mapping_pages_dropped_only_when_never_written(tmp_path, written):
    """read_gguf maps files copy-on-write; a written page there is the only copy of its bytes and must stay."""
    rows, k = 256, 1024
    data = ggml_quantize(np.random.default_rng(2).standard_normal((rows, k), dtype=np.float32), "Q8_0")
    path = tmp_path / "w.bin"
    path.write_bytes(data.tobytes())
    mm = np.memmap(path, dtype=np.uint8, mode="c", shape=data.shape)
    if written:
        mm[0, 2] ^= 1  # one quant byte of the first row, in this process only
    expected = np.array(mm)
    assert int(mm.sum()) > 0 and mapping_rss_kb(mm.ctypes.data) >= data.nbytes // 1024 - 8
    layer = QuantLinear(QuantizedWeight.from_numpy(mm, "Q8_0", (rows, k)))
    if layer.backend == "native":
        resident = mapping_rss_kb(mm.ctypes.data)
        assert (resident >= data.nbytes // 1024 - 8) if written else (resident <= 8)
    assert np.array_equal(layer.weight.data.numpy(), expected)  # nothing lost either way
    x = torch.randn(2, k)
    ref = QuantLinear(QuantizedWeight(torch.from_numpy(expected), "Q8_0", (rows, k)))(x)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "F16"])
@pytest.mark.parametrize("rows", [(32, 16, 48), (40, 8, 24)])  # whole 16-row tiles, and not
def test_stacked_parts_equal_separate_layers(qtype, rows):
    k = cols_for(qtype) if qtype != "F16" else 256
    rng = np.random.default_rng(5)
    parts = [
        QuantizedWeight.from_numpy(weight_bytes(qtype, rng.standard_normal((n, k), dtype=np.float32)), qtype, (n, k))
        for n in rows
    ]
    bias = torch.randn(sum(rows))
    fused = QuantLinear(parts, bias)
    assert fused.out_features == sum(rows) and fused.weight.shape == (sum(rows), k)
    for m in (1, 40):  # decode: the same kernel, bit for bit; prefill: one GEMM vs several, within its bound
        x = torch.randn(m, k)
        y = torch.cat([QuantLinear(p)(x) for p in parts], dim=1) + bias
        tol = 0.0 if m == 1 else 4e-3 * y.abs().max().item()
        torch.testing.assert_close(fused(x), y, rtol=0, atol=tol)
    exact = QuantLinear(parts, bias, backend="torch")(x)
    torch.testing.assert_close(exact, y, rtol=0, atol=4e-3 * y.abs().max().item())
    with pytest.raises(FuselmError, match="one type"):
        QuantLinear([parts[0], QuantizedWeight(torch.zeros(16, 18 * 2, dtype=torch.uint8), "Q4_0", (16, 64))])


def test_bad_inputs_raise_one_clear_error():
    data = torch.zeros(4, 18 * 2, dtype=torch.uint8)
    with pytest.raises(FuselmError, match="expected data of shape"):
        QuantizedWeight(data, "Q4_0", (4, 96))
    with pytest.raises(FuselmError, match="unsupported GGML type"):
        QuantizedWeight(data, "Q7_0", (4, 64))
    layer = QuantLinear(QuantizedWeight(data, "Q4_0", (4, 64)))
    with pytest.raises(FuselmError, match="input has 32 features"):
        layer(torch.zeros(1, 32))
    with pytest.raises(FuselmError, match="bias"):
        QuantLinear(QuantizedWeight(data, "Q4_0", (4, 64)), torch.zeros(5))


def test_set_threads_keeps_results():
    k = 256
    w = np.random.default_rng(2).standard_normal((64, k), dtype=np.float32)
    layer = QuantLinear(QuantizedWeight.from_numpy(ggml_quantize(w, "Q8_0"), "Q8_0", (64, k)))
    x = torch.randn(1, k)
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        y1 = layer(x)
        set_threads(2)
        assert torch.get_num_threads() == 2
        torch.testing.assert_close(layer(x), y1, rtol=1e-6, atol=1e-6)
    finally:
        set_threads(before)
    with pytest.raises(FuselmError):
        set_threads(0)


@pytest.mark.parametrize("backend", ["native", "torch", "dense"])
def test_row_order_equals_reordered_bytes(backend):
    """A weight given as file bytes plus a row order (GGUF q/k rows) computes as the reordered copy would."""
    if backend == "native" and native_library() is None:
        pytest.fail("native kernels missing: test_native_kernels_build_here says why")
    k, rows = 512, 600  # 600: more than one gather step, and not whole tiles
    data = torch.from_numpy(ggml_quantize(np.random.default_rng(4).standard_normal((rows, k), dtype=np.float32),
                                          "Q4_K"))
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
    ordered = QuantizedWeight(data, "Q4_K", (rows, k), order)
    copy = QuantizedWeight(data[order].contiguous(), "Q4_K", (rows, k))
    assert torch.equal(ordered.dequantize(), copy.dequantize())
    other = QuantizedWeight(data[:64].contiguous(), "Q4_K", (64, k))
    x = torch.randn(5, k)
    y = QuantLinear([ordered, other], backend=backend)(x)
    torch.testing.assert_close(y, QuantLinear([copy, other], backend=backend)(x), rtol=0, atol=0)
    assert torch.equal(QuantLinear([ordered, other], backend=backend).weight.data, torch.cat([copy.data, other.data]))
    with pytest.raises(FuselmError, match="permutation"):
        QuantizedWeight(data, "Q4_K", (rows, k), torch.zeros(rows, dtype=torch.int64))


def test_weights_live_in_huge_page_memory():
    """Repacked tiles start on a 2 MiB boundary and are advised huge pages; where the kernel's THP mode allows
    advice (madvise or always), the mapping is eligible and the touched pages are huge."""
    from fuselm.quants.kernel_memory import HUGE_PAGE, huge_page_buffer

    buf = huge_page_buffer(3 * HUGE_PAGE + 100)
    assert buf.numel() == 3 * HUGE_PAGE + 100 and buf.data_ptr() % HUGE_PAGE == 0
    buf.fill_(7)
    assert int(buf.sum()) == 7 * buf.numel()
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    if "[never]" not in mode:
        fields = smaps_fields(buf.data_ptr())
        assert fields.get("THPeligible") == 1, fields
    if native_library() is not None:
        rows, k = 4096, 512  # 2.1 MiB of Q8_0 (smaller weights get plain memory)
        data = ggml_quantize(np.random.default_rng(5).standard_normal((rows, k), dtype=np.float32), "Q8_0")
        layer = QuantLinear(QuantizedWeight(torch.from_numpy(data), "Q8_0", (rows, k)))
        assert layer._w.data_ptr() % HUGE_PAGE == 0
