"""Mutations for benchmarks/fuzz.py: byte-level ones for any file, and structure-aware ones that keep a file
parseable while changing one value (a JSON field, a safetensors header entry, a GGUF metadata key, a chat
template), so the fuzzer reaches the checks behind the parsers, not only the parsers.

Every mutation is a pure function of (file bytes, random.Random) -> (new bytes, description).
"""

from __future__ import annotations

import json
import random
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

INTERESTING_INTS = [0, 1, -1, 2, 7, 255, 256, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53,
                    2**63 - 1, 10**9, -(2**31)]
HOSTILE_TEMPLATES = [
    "{% for i in range(10**9) %}x{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 10**10 }}",
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(0) }}",
    "{{ '{:>9999999999}'.format(1) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% for %}",
    "{{ raise_exception('no') }}",
]


def _hostile_values(rng: random.Random) -> list:
    return [None, "64", "", -1, 0, 1.5, float("nan"), float("inf"), 10**30, [], {}, True, [1, 2], {"a": 1},
            rng.choice(INTERESTING_INTS), "x" * rng.choice([1, 100, 10_000]), [[[[[[]]]]]],
            rng.choice(HOSTILE_TEMPLATES)]


# ---------------------------------------------------------------- bytes

def flip_bits(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    out = bytearray(raw)
    spots = []
    for _ in range(rng.randint(1, 8)):
        limit = min(len(out), 65536) if rng.random() < 0.8 else len(out)
        if not limit:
            break
        i = rng.randrange(limit)
        out[i] ^= 1 << rng.randrange(8)
        spots.append(i)
    return bytes(out), f"flip bits at {spots}"


def interesting_word(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    out = bytearray(raw)
    width = rng.choice([4, 8])
    limit = max(min(len(out), 65536) - width, 1)
    i = rng.randrange(limit) & ~3
    value = rng.choice(INTERESTING_INTS)
    out[i:i + width] = struct.pack("<Q" if width == 8 else "<I", value % 2 ** (8 * width))
    return bytes(out), f"u{8 * width} {value} at {i}"


def truncate(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    cut = rng.choice([rng.randrange(max(len(raw), 1)), rng.randrange(min(len(raw), 4096) or 1), len(raw) - 1])
    return raw[:max(cut, 0)], f"truncate at {cut}"


def splice(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    if len(raw) < 16:
        return raw + raw, "double"
    a, b = sorted(rng.randrange(len(raw)) for _ in range(2))
    if rng.random() < 0.5:
        return raw[:a] + raw[b:], f"delete {a}..{b}"
    return raw[:b] + raw[a:b] + raw[b:], f"duplicate {a}..{b}"


def bad_utf8(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    i = rng.randrange(max(len(raw), 1))
    return raw[:i] + b"\xff\xfe" + raw[i:], f"invalid UTF-8 at {i}"


BYTE_MUTATORS: list[Callable] = [flip_bits, interesting_word, truncate, splice]


# ---------------------------------------------------------------- JSON

def _paths(node, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in list(node.items())[:200]:
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:20]):
            out += _paths(v, (*prefix, i))
    return out


def mutate_json_value(data, rng: random.Random):
    """Replace or delete one value somewhere in parsed JSON (top-level keys are favoured)."""
    paths = [p for p in _paths(data) if p]
    if not paths:
        return rng.choice(_hostile_values(rng)), "replace the whole document"
    top = [p for p in paths if len(p) == 1]
    path = rng.choice(top) if top and rng.random() < 0.6 else rng.choice(paths)
    parent = data
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and rng.random() < 0.15:
        del parent[path[-1]]
        return data, f"delete {'/'.join(map(str, path))}"
    value = rng.choice(_hostile_values(rng))
    parent[path[-1]] = value
    return data, f"set {'/'.join(map(str, path))} = {repr(value)[:40]}"


def json_file(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    choice = rng.random()
    if choice < 0.1:
        return bad_utf8(raw, rng)
    if choice < 0.15:
        depth = rng.choice([100, 10_000, 200_000])
        return b'{"a": ' + b"[" * depth + b"]" * depth + b"}", f"nesting {depth}"
    if choice < 0.2:
        return raw.replace(b":", b": " + b"9" * 5000 + b", \"_\":", 1), "5000-digit integer"
    try:
        data = json.loads(raw)
    except ValueError:
        return flip_bits(raw, rng)
    if rng.random() < 0.1 and isinstance(data, dict):
        data["chat_template"] = rng.choice(HOSTILE_TEMPLATES)
        return json.dumps(data).encode(), "hostile chat_template"
    data, what = mutate_json_value(data, rng)
    return json.dumps(data).encode(), what


# ---------------------------------------------------------------- safetensors

def safetensors_file(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    if rng.random() < 0.4 or len(raw) < 8:
        return rng.choice(BYTE_MUTATORS)(raw, rng)
    (n,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError:
        return flip_bits(raw, rng)
    names = [k for k in header if k != "__metadata__"]
    if not names:
        return flip_bits(raw, rng)
    name = rng.choice(names)
    field = rng.choice(["dtype", "shape", "data_offsets", None])
    if field is None:
        header[name] = rng.choice(_hostile_values(rng))
        what = f"tensor {name} = hostile value"
    elif field == "data_offsets" and rng.random() < 0.5:
        begin, end = header[name]["data_offsets"]
        delta = rng.choice([-8, -1, 1, 8, -begin - 8, 2**40])
        header[name]["data_offsets"] = [begin + delta, end + (delta if rng.random() < 0.5 else 0)]
        what = f"tensor {name} offsets shifted by {delta}"
    else:
        header[name], what = mutate_json_value(header[name], rng)
        what = f"tensor {name}: {what}"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:], what


# ---------------------------------------------------------------- GGUF

def gguf_file(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Half byte-level, half one metadata key rewritten (wrong type, absurd value, hostile template)."""
    if rng.random() < 0.5:
        return rng.choice(BYTE_MUTATORS + [interesting_word, interesting_word])(raw, rng)
    from fuselm.formats.gguf_read import read_gguf
    from fuselm.formats.gguf_write import plan_tensor, write_file

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.gguf"
        src.write_bytes(raw)
        gf = read_gguf(src)
        metadata = dict(gf.metadata)
        keys = [k for k in metadata if k != "general.architecture"]
        key = rng.choice(keys) if keys and rng.random() < 0.9 else "general.architecture"
        if key == "tokenizer.chat_template" or rng.random() < 0.05:
            key, value = "tokenizer.chat_template", rng.choice(HOSTILE_TEMPLATES)
        elif key.startswith("tokenizer.ggml.") and rng.random() < 0.5:
            value = rng.choice([["a", "b"], [1, 2, 3], [1.5], "abc", 10**9, -1, [], [["x"]]])
        else:
            value = rng.choice(_hostile_values(rng))
        if value is None or value == {} or value == [] or isinstance(value, dict):
            metadata.pop(key, None)
            what = f"drop {key}"
        else:
            metadata[key] = value
            what = f"{key} = {repr(value)[:40]}"
        plans = [plan_tensor(t.name, (t.to_torch() if t.type_name == "BF16" else t.data, t.type_name))
                 for t in gf.tensors.values()]
        out = Path(tmp) / "out.gguf"
        try:
            write_file(out, str(metadata.get("general.architecture", "llama")), metadata, plans, False, "mutant")
        except Exception:  # the value cannot be stored in GGUF at all: fall back to bytes
            return flip_bits(raw, rng)
        return out.read_bytes(), what


def mutate(path: Path, raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A mutation suited to the file's kind."""
    name = path.name
    if name.endswith(".json"):
        return json_file(raw, rng)
    if name.endswith(".safetensors"):
        return safetensors_file(raw, rng)
    if name.endswith(".gguf"):
        return gguf_file(raw, rng)
    return rng.choice(BYTE_MUTATORS)(raw, rng)  # .bin / .pth / .ckpt (pickles in zips, or legacy)
