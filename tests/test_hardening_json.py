"""Regression tests (issue 16): JSON files from checkpoints fail with one FuselmError naming the file.

The reference for what is valid is Python's json module; what it raises on hostile input (RecursionError,
ValueError for huge integers, UnicodeDecodeError) must not escape, and nesting is capped at MAX_DEPTH.
"""

from __future__ import annotations

import json

import pytest

from fuselm.errors import FuselmError
from fuselm.formats.hf import read_config
from fuselm.formats.json_file import MAX_DEPTH, parse_json_object, read_json_object
from fuselm.formats.meta import read_params


@pytest.mark.parametrize("raw,message", [
    (b"[" * 100_000 + b"]" * 100_000, r"JSON nested too deeply \(expected at most 64 levels\)"),
    (b'{"a": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}", r"JSON nested 65 levels deep"),
    (b'{"hidden_size": ' + b"9" * 5000 + b"}", r"JSON holds a number too large to read"),
    (b'{"name": "caf\xe9"}', r"not valid UTF-8 \(byte 13"),
    (b'{"a": 1', r"not valid JSON"),
    (b'[1, 2]', r"expected a JSON object at the top level, found an array"),
    (b'"text"', r"expected a JSON object at the top level, found a string"),
])
def test_hostile_json(tmp_path, raw, message):
    path = tmp_path / "config.json"
    path.write_bytes(raw)
    with pytest.raises(FuselmError, match=rf"config\.json: {message}"):
        read_config(tmp_path)


def test_json_readers_of_every_kind(tmp_path):
    for name in ("params.json", "tokenizer_config.json", "generation_config.json"):
        (tmp_path / name).write_bytes(b'{"x": "\xff"}')
        with pytest.raises(FuselmError, match=rf"{name}: not valid UTF-8"):
            read_params(tmp_path / name)
    with pytest.raises(FuselmError, match=r"missing\.json: file not found"):
        read_json_object(tmp_path / "missing.json")
    with pytest.raises(FuselmError, match=r"expected a JSON file, found a directory"):
        read_json_object(tmp_path)
    big = tmp_path / "big.json"
    big.write_bytes(b'{"a": "' + b"x" * 2000 + b'"}')
    with pytest.raises(FuselmError, match=r"big\.json: JSON file larger than 1000 bytes"):
        read_json_object(big, max_bytes=1000)


def test_valid_json_matches_the_standard_library():
    text = '\ufeff{"a": [1, 2.5, null, true, {"b": "\\u00e9"}], "c": {}}'
    assert parse_json_object(text.encode("utf-8"), "x") == json.loads(text[1:])
