"""Typed access to untrusted values (JSON config fields, GGUF metadata): one check, one clear error.

    check_value(cfg.get("num_hidden_layers"), "int", f"{path}: key 'num_hidden_layers'", low=1, high=2**16)

bool is not an int here (JSON true must not become 1 layer), floats must be finite, and numpy scalars count as
their Python kinds.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import FuselmError

_KINDS: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int, np.integer), "float": (float, int, np.number),
                                       "bool": (bool, np.bool_)}


def check_value(value, kind: str, where: str, *, low: float | None = None, high: float | None = None):
    """`value` as a plain Python `kind` ("str", "int", "float", "bool"); FuselmError starting with `where` if not."""
    ok = isinstance(value, _KINDS[kind]) and (kind == "bool" or not isinstance(value, (bool, np.bool_)))
    if ok and kind == "float":
        value = float(value)
        ok = math.isfinite(value)
    elif ok and kind in ("int", "bool"):
        value = int(value) if kind == "int" else bool(value)
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        bounds = "" if low is None and high is None else f" in [{low}, {high}]"
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        what = {"int": "an int", "float": "a finite float", "str": "a str", "bool": "a bool"}[kind]
        raise FuselmError(f"{where} is {shown}; expected {what}{bounds}")
    return value
