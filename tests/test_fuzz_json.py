"""Property-based fuzzing (hypothesis, fixed budget) of the JSON reader: for any bytes, one FuselmError naming the
source or a dict; for any JSON object within the depth limit, exactly what the standard library parses."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuselm.errors import FuselmError
from fuselm.formats.json_file import MAX_DEPTH, _depth, parse_json_object

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                            max_size=4), max_leaves=12)


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes(raw):
    try:
        assert isinstance(parse_json_object(raw, "fuzz.json"), dict)
    except FuselmError as err:
        assert str(err).startswith("fuzz.json: ")


@settings(FUZZ, max_examples=100)
@given(st.dictionaries(st.text(max_size=6), values, max_size=6))
def test_objects_match_the_standard_library(obj):
    raw = json.dumps(obj).encode()
    if _depth(obj) <= MAX_DEPTH:
        assert parse_json_object(raw, "fuzz.json") == json.loads(raw)


@settings(FUZZ, max_examples=100)
@given(values, st.integers(0, 3), st.binary(max_size=3))
def test_damaged_documents(value, cut, junk):
    raw = json.dumps(value).encode()
    raw = raw[: max(len(raw) - cut, 0)] + junk
    try:
        reference = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        reference = None
    try:
        ours = parse_json_object(raw, "fuzz.json")
    except FuselmError as err:
        assert str(err).startswith("fuzz.json: ")
        assert not isinstance(reference, dict) or _depth(reference) > MAX_DEPTH
    else:
        assert ours == reference
