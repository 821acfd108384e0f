"""Quantize a model to GGUF as llama-quantize does: its per-tensor mixes and overrides, our bit-exact codecs,
importance matrices, gguf-split shards; written atomically, one tensor in memory at a time.

From a GGUF source the output's keys are the source's, in order and with their value types, then
general.quantization_version and general.file_type, then the --override-kv keys and (with an imatrix) the
quantize.imatrix.* keys, as llama.cpp's `llama_model_quantize` writes them; its tensors are taken from the mapped
file as they are (one already in its target type is copied byte for byte), in llama.cpp's order, so memory holds
about one tensor besides the mapping. From an HF directory the keys are fuselm's own conversion of the config and
tokenizer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import archs
from ..archs import gguf_extra_tensors
from ..errors import FuselmError
from ..formats import gguf as gguf_format
from ..formats.gguf_exact import KeyValue, TensorOut, write_exact
from ..formats.gguf_vocab import tokenizer_to_gguf
from ..formats.imatrix import read_imatrix
from ..load import read_source, resolve_model_path
from ..quants import CODECS, quantize, row_bytes
from ..quants.mixes import fallback_report, llama_order, mix_for, plan_types
from ..quants.native_quantize import native_quantize

QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
_FLOAT_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass(frozen=True)
class TensorReport:
    name: str
    type: str
    shape: tuple[int, ...]
    nbytes: int
    imatrix: bool = False  # quantized with importance weights


def quantize_model(src: str | Path, out: str | Path, ftype: str, *, pure: bool = False,
                   leave_output_tensor: bool = False, output_tensor_type: str | None = None,
                   token_embedding_type: str | None = None, tensor_types: Sequence[tuple[str, str]] = (),
                   kv_overrides: Sequence[tuple[str, int | float | bool | str]] = (),
                   imatrix: str | Path | None = None, split_max_bytes: int | None = None,
                   split_max_tensors: int | None = None, progress: bool = True) -> tuple[list[TensorReport], str]:
    """Quantize SRC to OUT (or its gguf-split shards). Returns per-tensor reports and llama.cpp-style fallback
    warnings ('' if none).

    `tensor_types` are (regex, type) pairs tried in order (--tensor-type); `kv_overrides` are (key, value) with
    llama.cpp's typing (int -> UINT32 of |value|, float -> FLOAT32, bool, str); `imatrix` is a GGUF or legacy
    .dat importance-matrix file.
    """
    out = Path(out)
    mix = mix_for(ftype)
    if out.suffix != ".gguf":
        raise FuselmError(f"{out}: output must be a .gguf file")
    weights, imatrix_keys = _load_imatrix(imatrix)
    # A GGUF's tensors are read from the file below (each checked as it is quantized): keep them as the file's bytes
    # here (no dequantized copy of the model) and skip the whole-model scan.
    src = resolve_model_path(src)
    gguf_src = src.suffix == ".gguf"
    source = read_source(src, check=not gguf_src, keep_quantized=gguf_src, keep_16bit=gguf_src)
    config = source.config
    gf = gguf_format.read_gguf(source.path) if source.kind == "gguf" else None
    if gf is not None and any(t.type_name not in ("F32", "F16", "BF16") for t in gf.tensors.values()):
        print(f"warning: {source.path} is quantized; requantizing it loses quality twice", file=sys.stderr)
    tensors = _file_tensors(gf) if gf is not None else _state_tensors(config, source.state)
    order = llama_order(tensors)
    choices = plan_types([(n, tensors[n].shape, tensors[n].type) for n in order], mix.ftype, arch=config.arch,
                         n_layers=config.num_hidden_layers, n_head=config.num_attention_heads,
                         n_head_kv=config.num_key_value_heads, pure=pure, leave_output_tensor=leave_output_tensor,
                         output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type,
                         tensor_types=tensor_types, has_imatrix=weights is not None)
    if weights is None:
        needy = next((c for c in choices if c.requires_imatrix), None)
        if needy is not None:
            raise FuselmError(f"{mix.ftype}: tensor {needy.name} would be {needy.type}, which needs an importance "
                              "matrix (--imatrix FILE; make one with `fuselm imatrix`)")
    outs, reports = [], []
    for choice in choices:
        t = tensors[choice.name]
        if choice.type != t.type and choice.type not in CODECS:  # fail before anything is written
            raise FuselmError(f"tensor {choice.name}: {mix.ftype} plans {choice.type} for it, which fuselm cannot "
                              f"write (codecs: {', '.join(CODECS)})")
        w = None if weights is None or choice.type == t.type else _weights_for(choice, t.shape, weights)
        if w is None and choice.requires_imatrix and choice.type != t.type:
            raise FuselmError(f"tensor {choice.name}: no importance-matrix entry for it in {imatrix}, and its type "
                              f"{choice.type} is garbage without one")
        outs.append(TensorOut(choice.name, choice.type, t.shape, _producer(t, choice.type, choice.name, w)))
        nbytes = int(np.prod(t.shape[:-1], dtype=np.int64)) * row_bytes(choice.type, t.shape[-1])
        reports.append(TensorReport(choice.name, choice.type, t.shape, nbytes, w is not None))
    metadata = [(k, gf.value_types[k], v) for k, v in gf.metadata.items()] if gf is not None else _hf_metadata(source)
    metadata = _set_keys(metadata, [("general.quantization_version", "UINT32", QUANTIZATION_VERSION),
                                    ("general.file_type", "UINT32", mix.file_type),
                                    *(_typed_override(k, v) for k, v in kv_overrides), *imatrix_keys],
                         remove=_SPLIT_KEYS)
    companion = None
    if source.vqgan is not None:  # committed with the model: companion first, both with the same pair id
        pair_id, companion_file, write_companion = gguf_format.companion_for(out, *source.vqgan)
        if (gguf_format.COMPANION_ID_KEY, "STRING", pair_id) not in metadata:  # (a source's own id stays put)
            metadata = _set_keys(metadata, [(gguf_format.COMPANION_ID_KEY, "STRING", pair_id)])
        companion = (companion_file, write_companion)
    else:
        metadata = _set_keys(metadata, [], remove=[gguf_format.COMPANION_ID_KEY])
    write_exact(out, metadata, outs, max_bytes=split_max_bytes, max_tensors=split_max_tensors, progress=progress,
                companion=companion)
    if companion is None:
        gguf_format.remove_stale_companion(out)
    return reports, fallback_report(choices)


# ---------------------------------------------------------------- tensors


@dataclass(frozen=True)
class _SourceTensor:
    """A tensor to convert: its shape, GGML type, float values (made on request) and, from a GGUF, its bytes."""

    shape: tuple[int, ...]
    type: str
    values: Callable[[], torch.Tensor]
    raw: Callable[[], np.ndarray] | None = None


def _file_tensors(gf) -> dict[str, _SourceTensor]:
    """A GGUF source's own tensors, as llama.cpp reads them: same names, layouts and bytes (mapped, not loaded)."""
    return {name: _SourceTensor(t.shape, t.type_name, t.to_torch, lambda t=t: t.data) for name, t in gf.tensors.items()}


def _state_tensors(config, state: Mapping[str, torch.Tensor]) -> dict[str, _SourceTensor]:
    tensors = dict(archs.internal_to_gguf(config, state))
    for name, t in gguf_extra_tensors(config).items():  # e.g. rope_freqs.weight for llama3 RoPE scaling
        tensors.setdefault(name, torch.as_tensor(t))
    return {n: _SourceTensor(tuple(t.shape), _FLOAT_DTYPES.get(t.dtype, "F32"), lambda t=t: t)
            for n, t in tensors.items()}


def _producer(src: _SourceTensor, type_: str, name: str, weights: np.ndarray | None) -> Callable[[], np.ndarray]:
    """The tensor's bytes in `type_`, made when the writer asks for them. A tensor already in that type is
    copied as it is, as llama.cpp does."""
    if type_ == src.type and src.raw is not None:
        return src.raw
    if type_ == "F32":
        return lambda: src.values().detach().to(torch.float32).contiguous().numpy()
    if type_ == "F16":
        return lambda: src.values().detach().to(torch.float16).contiguous().numpy()
    if type_ == "BF16":
        return lambda: src.values().detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    cols = src.shape[-1]

    def produce() -> np.ndarray:
        x = src.values().detach().reshape(-1, cols)
        if weights is None:
            return _quantize_fast(x, type_, name)
        # One importance vector per matrix: experts of a 3-D tensor each get their own slice.
        mats = weights.reshape(-1, cols)
        rows = x.shape[0] // mats.shape[0]
        parts = [quantize(x[i * rows:(i + 1) * rows].float(), type_, name=name, imatrix=torch.from_numpy(w)).numpy()
                 for i, w in enumerate(mats)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    return produce


def _quantize_fast(x: torch.Tensor, type_: str, name: str) -> np.ndarray:
    """The native quantizer where it has the type (byte-equal to the codec), else the numpy codec, which also
    raises the one clear error for NaN/Inf input or an overflowing scale (native_quantize then returns None)."""
    out = native_quantize(x, type_)  # reads fp16/bf16 rows as they are
    return out if out is not None else quantize(x.float(), type_, name=name).numpy()


def _weights_for(choice, shape: tuple[int, ...], weights: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """llama.cpp's lookup: the entry of this name, of length cols * n_mat; a wrong length is an error, except for
    token_embd (which llama-imatrix never sees, and which then goes without)."""
    w = weights.get(choice.name)
    if w is None:
        return None
    n_mat = shape[-3] if len(shape) >= 3 else 1
    if w.size != shape[-1] * n_mat:
        if choice.name == "token_embd.weight":
            return None
        raise FuselmError(f"tensor {choice.name}: imatrix entry has {w.size} values; expected {shape[-1] * n_mat} "
                          f"(columns x matrices)")
    return w


def _load_imatrix(path: str | Path | None) -> tuple[dict[str, np.ndarray] | None, list[KeyValue]]:
    """(importance vectors by tensor name, the quantize.imatrix.* keys llama-quantize adds), or (None, [])."""
    if path is None:
        return None, []
    im = read_imatrix(path)
    if not im.is_legacy and not im.has_metadata:
        raise FuselmError(f"{path}: GGUF imatrix without its imatrix.datasets / chunk_count / chunk_size keys")
    weights = im.importance()
    for name, w in weights.items():
        if not np.isfinite(w).all():
            raise FuselmError(f"{path}: entry {name!r} has non-finite values")
    keys: list[KeyValue] = [("quantize.imatrix.file", "STRING", str(path)[:127])]
    if im.datasets:
        keys.append(("quantize.imatrix.dataset", "STRING", im.datasets[0][:127]))
    keys.append(("quantize.imatrix.entries_count", "UINT32", len(weights)))
    if im.chunk_count > 0:
        keys.append(("quantize.imatrix.chunks_count", "UINT32", im.chunk_count))
    return weights, keys


# ---------------------------------------------------------------- metadata


def _hf_metadata(source) -> list[KeyValue]:
    from ..formats.gguf_write import typed_metadata  # the writer's own typing of Python values

    config = source.config
    values: dict[str, Any] = {"general.architecture": config.arch}
    if source.tokenizer is not None:
        values.update(tokenizer_to_gguf(source.tokenizer, config.vocab_size))
    values.update(archs.config_to_gguf_metadata(config))
    if source.chat_template:
        values["tokenizer.chat_template"] = source.chat_template
    return typed_metadata(values)


def _set_keys(metadata: list[KeyValue], new: Sequence[KeyValue], remove: Sequence[str] = ()) -> list[KeyValue]:
    """gguf_set_val: a key set again leaves its place and goes to the end."""
    out = [kv for kv in metadata if kv[0] not in remove]
    for kv in new:
        out = [old for old in out if old[0] != kv[0]] + [kv]
    return out


def _typed_override(key: str, value: int | float | bool | str) -> KeyValue:
    """llama-quantize's --override-kv typing: int -> UINT32 of |value| (llama.cpp PR 14182), float -> FLOAT32."""
    if not key or len(key) >= 128:
        raise FuselmError(f"--override-kv key {key!r}: expected 1 to 127 characters")
    if isinstance(value, bool):
        return key, "BOOL", value
    if isinstance(value, int):
        return key, "UINT32", abs(value) & 0xFFFFFFFF
    if isinstance(value, float):
        return key, "FLOAT32", value
    if isinstance(value, str):
        if len(value) > 127:
            raise FuselmError(f"--override-kv {key}: string values are limited to 127 characters")
        return key, "STRING", value
    raise FuselmError(f"--override-kv {key}: unsupported value {value!r} (expected int, float, bool or str)")


def parse_split_size(text: str) -> int:
    """gguf-split's --split-max-size: N followed by M (10^6 bytes) or G (10^9 bytes)."""
    units = {"M": 1000**2, "G": 1000**3}
    number, unit = text[:-1], text[-1:].upper()
    if unit not in units or not number.isdigit() or int(number) <= 0:
        raise FuselmError(f"--split-max-size {text!r}: expected a positive whole number followed by M or G "
                          "(e.g. 4G, 500M)")
    return int(number) * units[unit]


def summary_table(reports: list[TensorReport]) -> str:
    by_type: dict[str, list[int]] = {}
    for r in reports:
        n = 1
        for s in r.shape:
            n *= s
        entry = by_type.setdefault(r.type, [0, 0, 0])
        entry[0] += 1
        entry[1] += n
        entry[2] += r.nbytes
    lines = [f"{'type':<8} {'tensors':>8} {'weights':>14} {'MiB':>10} {'bits/weight':>12}"]
    total_n = total_b = 0
    for t, (count, n, b) in sorted(by_type.items(), key=lambda kv: -kv[1][2]):
        lines.append(f"{t:<8} {count:>8} {n:>14,} {b / 2**20:>10.2f} {8 * b / max(n, 1):>12.3f}")
        total_n += n
        total_b += b
    lines.append(f"{'total':<8} {len(reports):>8} {total_n:>14,} {total_b / 2**20:>10.2f} "
                 f"{8 * total_b / max(total_n, 1):>12.3f}")
    return "\n".join(lines)

