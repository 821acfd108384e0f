"""Regression tests (issue 16): safetensors headers are type-checked and bounds-checked before use.

Each malformed file is also given to the reference reader (huggingface/safetensors), which must refuse it too;
ours must refuse it with one FuselmError naming the file, the tensor and the field.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from fuselm.errors import FuselmError
from fuselm.formats.hf import open_safetensors, read_weights


def _write(path, header, data: bytes) -> None:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)},
              str(path))
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8:8 + n])
    return header, path.read_bytes()[8 + n:]


CASES = [
    # (mutation of the good header, regex the error must match after the file name)
    (lambda h: [1, 2], r"expected a JSON object after the 8-byte length"),
    (lambda h: {**h, "a": None}, r"tensor 'a'.*expected an object"),
    (lambda h: {**h, "a": {k: v for k, v in h["a"].items() if k != "data_offsets"}},
     r"tensor 'a'.*missing field 'data_offsets'"),
    (lambda h: {**h, "a": {**h["a"], "data_offsets": [0]}}, r"tensor 'a'.*'data_offsets'.*\[begin, end\]"),
    (lambda h: {**h, "a": {**h["a"], "dtype": ["F32"]}}, r"tensor 'a'.*'dtype'"),
    (lambda h: {**h, "a": {**h["a"], "dtype": "F99"}}, r"tensor 'a'.*'dtype' is 'F99'"),
    (lambda h: {**h, "a": {**h["a"], "shape": None}}, r"tensor 'a'.*'shape' is None"),
    (lambda h: {**h, "a": {**h["a"], "shape": "64"}}, r"tensor 'a'.*'shape' is '64'"),
    (lambda h: {**h, "a": {**h["a"], "shape": [2.0, 3]}}, r"tensor 'a'.*'shape'"),
    (lambda h: {**h, "a": {**h["a"], "shape": [-2, -3]}}, r"tensor 'a'.*'shape'.*non-negative"),
    (lambda h: {**h, "a": {**h["a"], "shape": [2, 3, 2**62]}}, r"tensor 'a'.*needs \d+"),
    (lambda h: {**h, "a": {**h["a"], "data_offsets": [-8, 16]}}, r"tensor 'a'.*0 <= begin <= end"),
    (lambda h: {**h, "b": {**h["b"], "data_offsets": [16, 24]}}, r"tensor 'b'.*overlaps"),
    (lambda h: {**h, "__metadata__": {"format": 1}}, r"'__metadata__' must be an object of strings"),
]


@pytest.mark.parametrize("change,message", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_header_is_refused_by_both_readers(tmp_path, change, message):
    header, data = _good(tmp_path)
    path = tmp_path / "model.safetensors"
    _write(path, change(dict(header)), data)
    with pytest.raises(Exception):  # noqa: B017 (the reference raises SafetensorError or a decode error)
        load_file(str(path))  # the reference refuses it too
    with pytest.raises(FuselmError, match=rf"model\.safetensors.*{message}"):
        open_safetensors(path)


def test_header_bytes_are_never_weights(tmp_path):
    """Offsets are relative to the data buffer: a tensor cannot start inside the header, and tensors must tile the
    buffer (a gap would leave bytes that belong to nothing)."""
    header, data = _good(tmp_path)
    header["b"]["data_offsets"] = [28, 36]  # skips 4 bytes
    path = tmp_path / "gap.safetensors"
    _write(path, header, data + b"\0" * 4)
    with pytest.raises(FuselmError, match=r"gap\.safetensors: tensor 'b'.*gap of 4 bytes"):
        open_safetensors(path)
    with pytest.raises(Exception):  # noqa: B017
        load_file(str(path))


def test_truncated_and_oversized_files(tmp_path):
    header, data = _good(tmp_path)
    path = tmp_path / "cut.safetensors"
    _write(path, header, data[:-1])
    with pytest.raises(FuselmError, match=r"cut\.safetensors: truncated safetensors file: tensor 'b'"):
        open_safetensors(path)
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(FuselmError, match=r"cut\.safetensors: corrupt safetensors file \(header length"):
        open_safetensors(path)
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(FuselmError, match=r"cut\.safetensors: corrupt safetensors header"):
        open_safetensors(path)


def test_good_file_matches_the_reference(tmp_path):
    _good(tmp_path)
    ours, ref = open_safetensors(tmp_path / "good.safetensors"), load_file(str(tmp_path / "good.safetensors"))
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) and ours[k].dtype == ref[k].dtype for k in ref)


def test_legacy_bin_loads_without_mmap(tmp_path):
    """A non-zip (legacy) pytorch_model.bin cannot be memory-mapped: it loads whole, still weights_only."""
    tensors = {"model.embed_tokens.weight": torch.randn(4, 3), "lm_head.weight": torch.randn(4, 3)}
    torch.save(tensors, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    back = read_weights(tmp_path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(RuntimeError, match="mmap"):  # what torch itself does with mmap=True
        torch.load(tmp_path / "pytorch_model.bin", weights_only=True, mmap=True)


def test_index_with_bad_shard_names(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(FuselmError, match=r"model\.safetensors\.index\.json: shard '\.\./\.\./etc/passwd'"):
        read_weights(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": 5}}))
    with pytest.raises(FuselmError, match=r"index\.json: key 'weight_map' must be an object"):
        read_weights(tmp_path)
