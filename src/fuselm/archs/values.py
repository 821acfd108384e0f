"""Typed, bounded reads of untrusted config values (config.json, GGUF metadata, params.json).

Every value is checked for its type and a sane range before anything is sized from it, so a corrupt file gives
one error naming the file and key instead of an exception from deep inside (or a loop over 10^9 layers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import FuselmError

MISSING = object()
# Upper bounds far above any real model, low enough that nothing is allocated or looped over absurdly.
LIMITS = {
    "layers": 4096,
    "width": 1 << 20,  # hidden, intermediate, head_dim
    "heads": 1 << 14,
    "vocab": 1 << 24,
    "context": 1 << 24,
}


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bytes, bytearray)):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def read_int(cfg: Mapping, key: str, source: str, default: Any = MISSING, label: str = "config", *, minimum: int = 1,
             limit: str | None = None) -> Any:
    """An integer in [minimum, LIMITS[limit]]; `default` (returned as is) when the key is absent or null."""
    value = _plain(cfg.get(key)) if isinstance(cfg, Mapping) else None
    if value is None:
        if default is MISSING:
            raise FuselmError(f"{source}: missing required {label} key {key!r}")
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    maximum = LIMITS[limit] if limit else None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum and value > maximum):
        bound = f" and <= {maximum}" if maximum else ""
        raise FuselmError(f"{source}: key {key!r} is {_show(value)}; expected an integer >= {minimum}{bound}")
    return value


def read_float(cfg: Mapping, key: str, source: str, default: Any = MISSING, label: str = "config", *,
               positive: bool = True) -> Any:
    value = _plain(cfg.get(key)) if isinstance(cfg, Mapping) else None
    if value is None:
        if default is MISSING:
            raise FuselmError(f"{source}: missing required {label} key {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            positive and value <= 0):
        raise FuselmError(f"{source}: key {key!r} is {_show(value)}; expected a finite number"
                          + (" > 0" if positive else ""))
    return float(value)


def read_bool(cfg: Mapping, key: str, source: str, default: bool = False, label: str = "config") -> bool:
    value = _plain(cfg.get(key)) if isinstance(cfg, Mapping) else None
    if value is None:
        return default
    if not isinstance(value, bool) and not (isinstance(value, (int, float)) and value in (0, 1)):
        raise FuselmError(f"{source}: key {key!r} is {_show(value)}; expected true or false")
    return bool(value)


def read_str(cfg: Mapping, key: str, source: str, default: Any = MISSING, label: str = "config") -> Any:
    value = _plain(cfg.get(key)) if isinstance(cfg, Mapping) else None
    if value is None:
        if default is MISSING:
            raise FuselmError(f"{source}: missing required {label} key {key!r}")
        return default
    if not isinstance(value, str):
        raise FuselmError(f"{source}: key {key!r} is {_show(value)}; expected a string")
    return value


def read_token_ids(cfg: Mapping, key: str, source: str) -> tuple[int, ...]:
    """One id or a list of ids (HF's eos_token_id may be either); absent -> ()."""
    value = _plain(cfg.get(key)) if isinstance(cfg, Mapping) else None
    if value is None:
        return ()
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    out = []
    for v in values:
        v = _plain(v)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < LIMITS["vocab"]:
            raise FuselmError(f"{source}: key {key!r} is {_show(value)}; expected a token id or a list of ids")
        out.append(v)
    return tuple(out)


def uniform_int(cfg: Mapping, key: str, source: str, default: Any = MISSING, label: str = "config", *,
                limit: str | None = None) -> Any:
    """llama.cpp allows per-layer arrays for head counts and ffn length; fuselm needs one value."""
    value = _plain(cfg.get(key)) if isinstance(cfg, Mapping) else None
    if isinstance(value, (list, tuple, np.ndarray)):
        values = {_plain(v) for v in value}
        if len(values) != 1:
            raise FuselmError(f"{source}: key {key!r} varies per layer ({_show(sorted(values, key=str))}); "
                              "fuselm needs one value")
        return read_int({key: values.pop()}, key, source, default, label, limit=limit)
    return read_int(cfg, key, source, default, label, limit=limit)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
