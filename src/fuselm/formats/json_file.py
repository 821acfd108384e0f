"""JSON files from checkpoints (config.json, tokenizer_config.json, params.json, generation_config.json, indexes,
headers): read with a size cap, strict UTF-8, bounded nesting and integer size, and an object at the top level.

Every way the standard library can fail on hostile bytes becomes one FuselmError naming the file:
UnicodeDecodeError (bad UTF-8), JSONDecodeError, RecursionError (nesting deeper than the interpreter's stack) and
the ValueError Python raises for integers of more than `sys.get_int_max_str_digits()` digits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import FuselmError

MAX_JSON_BYTES = 64 * 2**20  # config files are kilobytes; tokenizer files are tens of megabytes at most
MAX_DEPTH = 64  # real configs nest 4-6 levels; a hostile file could nest a million


def read_json_object(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object stored in `path`. Raises FuselmError naming the file for anything else."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise FuselmError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise FuselmError(f"{path}: expected a JSON file, found a directory") from None
    except OSError as err:
        raise FuselmError(f"{path}: cannot read ({err.strerror})") from None
    if len(raw) > max_bytes:
        raise FuselmError(f"{path}: JSON file larger than {max_bytes} bytes; refusing to parse it")
    return parse_json_object(raw, str(path))


def parse_json_object(raw: bytes | str, source: str) -> dict[str, Any]:
    """Parse JSON text that must hold an object; `source` names the file (and key) in errors."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as err:
            raise FuselmError(f"{source}: not valid UTF-8 (byte {err.start}: {bytes(raw)[err.start:err.start + 4]!r})"
                              ) from None
    else:
        text = raw
    if text.startswith("\ufeff"):  # a UTF-8 byte order mark, as some editors on Windows write
        text = text[1:]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise FuselmError(f"{source}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise FuselmError(f"{source}: JSON nested too deeply (expected at most {MAX_DEPTH} levels)") from None
    except ValueError as err:  # int() of more digits than sys.get_int_max_str_digits()
        raise FuselmError(f"{source}: JSON holds a number too large to read ({str(err)[:120]})") from None
    if not isinstance(data, dict):
        raise FuselmError(f"{source}: expected a JSON object at the top level, found {_json_kind(data)}")
    depth = _depth(data)
    if depth > MAX_DEPTH:
        raise FuselmError(f"{source}: JSON nested {depth} levels deep (expected at most {MAX_DEPTH})")
    return data


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (the value may be as deep as the parser's stack allowed)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)
