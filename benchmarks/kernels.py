"""One quantized matmul, per GGML type: decode GEMV speed, prefill GEMM speed, and error.

    .venv/bin/python benchmarks/kernels.py [--threads 2] [--types Q4_K,Q8_0] [--reps 30]

For each type and each weight shape (5632x2048 and 2048x2048, TinyLlama's FFN and attention), it prints
- GEMV (M=1): best and median time, and effective GB/s = weight file bytes / best time. The weights are
  cycled through copies larger than the CPU's last-level cache, so the bytes really come from DRAM
  ("hot" repeats one copy, which may sit in cache);
- prefill (M=128): best time and TFLOP/s (2*M*N*K / time), weights decoded to fp16 tiles + oneDNN GEMM;
- error vs "dequantize, then float64 dense": max |y - y_ref| / max |y_ref|, for M=1 and M=128, next to the
  error of llama.cpp's own CPU matmul on the same weights (its vec_dot with 8-bit activations, via ctypes
  into llama-cpp-python's libggml-cpu), on the first 256 rows.
Reference rows: a raw DRAM read of the same bytes, torch bf16 F.linear, and torch's int4 packed GEMV
(`_weight_int4pack_mm_for_cpu`, group 32), the candidates the kernel choice was measured against.
Times are the best of --reps runs: other processes on a shared machine only ever make runs slower.

`--stack Q4_K_M,Q8_0,F16` adds the matmuls of one decode step of a TinyLlama-1.1B-shaped model (22 layers,
dim 2048, ffn 5632, 4 KV heads, vocab 32000; Q4_K_M with llama.cpp's mix: Q6_K for attn_v / ffn_down on the
"more bits" layers and for the output), called in model order with M=1: matmul-only tokens per second, the
part of decode this module owns (attention, norms and Python overhead come on top); "fused" stacks q/k/v
(when of one type) and gate/up into one QuantLinear each; each with float32 activations in and out (the
float32 residual stream) and with bf16 ones (the old default).

`--batch 1,2,4,8,16` adds batched decode (what the serving engine runs, one row per sequence): one GEMV on M
activation rows, weights streamed from DRAM, per type at 5632x2048: ms per call, weight GB/s (each weight
read once per call for all M rows) and rows*calls per second (aggregate throughput, which should grow with M);
float32 activations (the default residual stream), and at M=1 also bf16 activations for comparison.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from fuselm.quants import quantize
from fuselm.quants.gemm_dtype import prefill_dtype
from fuselm.quants.kernel_build import kernel_isa
from fuselm.quants.kernels import QuantLinear
from fuselm.quants.mixes import plan_types
from fuselm.quants.tensor import QuantizedWeight
from fuselm.threads import set_threads

TYPES = ["F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_NL", "Q3_K", "Q2_K"]
SHAPES = [(5632, 2048), (2048, 2048)]
COLD_BYTES = 1200 << 20  # > the 480 MiB L3 of the reference machine


def timed(fn, reps: int) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), statistics.median(ts)


def make_weight(qtype: str, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(GGML bytes [n, row_bytes], float32 source) from 256 random rows tiled to n rows (quantizing is slow)."""
    base = torch.randn(256, k)
    q = quantize(base, qtype)
    reps = (n + 255) // 256
    return q.repeat(reps, 1)[:n].contiguous(), base.repeat(reps, 1)[:n]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


class _TraitsCPU(ctypes.Structure):  # ggml-cpu.h: struct ggml_type_traits_cpu
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]  # fmt: skip


def llama_cpp_matmul(data: torch.Tensor, qtype: str, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T computed by llama.cpp's CPU code: activation rows quantized to the type's vec_dot_type
    (8 bits), then ggml's vec_dot per weight row."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    base.ggml_row_size.restype = ctypes.c_size_t
    base.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    cpu = ctypes.CDLL(str(lib_dir / "libggml-cpu.so"))
    cpu.ggml_cpu_init()
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TraitsCPU)
    cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    traits = cpu.ggml_get_type_traits_cpu(int(GGMLQuantizationType[qtype])).contents
    act = cpu.ggml_get_type_traits_cpu(traits.vec_dot_type).contents
    from_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(act.from_float)
    vp, st = ctypes.c_void_p, ctypes.c_size_t
    vec_dot = ctypes.CFUNCTYPE(None, ctypes.c_int, vp, st, vp, st, vp, st, ctypes.c_int)(traits.vec_dot)
    k = x.shape[1]
    qx = np.zeros(base.ggml_row_size(traits.vec_dot_type, k), dtype=np.uint8)
    w = data.numpy()
    out = torch.zeros(x.shape[0], data.shape[0], dtype=torch.float64)
    s = ctypes.c_float()
    for m in range(x.shape[0]):
        row = np.ascontiguousarray(x[m].numpy(), dtype=np.float32)
        from_float(row.ctypes.data, qx.ctypes.data, k)
        for n in range(w.shape[0]):
            vec_dot(k, ctypes.byref(s), 0, w[n].ctypes.data, 0, qx.ctypes.data, 0, 1)
            out[m, n] = s.value
    return out


def bench_type(qtype: str, n: int, k: int, reps: int) -> str:
    data, _ = make_weight(qtype, n, k)
    nbytes = data.numel()
    copies = max(2, COLD_BYTES // nbytes)
    pool = data.unsqueeze(0).expand(copies, *data.shape).contiguous()
    layers = [QuantLinear(QuantizedWeight(pool[i], qtype, (n, k))) for i in range(copies)]
    x1 = torch.randn(1, k)
    it = iter(range(1 << 30))

    def cold() -> None:
        layers[next(it) % copies](x1)

    hot_best, _ = timed(lambda: layers[0](x1), reps)
    best, med = timed(cold, reps * 2)
    xp = torch.randn(128, k)
    p_best, _ = timed(lambda: layers[0](xp), max(3, reps // 3))
    w = layers[0].weight.dequantize().double()
    e1 = rel_err(layers[0](x1), x1.double() @ w.T)
    e128 = rel_err(layers[0](xp), xp.double() @ w.T)
    if qtype in ("F16", "BF16"):
        llama = "llama.cpp n/a"
    else:
        rows = data[:256]
        ref = x1.double() @ w[:256].T
        llama = f"llama.cpp {rel_err(llama_cpp_matmul(rows, qtype, x1), ref):.1e}"
    return (
        f"{qtype:7s} {n:5d}x{k:<5d} {layers_backend(qtype):6s} GEMV {best * 1e3:7.3f} ms (median {med * 1e3:7.3f}) "
        f"{nbytes / best / 1e9:5.1f} GB/s  hot {nbytes / hot_best / 1e9:5.1f} GB/s | "
        f"prefill M=128 {p_best * 1e3:7.2f} ms {2 * 128 * n * k / p_best / 1e12:5.2f} TFLOP/s | "
        f"err M=1 {e1:.1e} M=128 {e128:.1e} ({llama})"
    )


def bench_batch(qtype: str, n: int, k: int, ms: list[int], reps: int) -> str:
    data, _ = make_weight(qtype, n, k)
    copies = max(2, COLD_BYTES // data.numel())
    pool = data.unsqueeze(0).expand(copies, *data.shape).contiguous()
    layers = [QuantLinear(QuantizedWeight(pool[i], qtype, (n, k))) for i in range(copies)]
    it = iter(range(1 << 30))
    cells = []
    for m in ms:
        for dtype in (torch.float32, torch.bfloat16) if m == 1 else (torch.float32,):
            x = torch.randn(m, k).to(dtype)
            best, _ = timed(lambda x=x: layers[next(it) % copies](x), reps * 2)
            label = f"M={m:<2d}" + (" bf16 in" if dtype == torch.bfloat16 else "")
            cells.append(f"{label} {best * 1e3:6.3f} ms {data.numel() / best / 1e9:5.1f} GB/s {m / best:8.0f} rows/s")
    return f"{qtype:7s} {n:5d}x{k:<5d} batched GEMV | " + " | ".join(cells)


def layers_backend(qtype: str) -> str:
    from fuselm.quants.kernels import _default_backend

    return _default_backend(qtype)


def reference_rows(n: int, k: int, reps: int) -> list[str]:
    rows = []
    nbytes = n * k // 2 + n * k // 32 * 2  # a Q4_0-sized buffer
    copies = max(2, COLD_BYTES // nbytes)
    buf = torch.ones(copies, nbytes // 4)  # float32: torch's sum streams it at full speed
    it = iter(range(1 << 30))
    best, _ = timed(lambda: buf[next(it) % copies].sum(), reps * 2)
    rows.append(f"{'read':7s} {n:5d}x{k:<5d} torch  sum of {nbytes / 1e6:.1f} MB: {nbytes / best / 1e9:5.1f} GB/s")
    wb = torch.randn(n, k).bfloat16()
    copies_b = max(2, COLD_BYTES // (2 * n * k))
    ws = [wb.clone() for _ in range(copies_b)]
    xb = torch.randn(1, k).bfloat16()
    best, _ = timed(lambda: torch.nn.functional.linear(xb, ws[next(it) % copies_b]), reps * 2)
    gbs = 2 * n * k / best / 1e9
    rows.append(f"{'bf16':7s} {n:5d}x{k:<5d} torch  F.linear GEMV {best * 1e3:7.3f} ms {gbs:5.1f} GB/s")
    try:
        q = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        sz = torch.randn(k // 32, n, 2).bfloat16()
        packs = [packed.clone() for _ in range(max(2, COLD_BYTES // packed.numel()))]
        best, _ = timed(
            lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packs[next(it) % len(packs)], 32, sz), reps * 2
        )
        rows.append(
            f"{'int4pk':7s} {n:5d}x{k:<5d} torch  _weight_int4pack_mm_for_cpu GEMV {best * 1e3:7.3f} ms "
            f"{packed.numel() / best / 1e9:5.1f} GB/s (int4 bytes only)"
        )
    except (RuntimeError, AttributeError) as e:  # op missing in this torch build
        rows.append(f"int4pack unavailable: {e}")
    return rows


def stack_types(ftype: str, n_layer: int = 22) -> list[tuple[str, int, int, str]]:
    """(name, out, in, type) of every matmul of a TinyLlama-shaped model, in call order, with the types
    llama.cpp's mix gives them (quants.mixes.plan_types)."""
    shapes = {"attn_q": (2048, 2048), "attn_k": (256, 2048), "attn_v": (256, 2048), "attn_output": (2048, 2048),
              "ffn_gate": (5632, 2048), "ffn_up": (5632, 2048), "ffn_down": (2048, 5632)}
    tensors = [(f"blk.{i}.{t}.weight", shape) for i in range(n_layer) for t, shape in shapes.items()]
    tensors += [("token_embd.weight", (32000, 2048)), ("output.weight", (32000, 2048))]
    if ftype in ("F16", "BF16", "F32"):  # no mix: every matrix keeps the file's type
        types = {name: ftype for name, _ in tensors}
    else:
        plan = plan_types(tensors, ftype, arch="llama", n_layers=n_layer, n_head=32, n_head_kv=4)
        types = {c.name: c.type for c in plan}
    return [(name.split(".")[-2], *shape, types[name]) for name, shape in tensors if name != "token_embd.weight"]


def bench_stack(ftype: str, reps: int, fuse: bool, dtype: torch.dtype = torch.float32) -> str:
    """fuse: q/k/v (when of one type) and gate/up as one QuantLinear each, as a model can load them."""
    cache: dict[tuple[str, int, int], torch.Tensor] = {}

    def part(n: int, k: int, qtype: str) -> QuantizedWeight:
        if (qtype, n, k) not in cache:
            cache[(qtype, n, k)] = make_weight(qtype, n, k)[0]
        return QuantizedWeight(cache[(qtype, n, k)].clone(), qtype, (n, k))  # each layer its own bytes

    mats = stack_types(ftype)
    groups: list[list[tuple[str, int, int, str]]] = []
    for i in range(0, len(mats) - 1, 7):
        q, k, v, o, gate, up, down = mats[i : i + 7]
        if not fuse:
            groups += [[m] for m in mats[i : i + 7]]
            continue
        groups += [[q, k, v]] if v[3] == q[3] else [[q, k], [v]]
        groups += [[o], [gate, up], [down]]
    groups.append([mats[-1]])
    layers = [QuantLinear([part(n, k, t) for _, n, k, t in g]) for g in groups]
    nbytes = sum(p.nbytes for layer in layers for p in layer.parts)
    xs = {k: torch.randn(1, k).to(dtype) for k in (2048, 5632)}

    def step() -> None:
        for layer in layers:
            layer(xs[layer.in_features])

    best, med = timed(step, reps)
    return (
        f"stack {ftype:7s} {'fused' if fuse else 'plain'} {str(dtype)[6:]:8s} in, {len(layers)} matmuls, "
        f"{nbytes / 1e6:.0f} MB: "
        f"{best * 1e3:.1f} ms/token (median {med * 1e3:.1f}) = {1 / best:.1f} tok/s matmul-only, "
        f"{nbytes / best / 1e9:.1f} GB/s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-reference", action="store_true", help="skip the torch reference rows")
    ap.add_argument("--stack", default="", help="comma list of Q4_K_M, Q8_0, Q4_0, F16: TinyLlama decode matmuls")
    ap.add_argument("--no-single", action="store_true", help="skip the single-matmul table")
    ap.add_argument("--batch", default="", help="comma list of row counts M for the batched-GEMV table")
    args = ap.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads={args.threads}  torch {torch.__version__}  kernels {kernel_isa()}  prefill GEMM {prefill_dtype()}")
    if args.batch:
        ms = [int(v) for v in args.batch.split(",")]
        for qtype in args.types.split(","):
            print(bench_batch(qtype.strip().upper(), *SHAPES[0], ms, args.reps), flush=True)
    for ftype in filter(None, args.stack.split(",")):
        for fuse in (False, True):
            for dtype in (torch.float32, torch.bfloat16):  # the float32 residual stream vs the old bf16 one
                print(bench_stack(ftype.strip().upper(), args.reps, fuse, dtype), flush=True)
    for n, k in [] if args.no_single else SHAPES:
        if not args.no_reference:
            for row in reference_rows(n, k, args.reps):
                print(row, flush=True)
        for qtype in args.types.split(","):
            print(bench_type(qtype.strip().upper(), n, k, args.reps), flush=True)


if __name__ == "__main__":
    main()
