"""The imatrix file format against llama.cpp: ggml's own GGUF writer (libggml-base, the calls llama-imatrix's
save_imatrix makes) writes the reference file; the legacy .dat reference is written from imatrix-loader.cpp's
layout; llama-quantize's use of the file (sum / count per expert) is recomputed independently."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from ggml_ref import libggml_base

from fuselm.errors import FuselmError
from fuselm.formats.imatrix import ImatrixEntry, read_imatrix, write_imatrix


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _ggml():
    lib = libggml_base()
    sigs = {
        "ggml_init": (ctypes.c_void_p, [_InitParams]),
        "ggml_free": (None, [ctypes.c_void_p]),
        "ggml_new_tensor_2d": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
        "ggml_get_data": (ctypes.c_void_p, [ctypes.c_void_p]),
        "ggml_set_name": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
        "gguf_init_empty": (ctypes.c_void_p, []),
        "gguf_free": (None, [ctypes.c_void_p]),
        "gguf_set_val_str": (None, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]),
        "gguf_set_val_u32": (None, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]),
        "gguf_set_arr_str": (None, [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p),
                                    ctypes.c_size_t]),
        "gguf_add_tensor": (None, [ctypes.c_void_p, ctypes.c_void_p]),
        "gguf_write_to_file": (ctypes.c_bool, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_bool]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def ggml_save_imatrix(path: Path, stats: dict[str, tuple[np.ndarray, np.ndarray]], datasets: list[str],
                      chunk_count: int, chunk_size: int) -> None:
    """llama-imatrix's save_imatrix, call for call: keys, then per sorted name an [ne0, nmat] in_sum2 and a
    [1, nmat] counts tensor, written by gguf_write_to_file."""
    lib = _ggml()
    ctx = lib.ggml_init(_InitParams(64 << 20, None, False))
    g = lib.gguf_init_empty()
    try:
        lib.gguf_set_val_str(g, b"general.type", b"imatrix")
        arr = (ctypes.c_char_p * max(1, len(datasets)))(*[d.encode() for d in datasets])
        lib.gguf_set_arr_str(g, b"imatrix.datasets", arr, len(datasets))
        lib.gguf_set_val_u32(g, b"imatrix.chunk_count", chunk_count)
        lib.gguf_set_val_u32(g, b"imatrix.chunk_size", chunk_size)
        for name in sorted(stats):
            sums, counts = stats[name]
            nmat, ne0 = sums.shape
            for suffix, values, shape in ((".in_sum2", sums, (ne0, nmat)), (".counts", counts, (1, nmat))):
                t = lib.ggml_new_tensor_2d(ctx, int(gguf.GGMLQuantizationType.F32), *shape)
                lib.ggml_set_name(t, (name + suffix).encode())
                data = np.ascontiguousarray(values, np.float32).reshape(-1)
                ctypes.memmove(lib.ggml_get_data(t), data.ctypes.data, data.nbytes)
                lib.gguf_add_tensor(g, t)
        assert lib.gguf_write_to_file(g, str(path).encode(), False)
    finally:
        lib.gguf_free(g)
        lib.ggml_free(ctx)


def _stats(rng) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        "blk.0.attn_q.weight": (rng.random((1, 64), np.float32) * 50, np.array([1024.0], np.float32)),
        "blk.1.ffn_down.weight": (rng.random((1, 96), np.float32) * 50, np.array([1024.0], np.float32)),
        "blk.10.attn_v.weight": (rng.random((1, 64), np.float32), np.array([512.0], np.float32)),
        # experts: one row and one count per expert; expert 2 saw no token
        "blk.0.ffn_up_exps.weight": (rng.random((3, 64), np.float32), np.array([100.0, 7.0, 0.0], np.float32)),
    }


@pytest.mark.parametrize("datasets", [["wiki.train.txt"], [], ["a.txt", "b.txt"]])
def test_written_bytes_equal_llama_imatrix(tmp_path, datasets):
    stats = _stats(np.random.default_rng(0))
    ggml_save_imatrix(tmp_path / "ref.gguf", stats, datasets, chunk_count=2, chunk_size=512)
    entries = {n: ImatrixEntry(s, c.astype(np.int64)) for n, (s, c) in stats.items()}
    write_imatrix(tmp_path / "ours.gguf", entries, datasets=tuple(datasets), chunk_count=2, chunk_size=512)
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_read_llama_imatrix_file(tmp_path):
    stats = _stats(np.random.default_rng(1))
    ggml_save_imatrix(tmp_path / "ref.gguf", stats, ["wiki.txt"], chunk_count=3, chunk_size=256)
    im = read_imatrix(tmp_path / "ref.gguf")
    assert (im.datasets, im.chunk_count, im.chunk_size, im.is_legacy, im.has_metadata) == (
        ("wiki.txt",), 3, 256, False, True)
    assert sorted(im.entries) == sorted(stats)
    weights = im.importance()
    for name, (sums, counts) in stats.items():
        e = im.entries[name]
        assert np.array_equal(e.sums, sums) and e.counts.tolist() == counts.astype(int).tolist()
        # llama-quantize's load_imatrix: sum / count per expert, 1 where the expert saw nothing
        expect = np.concatenate([s / np.float32(c) if c > 0 else np.ones_like(s) for s, c in zip(sums, counts)])
        assert np.array_equal(weights[name], expect.astype(np.float32)), name


def _legacy(entries: list[tuple[str, int, np.ndarray]], trailer: tuple[int, str] | None) -> bytes:
    """The legacy .dat layout, from common_imatrix_load_legacy."""
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, values.size)
        out += values.astype("<f4").tobytes()
    if trailer is not None:
        out += struct.pack("<ii", trailer[0], len(trailer[1])) + trailer[1].encode()
    return out


def test_read_legacy_dat(tmp_path):
    rng = np.random.default_rng(2)
    entries = [("blk.0.attn_k.weight", 10, rng.random(64, np.float32)), ("blk.0.ffn_down.weight", 0,
                                                                          rng.random(96, np.float32))]
    (tmp_path / "a.dat").write_bytes(_legacy(entries, (10, "calib.txt")))
    im = read_imatrix(tmp_path / "a.dat")
    assert im.is_legacy and im.chunk_count == 10 and im.datasets == ("calib.txt",)
    w = im.importance()
    assert np.array_equal(w["blk.0.attn_k.weight"], entries[0][2] / np.float32(10))
    assert np.array_equal(w["blk.0.ffn_down.weight"], entries[1][2])  # ncall 0: values as stored
    (tmp_path / "b.dat").write_bytes(_legacy(entries[:1], None))
    assert read_imatrix(tmp_path / "b.dat").chunk_count == 0


def test_bad_files_fail_clearly(tmp_path):
    rng = np.random.default_rng(3)
    good = _legacy([("blk.0.attn_k.weight", 10, rng.random(64, np.float32))], (1, "x"))
    (tmp_path / "trunc.dat").write_bytes(good[:30])
    with pytest.raises(FuselmError, match="trunc.dat: truncated legacy imatrix"):
        read_imatrix(tmp_path / "trunc.dat")
    (tmp_path / "junk.dat").write_bytes(good + b"xx")
    with pytest.raises(FuselmError, match="unexpected bytes"):
        read_imatrix(tmp_path / "junk.dat")
    (tmp_path / "empty.dat").write_bytes(struct.pack("<i", 0))
    with pytest.raises(FuselmError, match="not an imatrix file"):
        read_imatrix(tmp_path / "empty.dat")
    # a GGUF with a sums tensor and no counts, and one of the wrong type
    w = gguf.GGUFWriter(str(tmp_path / "half.gguf"), "llama")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones(64, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(FuselmError, match="mismatched sums and counts"):
        read_imatrix(tmp_path / "half.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "f16.gguf"), "llama")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones(64, np.float16))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(FuselmError, match="F16; imatrix sums and counts are F32"):
        read_imatrix(tmp_path / "f16.gguf")
    stats = _stats(rng)
    ggml_save_imatrix(tmp_path / "ok.gguf", stats, ["d"], 1, 16)
    raw = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(FuselmError, match="cut.gguf: truncated"):
        read_imatrix(tmp_path / "cut.gguf")
    with pytest.raises(FuselmError, match="cannot read imatrix file"):
        read_imatrix(tmp_path / "missing.gguf")
