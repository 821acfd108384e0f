"""Regression tests (issue 16): GGUF counts, dimensions, offsets and tokenizer metadata are checked before use.

Files are built byte by byte (the format is small) or with gguf-py's GGUFWriter, the reference writer; each bad
one must give one FuselmError naming the file and the key or tensor.
"""

from __future__ import annotations

import struct

import gguf
import pytest
from gguf import GGUFValueType as V
from tokenizers import Tokenizer
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import ByteLevel

from fuselm.errors import FuselmError
from fuselm.formats.gguf import read_gguf
from fuselm.formats.gguf_read import GGUF_MAGIC, metadata_value
from fuselm.formats.gguf_vocab import tokenizer_config_from_gguf, tokenizer_from_gguf, tokenizer_to_gguf
from fuselm.formats.gguf_write import write_file


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, vtype: V, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _info(name: str, dims: list[int], ggml_type: int, offset: int) -> bytes:
    return _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack(
        "<IQ", ggml_type, offset)


def _gguf(kvs: list[bytes], infos: list[bytes], data: bytes = b"") -> bytes:
    head = struct.pack("<IIQQ", GGUF_MAGIC, 3, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % 32) + data


ARCH = _kv("general.architecture", V.STRING, _s("llama"))


@pytest.mark.parametrize("infos,data,message", [
    # 2^31 x 2^31 F32: the byte count wraps to 0 in int64 arithmetic (numpy's np.prod)
    ([_info("w", [2**31, 2**31], 0, 0)], b"\0" * 64, r"tensor 'w' needs bytes"),
    ([_info("w", [2**40, 2**40], 0, 0)], b"", r"tensor 'w' has dimensions .* more elements than ggml"),
    ([_info("a", [8], 0, 0), _info("b", [8], 0, 0)], b"\0" * 32, r"tensor 'b' at data offset 0 overlaps tensor 'a'"),
    ([_info("a", [8], 0, 0), _info("a", [8], 0, 32)], b"\0" * 64, r"tensor 'a' appears twice"),
    ([_info("q", [31], 8, 0)], b"\0" * 64, r"tensor 'q' of type Q8_0 has rows of 31 values"),
    ([_info("a", [8], 0, 3)], b"\0" * 64, r"tensor 'a' offset 3 is not a multiple"),
    ([_info("a", [8, 1, 1, 1, 1], 0, 0)], b"\0" * 64, r"tensor 'a' has 5 dimensions"),
    ([_info("a", [8], 999, 0)], b"\0" * 64, r"tensor 'a' has GGML type id 999"),
])
def test_bad_tensor_infos(tmp_path, infos, data, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(_gguf([ARCH], infos, data))
    with pytest.raises(FuselmError, match=rf"bad\.gguf: .*{message}"):
        read_gguf(path)


@pytest.mark.parametrize("kv,message", [
    (_kv("big", V.ARRAY, struct.pack("<IQ", V.UINT32, 2**60)), r"'big' claims 1152921504606846976 items"),
    (_kv("strs", V.ARRAY, struct.pack("<IQ", V.STRING, 2**62)), r"'strs' claims"),
    (_kv("deep", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) * 9 + struct.pack("<IQ", V.UINT8, 0)),
     r"'deep' nests arrays more than 8 deep"),
    (_kv("t", 99, b""), r"unknown value type 99 for metadata key 't'"),
    (_s("long") + struct.pack("<I", V.STRING) + struct.pack("<Q", 2**63), r"metadata key 'long' runs past the end"),
])
def test_bad_metadata(tmp_path, kv, message):
    path = tmp_path / "meta.gguf"
    path.write_bytes(_gguf([ARCH, kv], []))
    with pytest.raises(FuselmError, match=rf"meta\.gguf: .*{message}"):
        read_gguf(path)


def test_absurd_counts_fail_before_any_loop(tmp_path):
    path = tmp_path / "counts.gguf"
    path.write_bytes(struct.pack("<IIQQ", GGUF_MAGIC, 3, 2**63, 1) + b"\0" * 64)
    with pytest.raises(FuselmError, match=r"counts\.gguf: .*claims 9223372036854775808 tensors"):
        read_gguf(path)


# ---------------------------------------------------------------- tokenizer metadata


def _tokenizer_file(tmp_path, **changes):
    """A small gpt2-style tokenizer written by gguf-py's writer, with `changes` replacing keys (None removes)."""
    tokens = ["a", "b", "ab", "<s>"]
    kv = {"tokenizer.ggml.model": ("gpt2", V.STRING, None), "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
          "tokenizer.ggml.token_type": ([1, 1, 1, 3], V.ARRAY, V.INT32),
          "tokenizer.ggml.merges": (["a b"], V.ARRAY, V.STRING), "tokenizer.ggml.bos_token_id": (3, V.UINT32, None),
          "tokenizer.ggml.add_bos_token": (True, V.BOOL, None)}
    kv.update(changes)
    path = tmp_path / "tok.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in kv.items():
        if value is not None:
            writer.add_key_value(key, value[0], value[1], sub_type=value[2])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path, read_gguf(path).metadata


@pytest.mark.parametrize("changes,message", [
    ({"tokenizer.ggml.tokens": ([1, 2, 3, 4], V.ARRAY, V.INT32)}, r"'tokenizer\.ggml\.tokens' must be an array of str"),
    ({"tokenizer.ggml.tokens": ("abc", V.STRING, None)}, r"'tokenizer\.ggml\.tokens' must be an array of strings"),
    ({"tokenizer.ggml.token_type": (["1", "1", "1", "3"], V.ARRAY, V.STRING)},
     r"'tokenizer\.ggml\.token_type' must be an array of ints"),
    ({"tokenizer.ggml.token_type": ([1.0, 1.0, 1.0, 3.0], V.ARRAY, V.FLOAT32)},
     r"'tokenizer\.ggml\.token_type' must be an array of ints"),
    ({"tokenizer.ggml.token_type": ([1, 1], V.ARRAY, V.INT32)}, r"'tokenizer\.ggml\.token_type' has 2 entries"),
    ({"tokenizer.ggml.merges": ([1], V.ARRAY, V.INT32)}, r"'tokenizer\.ggml\.merges' must be an array of strings"),
    ({"tokenizer.ggml.merges": None}, r"missing required GGUF key 'tokenizer\.ggml\.merges'"),
    ({"tokenizer.ggml.bos_token_id": (99, V.UINT32, None)}, r"'tokenizer\.ggml\.bos_token_id' is 99, outside"),
    ({"tokenizer.ggml.bos_token_id": ("3", V.STRING, None)}, r"'tokenizer\.ggml\.bos_token_id' is '3'; expected"),
    ({"tokenizer.ggml.add_bos_token": (1, V.UINT8, None)}, r"'tokenizer\.ggml\.add_bos_token' is 1; expected a bool"),
    ({"tokenizer.ggml.model": (7, V.UINT32, None)}, r"'tokenizer\.ggml\.model' is 7; expected a str"),
    ({"tokenizer.ggml.pre": ("nope", V.STRING, None)}, r"pre-tokenizer 'nope'"),
    ({"tokenizer.ggml.model": ("llama", V.STRING, None), "tokenizer.ggml.scores": (["x"] * 4, V.ARRAY, V.STRING)},
     r"'tokenizer\.ggml\.scores' must be an array of floats"),
    ({"tokenizer.ggml.model": ("llama", V.STRING, None), "tokenizer.ggml.scores": ([0.0] * 4, V.ARRAY, V.FLOAT32),
      "tokenizer.ggml.unknown_token_id": (-1, V.INT32, None)}, r"'tokenizer\.ggml\.unknown_token_id' is -1"),
])
def test_wrongly_typed_tokenizer_metadata(tmp_path, changes, message):
    path, metadata = _tokenizer_file(tmp_path, **changes)
    with pytest.raises(FuselmError, match=rf"tok\.gguf: .*{message}"):
        tokenizer_from_gguf(metadata, source=str(path))


def test_tokenizer_config_types(tmp_path):
    path, metadata = _tokenizer_file(tmp_path, **{"tokenizer.chat_template": ([1], V.ARRAY, V.INT32)})
    with pytest.raises(FuselmError, match=r"tok\.gguf: key 'tokenizer\.chat_template' is .*; expected a str"):
        tokenizer_config_from_gguf(metadata, source=str(path))
    path, metadata = _tokenizer_file(tmp_path, **{"tokenizer.ggml.bos_token_id": (99, V.UINT32, None)})
    assert tokenizer_config_from_gguf(metadata, source=str(path))["bos_token"] is None  # as before: out of range


def test_bpe_without_merges_round_trips(tmp_path):
    """`fuselm quantize` of a byte-level BPE with no merges wrote no merges key, which both readers refuse: the key
    is now written as an empty string array, and llama.cpp's own reader (gguf-py) sees it as such."""
    alphabet = ByteLevel.alphabet()
    tok = Tokenizer(BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    metadata = tokenizer_to_gguf(tok, len(alphabet))
    writer_path = tmp_path / "nomerges.gguf"
    write_file(writer_path, "llama", metadata, [], False, writer_path.name)
    field = gguf.GGUFReader(writer_path).fields["tokenizer.ggml.merges"]
    assert field.types[0] == V.ARRAY and len(field.data) == 0  # an empty array to gguf-py, as to llama.cpp
    back = tokenizer_from_gguf(read_gguf(writer_path).metadata, source=str(writer_path))
    assert back.encode("hi there").ids == tok.encode("hi there").ids


def test_metadata_value_checks(tmp_path):
    path = tmp_path / "v.gguf"
    path.write_bytes(_gguf([ARCH, _kv("llama.block_count", V.STRING, _s("32")),
                            _kv("llama.rope.freq_base", V.FLOAT32, struct.pack("<f", float("nan")))], []))
    gf = read_gguf(path)
    with pytest.raises(FuselmError, match=r"v\.gguf: key 'llama\.block_count' is '32'; expected an int"):
        metadata_value(gf, "llama.block_count", "int")
    with pytest.raises(FuselmError, match=r"v\.gguf: key 'llama\.rope\.freq_base' is nan; expected a finite float"):
        metadata_value(gf, "llama.rope.freq_base", "float")
    with pytest.raises(FuselmError, match=r"v\.gguf: missing required GGUF key 'x'"):
        metadata_value(gf, "x", "int")
    assert metadata_value(gf, "x", "int", 7) == 7
    path.write_bytes(_gguf([ARCH, _kv("llama.block_count", V.UINT32, struct.pack("<I", 2**32 - 1))], []))
    with pytest.raises(FuselmError, match=r"'llama\.block_count' is 4294967295; expected an int in \[1, 65536\]"):
        metadata_value(read_gguf(path), "llama.block_count", "int", low=1, high=65536)
    assert isinstance(metadata_value(read_gguf(path), "llama.block_count", "int"), int)
