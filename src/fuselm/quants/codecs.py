"""The codec table and the public quantize / dequantize / unpack over [rows, cols] tensors.

Every codec works on flat blocks: quantize maps float32 [N, block] to bytes [N, type_size], unpack maps
bytes back to codes and scales. Rows are processed in chunks so that the search buffers stay small.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from fuselm.errors import FuselmError
from fuselm.quants import iq1, iq1m, iq2, iq3, iq4nl, kquants, legacy, mxfp4, plain, ternary
from fuselm.quants.ggml_types import ggml_type, row_bytes
from fuselm.quants.unpacked import Unpacked


@dataclass(frozen=True)
class Codec:
    # float32 blocks [N, block] -> uint8 [N, type_size] (numpy); None for types that require an imatrix
    quantize: Callable[[np.ndarray], np.ndarray] | None
    unpack: Callable[[torch.Tensor], Unpacked] | None  # uint8 [N, type_size] -> codes/scales per block
    dequantize: Callable[[torch.Tensor], torch.Tensor] | None = None  # element-wise types only
    chunk_elems: int = 1 << 18  # elements per quantize chunk: the search buffers scale with it
    # with an importance vector: float32 rows [R, cols] and qw [cols] -> uint8 [R, row_bytes]; None where
    # ggml ignores the vector (F32..BF16, Q8_0, TQ1_0, TQ2_0, MXFP4)
    weighted: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None

    @property
    def requires_imatrix(self) -> bool:
        """ggml_quantize_requires_imatrix: ggml has no quantizer for the type without importance weights."""
        return self.quantize is None


CODECS: dict[str, Codec] = {
    "F32": Codec(plain.quantize_f32, None, plain.dequantize_f32),
    "F16": Codec(plain.quantize_f16, None, plain.dequantize_f16),
    "BF16": Codec(plain.quantize_bf16, None, plain.dequantize_bf16),
    "Q4_0": Codec(legacy.quantize_q4_0, legacy.unpack_q4_0, weighted=legacy.quantize_q4_0_weighted),
    "Q4_1": Codec(legacy.quantize_q4_1, legacy.unpack_q4_1, weighted=legacy.quantize_q4_1_weighted),
    "Q5_0": Codec(legacy.quantize_q5_0, legacy.unpack_q5_0, weighted=legacy.quantize_q5_0_weighted),
    "Q5_1": Codec(legacy.quantize_q5_1, legacy.unpack_q5_1, weighted=legacy.quantize_q5_1_weighted),
    "Q8_0": Codec(legacy.quantize_q8_0, legacy.unpack_q8_0),
    "Q2_K": Codec(kquants.quantize_q2_k, kquants.unpack_q2_k, chunk_elems=1 << 17,
                  weighted=kquants.quantize_q2_k_weighted),
    "Q3_K": Codec(kquants.quantize_q3_k, kquants.unpack_q3_k, chunk_elems=1 << 18,
                  weighted=kquants.quantize_q3_k_weighted),
    "Q4_K": Codec(kquants.quantize_q4_k, kquants.unpack_q4_k, chunk_elems=1 << 17,
                  weighted=kquants.quantize_q4_k_weighted),
    "Q5_K": Codec(kquants.quantize_q5_k, kquants.unpack_q5_k, chunk_elems=1 << 17,
                  weighted=kquants.quantize_q5_k_weighted),
    "Q6_K": Codec(kquants.quantize_q6_k, kquants.unpack_q6_k, chunk_elems=1 << 18,
                  weighted=kquants.quantize_q6_k_weighted),
    "IQ4_NL": Codec(iq4nl.quantize_iq4_nl, iq4nl.unpack_iq4_nl, chunk_elems=1 << 18,
                    weighted=iq4nl.quantize_iq4_nl_weighted),
    "IQ4_XS": Codec(iq4nl.quantize_iq4_xs, iq4nl.unpack_iq4_xs, chunk_elems=1 << 18,
                    weighted=iq4nl.quantize_iq4_xs_weighted),
    "TQ1_0": Codec(ternary.quantize_tq1_0, ternary.unpack_tq1_0),
    "TQ2_0": Codec(ternary.quantize_tq2_0, ternary.unpack_tq2_0),
    "MXFP4": Codec(mxfp4.quantize_mxfp4, mxfp4.unpack_mxfp4, chunk_elems=1 << 16),
    "IQ2_XS": Codec(None, iq2.unpack_iq2_xs, chunk_elems=1 << 16, weighted=iq2.quantize_iq2_xs),
    "IQ2_XXS": Codec(None, iq2.unpack_iq2_xxs, chunk_elems=1 << 16, weighted=iq2.quantize_iq2_xxs),
    "IQ2_S": Codec(iq2.quantize_iq2_s, iq2.unpack_iq2_s, chunk_elems=1 << 16, weighted=iq2.quantize_iq2_s),
    "IQ1_S": Codec(None, iq1.unpack_iq1_s, chunk_elems=1 << 16, weighted=iq1.quantize_iq1_s),
    "IQ1_M": Codec(iq1m.quantize_iq1_m, iq1m.unpack_iq1_m, chunk_elems=1 << 16, weighted=iq1m.quantize_iq1_m),
    "IQ3_XXS": Codec(iq3.quantize_iq3_xxs, iq3.unpack_iq3_xxs, chunk_elems=1 << 16, weighted=iq3.quantize_iq3_xxs),
    "IQ3_S": Codec(iq3.quantize_iq3_s, iq3.unpack_iq3_s, chunk_elems=1 << 16, weighted=iq3.quantize_iq3_s),
}


def _codec(type: str) -> tuple[str, Codec]:
    name = ggml_type(type).name
    return name, CODECS[name]


def _as_float_matrix(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise FuselmError(f"tensor {name!r}: expected a floating-point tensor to quantize, got {x.dtype}")
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise FuselmError(f"tensor {name!r}: expected a floating-point tensor to quantize, got {x.dtype}")
    if x.ndim != 2:
        raise FuselmError(f"tensor {name!r}: expected a 2-D [rows, cols] tensor to quantize, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _as_importance(w: torch.Tensor | np.ndarray, cols: int, name: str) -> np.ndarray:
    """The importance vector of a [rows, cols] tensor: float32 [cols], finite and >= 0."""
    if isinstance(w, torch.Tensor):
        if w.dtype != torch.float32:
            raise FuselmError(f"tensor {name!r}: expected a float32 importance vector, got {w.dtype}")
        w = w.detach().cpu().numpy()
    w = np.asarray(w)
    if w.dtype != np.float32:
        raise FuselmError(f"tensor {name!r}: expected a float32 importance vector, got {w.dtype}")
    if w.shape != (cols,):
        raise FuselmError(
            f"tensor {name!r}: expected an importance vector of shape ({cols},) (one value per column), "
            f"got {w.shape}"
        )
    if not np.isfinite(w).all():
        raise FuselmError(f"tensor {name!r}: the importance vector contains NaN or Inf values")
    if (w < 0).any():
        raise FuselmError(f"tensor {name!r}: the importance vector has negative values (min {float(w.min()):g})")
    return np.ascontiguousarray(w)


def requires_imatrix(type: str) -> bool:
    """Whether llama.cpp refuses to quantize to `type` without an importance matrix (IQ1_S, IQ2_XXS, IQ2_XS)."""
    return _codec(type)[1].requires_imatrix


def quantize(
    x: torch.Tensor | np.ndarray,
    type: str,
    *,
    imatrix: torch.Tensor | np.ndarray | None = None,
    name: str = "tensor",
    threads: int | None = None,
) -> torch.Tensor:
    """Quantize x [rows, cols] to GGML `type`: uint8 [rows, row_bytes], byte for byte what llama.cpp's
    ggml_quantize_chunk writes, given the same importance vector `imatrix` (float32 [cols], the per-column
    mean squared activations) or none. Types ggml quantizes without one ignore it, as ggml does.

    Rows go through in chunks, spread over `threads` worker threads (default torch.get_num_threads()).
    Raises FuselmError for an unknown type, cols not a multiple of the block size, NaN/Inf values, a bad
    importance vector, or a type that requires one (requires_imatrix) without it.
    """
    tname, codec = _codec(type)
    x = _as_float_matrix(x, name)
    rows, cols = x.shape
    block = ggml_type(tname).block_size
    if cols % block:
        raise FuselmError(
            f"tensor {name!r}: row length {cols} is not a multiple of the {tname} block size {block}"
        )
    qw = None if imatrix is None else _as_importance(imatrix, cols, name)
    if qw is None and codec.requires_imatrix:
        raise FuselmError(f"tensor {name!r}: {tname} requires an importance matrix (imatrix); none was given")
    out = np.empty((rows, row_bytes(tname, cols)), dtype=np.uint8)
    step = max(1, codec.chunk_elems // max(cols, 1))

    def run(r0: int) -> None:
        chunk = x[r0 : r0 + step]
        if not np.isfinite(chunk).all():
            raise FuselmError(f"tensor {name!r}: contains NaN or Inf values, cannot quantize to {tname}")
        with np.errstate(all="ignore"):  # ignored groups and too-large values make inf/NaN on the way
            if qw is not None and codec.weighted is not None:
                out[r0 : r0 + step] = codec.weighted(chunk, qw)
            else:  # codec.quantize is set: types without one were refused above
                out[r0 : r0 + step] = codec.quantize(chunk.reshape(-1, block)).reshape(chunk.shape[0], -1)

    starts = range(0, rows, step)
    workers = min(len(starts), threads or torch.get_num_threads())
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, starts))  # numpy drops the GIL inside each operation
    else:
        for r0 in starts:
            run(r0)
    _check_halves(out, tname, name, x)
    return torch.from_numpy(out)


def _check_halves(out: np.ndarray, tname: str, name: str, x: np.ndarray) -> None:
    """Values too large for the type overflow an fp16 scale (or the bf16 value) to inf; llama.cpp rejects
    such data when it validates rows, so refuse to write it."""
    t = ggml_type(tname)
    if out.size == 0:
        return
    exponent = 0x7F80 if tname == "BF16" else 0x7C00
    blocks = out.reshape(-1, t.type_size)
    halves = [blocks[:, off].astype(np.uint16) | (blocks[:, off + 1].astype(np.uint16) << 8) for off in t.half_fields]
    if tname == "IQ1_M":  # its fp16 scale is the top nibbles of the four scale words
        words = blocks[:, 48:56].copy().view("<u2")
        halves.append(((words >> 12) << np.array([0, 4, 8, 12], dtype=np.uint16)).sum(1, dtype=np.uint16))
    for half in halves:
        if ((half & exponent) == exponent).any():
            raise FuselmError(
                f"tensor {name!r}: values too large for {tname} (max |x| = {float(np.abs(x).max()):g}): "
                f"a half-precision scale overflows to inf"
            )


def _as_bytes(data: torch.Tensor | np.ndarray, type: str, shape: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    nbytes = rows * row_bytes(type, cols)
    if isinstance(data, torch.Tensor):
        flat = data.detach().cpu().contiguous().view(torch.uint8).reshape(-1)
    else:
        arr = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        flat = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    if flat.numel() != nbytes:
        raise FuselmError(f"{type} data of shape {tuple(shape)}: expected {nbytes} bytes, got {flat.numel()}")
    return flat.reshape(rows, -1)


def unpack(data: torch.Tensor | np.ndarray, type: str, shape: tuple[int, int]) -> Unpacked:
    """Decode block-scaled data to integer codes and per-group scales (see Unpacked for the exact form).

    Per type: Q4_0/Q5_0/Q8_0 codes int8 (q - 8 / q - 16 / q), group 32, no min; Q4_1/Q5_1 codes uint8, min = -m;
    Q2_K codes uint8 0..3, group 16, min; Q3_K codes int8 -4..3, group 16; Q4_K/Q5_K codes uint8 0..15 / 0..31,
    group 32, min; Q6_K codes int8 -32..31, group 16; IQ4_NL/IQ4_XS codes are the int8 codebook values
    (kvalues_iq4nl), group 32; MXFP4 codes the int8 values of kvalues_mxfp4, group 32; TQ1_0/TQ2_0 codes
    -1..1, group 256; IQ2/IQ3 codes the signed int8 grid values, group 16 (IQ2_XS, IQ2_S) or 32; IQ1_S/IQ1_M
    codes 8 * (grid value +- 1/8), i.e. odd int8, with scale dl / 8, group 32 / 16.
    In all cases w = scale * codes - min.
    """
    tname, codec = _codec(type)
    if codec.unpack is None:
        raise FuselmError(f"{tname} is an element-wise type with no codes and scales; use dequantize")
    rows, cols = shape
    t = ggml_type(tname)
    blocks = _as_bytes(data, tname, shape).reshape(-1, t.type_size)
    u = codec.unpack(blocks)
    per_row = cols // u.group
    return Unpacked(
        u.codes.reshape(rows, cols),
        u.scale.reshape(rows, per_row),
        None if u.min is None else u.min.reshape(rows, per_row),
        u.group,
    )


def dequantize(data: torch.Tensor | np.ndarray, type: str, shape: tuple[int, int]) -> torch.Tensor:
    """GGML bytes [rows, row_bytes] (tensor, numpy array or memmap) -> float32 [rows, cols].

    Equal, bit for bit, to gguf-py's gguf.quants.dequantize.
    """
    tname, codec = _codec(type)
    rows, cols = shape
    data = _as_bytes(data, tname, shape)
    if codec.dequantize is not None:
        return codec.dequantize(data).reshape(rows, cols)
    out = torch.empty((rows, cols), dtype=torch.float32)
    step = max(1, (1 << 22) // max(cols, 1))
    for r0 in range(0, rows, step):
        part = data[r0 : r0 + step]
        out[r0 : r0 + step] = unpack(part, tname, (part.shape[0], cols)).dequantize()
    return out
