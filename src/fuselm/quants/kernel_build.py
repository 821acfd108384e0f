"""Build and load fuselm's native CPU kernels (csrc/qkernels.cpp) as a plain shared library, through ctypes.

The library has no torch headers, so it compiles in seconds with the system C++ compiler (`CXX`, else g++ or
c++), with -march=native: the vector width follows the CPU it runs on (AVX-512 VNNI/VBMI, else AVX2 + FMA +
F16C; `kernel_isa()` says which). It is built on first use and cached under `$FUSELM_CACHE_DIR` (default
`~/.cache/fuselm/kernels`), keyed by the sources, the flags, the compiler and the CPU, so a new machine
rebuilds it.
`python -m fuselm.quants.kernel_build` builds it ahead of time (for `make`).

It links libgomp, which resolves to the one torch has already loaded: kernel threads and torch threads
are the same OpenMP pool, and torch.set_num_threads sets both.

Where the CPU lacks AVX2/FMA/F16C or no compiler works, `native_library()` returns None and the reason is in
`native_unavailable_reason()`; QuantLinear then runs a plain torch path. `FUSELM_KERNELS=torch` forces that
path; `FUSELM_KERNELS=avx2` builds the AVX2 kernels even on an AVX-512 CPU (to test the portable build).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp first, so the kernels share its OpenMP runtime)

SOURCE = Path(__file__).parent / "csrc" / "qkernels.cpp"
HEADERS = tuple(sorted((Path(__file__).parent / "csrc").glob("*.h")))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
AVX2_ONLY = ["-mno-avx512f"]  # FUSELM_KERNELS=avx2: no AVX-512 code at all, as on an AVX2-only CPU
ABI_VERSION = 6  # fq_version() of the source this module was written against

_reason: str | None = None


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_key() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(lines[:2])


def cache_dir() -> Path:
    root = os.environ.get("FUSELM_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fuselm" / "kernels"


def _flags() -> list[str]:
    return FLAGS + (AVX2_ONLY if os.environ.get("FUSELM_KERNELS", "").lower() == "avx2" else [])


def build(verbose: bool = False) -> Path:
    """Compile the kernels if needed; the path of the shared library. Raises RuntimeError on failure."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    flags = _flags()
    sources = SOURCE.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)
    key = hashlib.sha256(sources + version.encode() + " ".join(flags).encode() + _cpu_key().encode()).hexdigest()[:16]
    variant = "avx2" if AVX2_ONLY[0] in flags else "native"
    out = cache_dir() / f"libfuselm_qkernels-{variant}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # compile to a private name, then rename: concurrent builders (pytest-xdist workers) never see half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *flags, str(SOURCE), "-o", tmp]
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"compiling {SOURCE.name} failed:\n{tail}")
    os.replace(tmp, out)
    for stale in out.parent.glob(f"libfuselm_qkernels-{variant}-*.so"):  # older sources or other CPUs
        if stale != out:
            stale.unlink(missing_ok=True)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.fq_version.restype = cint
    lib.fq_version.argtypes = []
    lib.fq_tile_rows.restype = cint
    lib.fq_tile_rows.argtypes = []
    lib.fq_isa.restype = cint
    lib.fq_isa.argtypes = []
    lib.fq_repack.restype = cint
    lib.fq_repack.argtypes = [cint, ptr, i64, i64, ptr]
    lib.fq_linear.restype = cint
    lib.fq_linear.argtypes = [cint, ptr, i64, i64, ptr, cint, i64, i64, ptr, cint, i64, ptr]
    f32 = ctypes.c_float
    lib.fq_rms_norm.restype = cint
    lib.fq_rms_norm.argtypes = [ptr, ptr, i64, i64, f32, ptr]
    lib.fq_silu_mul.restype = cint
    lib.fq_silu_mul.argtypes = [ptr, i64, i64, ptr]
    lib.fq_decode_attend.restype = cint
    lib.fq_decode_attend.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, ptr, i64, i64, ptr, ptr, i64, i64, i64, i64,
                                     ptr, ptr, ptr, i64, i64, i64, i64, i64, f32, ptr]
    lib.fq_dequant.restype = cint
    lib.fq_dequant.argtypes = [cint, ptr, i64, i64, i64, ptr, i64, cint]


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when this machine cannot build or run it (see the reason)."""
    global _reason
    if os.environ.get("FUSELM_KERNELS", "").lower() == "torch":
        _reason = "FUSELM_KERNELS=torch"
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _reason = f"native kernels are x86-64 only (this is {platform.machine()})"
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        _reason = str(e)
        warnings.warn(f"fuselm: native quantized kernels unavailable, using the slow torch path: {e}", stacklevel=2)
        return None
    _declare(lib)
    if lib.fq_version() != ABI_VERSION:
        _reason = f"kernel library version {lib.fq_version()} != {ABI_VERSION}"
        return None
    return lib


def kernel_isa() -> str | None:
    """The vector extension the loaded kernels were built for ("avx512" or "avx2"), None without kernels."""
    lib = native_library()
    if lib is None:
        return None
    return "avx512" if lib.fq_isa() == 512 else "avx2"


def native_unavailable_reason() -> str | None:
    """Why native_library() is None (None when it loaded)."""
    native_library()
    return _reason



# ---------------------------------------------------------------- the quantizers' library (csrc/quantize*.cpp/.h)

QUANTIZE_SOURCE = Path(__file__).parent / "csrc" / "quantize.cpp"
# -ffp-contract=off: no FMA contraction, so every float step rounds as ggml's reference C does
QUANTIZE_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c++17", "-ffp-contract=off"]
QUANTIZE_ABI = 2


@functools.cache
def quantize_library() -> ctypes.CDLL | None:
    """The native quantizers (built and cached like the kernels), or None where they cannot be built here
    (`FUSELM_KERNELS=torch` also turns them off); callers then use the numpy codecs, which are the spec."""
    if os.environ.get("FUSELM_KERNELS", "").lower() == "torch" or platform.machine().lower() not in ("x86_64",
                                                                                                    "amd64"):
        return None
    cxx = _compiler()
    if cxx is None:
        return None
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    sources = b"".join(p.read_bytes() for p in sorted(QUANTIZE_SOURCE.parent.glob("quantize*")))
    key = hashlib.sha256(sources + version.encode() + " ".join(QUANTIZE_FLAGS).encode()
                         + _cpu_key().encode()).hexdigest()[:16]
    out = cache_dir() / f"libfuselm_quantize-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        proc = subprocess.run([cxx, *QUANTIZE_FLAGS, str(QUANTIZE_SOURCE), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            warnings.warn(f"fuselm: native quantizers unavailable, using the numpy codecs: {proc.stderr[-500:]}",
                          stacklevel=2)
            return None
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    lib.fqz_version.restype, lib.fqz_version.argtypes = ctypes.c_int, []
    lib.fqz_has.restype, lib.fqz_has.argtypes = ctypes.c_int, [ctypes.c_int]
    lib.fqz_quantize.restype = ctypes.c_int
    lib.fqz_quantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_int64]
    return lib if lib.fqz_version() == QUANTIZE_ABI else None

if __name__ == "__main__":
    print(build(verbose=True))
