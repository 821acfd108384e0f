"""Regression tests (issue 16): PyTorch checkpoints (Meta's consolidated*.pth and vqgan.ckpt, HF .bin) fail with
one FuselmError naming the file, whatever torch raises on a malformed file; nothing in them ever runs."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

from fuselm.errors import FuselmError
from fuselm.formats.meta import read_consolidated, read_vqgan_ckpt
from fuselm.formats.torch_file import load_tensor_dict


def _zip_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def _mutants(raw: bytes):
    """Corruptions that make torch raise ValueError, UnicodeDecodeError, IndexError, RuntimeError, KeyError,
    EOFError, BadZipFile or UnpicklingError (the set the fuzz run found), each for a real reason."""
    yield "empty", b""
    yield "truncated", raw[: len(raw) // 2]
    yield "garbage", b"\x80\x02" + bytes(range(256))
    yield "zip-without-data", _zip_of({"archive/data.pkl": b"\x80\x02}q\x00."})
    yield "bad-pickle-in-zip", _zip_of({"archive/data.pkl": b"\x80\x02\xff\xfe", "archive/version": b"3\n"})
    yield "flipped", bytes(b ^ 0xFF if 60 <= i < 90 else b for i, b in enumerate(raw))


def _zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_corrupt_checkpoints_name_the_file(tmp_path, capsys):
    raw = _zip_bytes({"tok_embeddings.weight": torch.randn(8, 4), "norm.weight": torch.ones(4)})
    for name, data in _mutants(raw):
        path = tmp_path / f"consolidated.{name}.pth"
        path.write_bytes(data)
        with pytest.raises(FuselmError, match=rf"consolidated\.{name}\.pth: "):
            read_consolidated(path)
    path = tmp_path / "evil.pth"
    torch.save({"w": _Payload()}, path, pickle_protocol=2)
    with pytest.raises(FuselmError, match=r"evil\.pth: refusing to load: not a plain-tensor \(weights-only\)"):
        read_consolidated(path)
    assert "code ran" not in capsys.readouterr().out


def test_checkpoint_shapes(tmp_path):
    path = tmp_path / "consolidated.pth"
    torch.save([torch.ones(2)], path)
    with pytest.raises(FuselmError, match=r"consolidated\.pth: expected a dict of tensor names to tensors, found list"):
        read_consolidated(path)
    torch.save({"w": torch.ones(2), "step": 5}, path)
    with pytest.raises(FuselmError, match=r"consolidated\.pth: entry 'step' is a int; expected a tensor"):
        read_consolidated(path)
    torch.save({1: torch.ones(2)}, path)
    with pytest.raises(FuselmError, match=r"consolidated\.pth: expected tensor names as strings, found the key 1"):
        read_consolidated(path)


def test_vqgan_ckpt_and_legacy_format(tmp_path):
    weights = {"encoder.conv_in.weight": torch.randn(4, 3, 3, 3), "quantize.embedding.weight": torch.randn(8, 4)}
    path = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": weights}, path, _use_new_zipfile_serialization=False)  # legacy: cannot be mapped
    back = read_vqgan_ckpt(path)
    assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)
    torch.save({"state_dict": {"w": "text"}}, path)
    with pytest.raises(FuselmError, match=r"vqgan\.ckpt: key 'state_dict': entry 'w' is a str"):
        read_vqgan_ckpt(path)
    torch.save(weights, path)  # no state_dict wrapper: the top level is the state dict
    assert load_tensor_dict(path, key="state_dict").keys() == weights.keys()
