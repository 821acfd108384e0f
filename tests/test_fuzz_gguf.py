"""Property-based fuzzing (hypothesis, fixed budget) of the GGUF reader and the tokenizer metadata reader.

The base file is written by gguf-py's GGUFWriter (the reference writer). Whatever bytes are changed, read_gguf
gives one FuselmError naming the file or a parse; when gguf-py's own reader (GGUFReader) also parses the mutant,
both see the same keys and tensors. Tokenizer metadata of any types gives one FuselmError naming the source or
a working tokenizer."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gguf
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuselm.errors import FuselmError
from fuselm.formats.gguf import read_gguf
from fuselm.formats.gguf_vocab import tokenizer_config_from_gguf, tokenizer_from_gguf

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
TOKENS = ["a", "b", "ab", "<s>", "</s>"]


def _base(path: Path) -> bytes:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([1, 1, 1, 3, 3])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(3)
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_tensor("w", np.arange(64, dtype=np.float32).reshape(8, 8))
    writer.add_tensor("v", np.ones(32, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 2000), st.sampled_from([0, 1, 2, 7, 0x7F, 0x80, 0xFF]) | st.integers(0, 255)),
                min_size=1, max_size=6), st.integers(0, 3000))
def test_byte_mutations(writes, cut):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.gguf"
        raw = bytearray(_base(path))
        for pos, byte in writes:
            raw[pos % len(raw)] = byte
        path.write_bytes(bytes(raw[: len(raw) - cut] if cut < 400 else raw))
        try:
            ours = read_gguf(path)
        except FuselmError as err:
            assert str(err).startswith(str(path)), err
            return
        try:
            reference = gguf.GGUFReader(path)
        except Exception:  # noqa: BLE001 (gguf-py raises ValueError, KeyError, IndexError... on bad files)
            return
        assert set(ours.metadata) == {k for k in reference.fields if not k.startswith("GGUF.")}
        assert {t.name: bytes(t.data.tobytes()) for t in reference.tensors} == {
            n: bytes(t.data.tobytes()) for n, t in ours.tensors.items()}
        try:
            tokenizer_from_gguf(ours.metadata, source=str(path))
            tokenizer_config_from_gguf(ours.metadata, source=str(path))
        except FuselmError as err:
            assert str(err).startswith(str(path)), err


any_value = (st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=6)
             | st.lists(st.text(max_size=3), max_size=6) | st.lists(st.integers(-5, 2**33), max_size=6)
             .map(lambda v: np.array(v, dtype=np.int64)) | st.lists(st.floats(width=32), max_size=6)
             .map(lambda v: np.array(v, dtype=np.float32))
             | st.lists(st.lists(st.integers(0, 3), max_size=2), max_size=3))
KEYS = ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
        "tokenizer.ggml.scores", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
        "tokenizer.ggml.pre", "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template"]
GOOD = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.token_type": np.array([1, 1, 1, 3, 3], np.int32), "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.bos_token_id": 3}


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), any_value, max_size=4), st.sampled_from(["gpt2", "llama", None]))
def test_tokenizer_metadata_of_any_type(changes, model):
    metadata = {**GOOD, **({"tokenizer.ggml.model": model} if model else {}),
                "tokenizer.ggml.scores": np.zeros(len(TOKENS), np.float32), **changes}
    metadata = {k: v for k, v in metadata.items() if v is not None}
    for build in (tokenizer_from_gguf, tokenizer_config_from_gguf):
        try:
            build(metadata, source="fuzz.gguf")
        except FuselmError as err:
            assert str(err).startswith("fuzz.gguf: "), err
