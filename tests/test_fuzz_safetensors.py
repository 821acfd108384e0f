"""Property-based fuzzing (hypothesis, fixed budget) of the safetensors reader against the reference reader
(huggingface/safetensors): whatever the header says, ours refuses what the reference refuses, with one FuselmError
naming the file, and what ours accepts the reference reads to the same tensors."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from fuselm.errors import FuselmError
from fuselm.formats.hf import open_safetensors

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "U8": torch.uint8}

tensor_specs = st.dictionaries(st.text("abcdefgh.", min_size=1, max_size=6),
                               st.tuples(st.sampled_from(list(DTYPES)), st.lists(st.integers(0, 4), max_size=3)),
                               min_size=1, max_size=4)
hostile = (st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats() | st.text(max_size=5)
           | st.lists(st.integers(-(2**66), 2**66), max_size=3) | st.sampled_from(["F8_E4M3", "U16", "F32", "BF16"]))
mutation = st.tuples(st.integers(0, 10), st.sampled_from(["dtype", "shape", "data_offsets", None]), hostile)


def _file(specs: dict, path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    save_file({n: (torch.randn(shape, generator=g) * 9).to(DTYPES[d]) for n, (d, shape) in specs.items()}, str(path))


def _check(path: Path) -> None:
    try:
        reference = load_file(str(path))
    except Exception:  # noqa: BLE001 (the reference raises SafetensorError, or fails to decode the header)
        reference = None
    try:
        ours = open_safetensors(path)
    except FuselmError as err:
        assert str(err).startswith(str(path)), err
        return
    assert reference is not None, "accepted a file the reference refuses"
    assert ours.keys() == reference.keys()
    for name in ours:
        assert ours[name].dtype == reference[name].dtype and torch.equal(ours[name], reference[name]), name


@FUZZ
@given(tensor_specs, mutation)
def test_header_mutations(specs, change):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.safetensors"
        _file(specs, path)
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        index, field, value = change
        name = sorted(k for k in header if k != "__metadata__")[index % len(specs)]
        if field is None:
            header[name] = value
        else:
            header[name][field] = value
        text = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
        _check(path)


@FUZZ
@given(tensor_specs, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
       st.integers(0, 64))
def test_byte_mutations(specs, writes, cut):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.safetensors"
        _file(specs, path)
        raw = bytearray(path.read_bytes())
        for pos, byte in writes:
            raw[pos % len(raw)] = byte
        path.write_bytes(bytes(raw[: len(raw) - cut]))
        _check(path)
