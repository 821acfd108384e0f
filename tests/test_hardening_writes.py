"""Regression tests (issue 16): interrupted writes leave no destination, no orphaned companion and (after the next
run) no debris; outputs get normal file modes; a model and its companion are committed and read as a pair."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fuselm import archs
from fuselm.archs import write_gguf
from fuselm.config import ModelConfig, expected_shapes
from fuselm.errors import FuselmError
from fuselm.formats.atomic import atomic_write, clean_stale_partials
from fuselm.formats.gguf import (
    COMPANION_ID_KEY,
    companion_path,
    read_companion,
    read_gguf,
    write_vqgan_gguf,
)
from fuselm.formats.hf import write_hf_dir

CONFIG = ModelConfig(arch="chameleon", vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, head_dim=8, max_position_embeddings=128,
                     bos_token_id=1, eos_token_ids=(2,), norm_eps=1e-5, rope_theta=10000.0, qk_norm=True)
VQ = ({"embed_dim": 4}, {"quantize.embedding.weight": torch.ones(8, 4)})

# Both children stop at POINT (printing READY) until the parent signals them: in the main file's data, just
# before the renames, or between the companion's rename and the main file's.
PAUSE_POINTS = textwrap.dedent("""
    import os, sys, time
    from fuselm.formats import atomic
    point, out = sys.argv[1], sys.argv[2]

    def pause():
        print("READY", flush=True)
        time.sleep(60)

    if point == "before-rename":
        real_fsync, main_tmp = atomic._fsync, "." + os.path.basename(out)
        atomic._fsync = lambda p: (pause() if p.name.startswith(main_tmp) else None, real_fsync(p))
    elif point == "between-renames":
        real_replace = os.replace
        def replace(src, dst):
            real_replace(src, dst)
            if str(dst).endswith("-vqgan.gguf"):
                pause()
        atomic.os.replace = replace
""")

# The child writes a model + companion pair with archs.write_gguf.
CHILD = PAUSE_POINTS + textwrap.dedent("""
    from fuselm import archs as G
    from tests.test_hardening_writes import CONFIG, VQ, tensors

    plans = tensors()
    if point == "main-data":
        name = next(iter(plans))
        data = plans[name][0]
        plans[name] = (lambda: (pause(), data)[1], "F32", tuple(data.shape))
    G.write_gguf(out, CONFIG, plans, progress=False, vqgan=VQ)
""")


def tensors() -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)
    state = {n: torch.randn(s, generator=g) for n, s in expected_shapes(CONFIG).items()}
    return {n: (t, "F32") for n, t in archs.internal_to_gguf(CONFIG, state).items()}


def _interrupt(tmp_path: Path, point: str, signum: int, child_source: str = CHILD,
               out: str = "m.gguf") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    child = subprocess.Popen([sys.executable, "-c", child_source, point, str(tmp_path / out)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "READY", child.stderr.read()
    child.send_signal(signum)
    child.wait(timeout=60)
    return child


def _interrupted_leaves_nothing(tmp_path: Path, child, stem: str, signum: int) -> None:
    assert child.returncode != 0
    left = sorted(p.name for p in tmp_path.iterdir())
    assert f"{stem}.gguf" not in left  # never a main file without its finished companion
    if signum != signal.SIGKILL:
        assert left == [], left  # no companion, no .partial: everything removed by the handler
    else:
        assert all(n.endswith(".partial") or n == f"{stem}-vqgan.gguf" for n in left), left


@pytest.mark.parametrize("point", ["main-data", "before-rename", "between-renames"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["TERM", "INT", "KILL"])
def test_interrupted_pair_write(tmp_path, point, signum):
    _interrupted_leaves_nothing(tmp_path, _interrupt(tmp_path, point, signum), "m", signum)
    # the next run cleans what SIGKILL left and commits the pair
    write_gguf(tmp_path / "m.gguf", CONFIG, tensors(), progress=False, vqgan=VQ)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-vqgan.gguf", "m.gguf"]
    assert read_companion(read_gguf(tmp_path / "m.gguf"))[0] == VQ[0]


def test_pair_is_read_as_a_pair(tmp_path):
    main = write_gguf(tmp_path / "m.gguf", CONFIG, tensors(), progress=False, vqgan=VQ)
    gf = read_gguf(main)
    assert read_gguf(companion_path(main)).metadata[COMPANION_ID_KEY] == gf.metadata[COMPANION_ID_KEY]
    # a companion from another write (other image-tokenizer weights) of the same name is refused, naming both files;
    # the pair id is a hash of the companion's content, so rewriting the same model gives the same bytes
    assert read_gguf(write_gguf(tmp_path / "again.gguf", CONFIG, tensors(), progress=False, vqgan=VQ)).metadata[
        COMPANION_ID_KEY] == gf.metadata[COMPANION_ID_KEY]
    other = tmp_path / "other"
    other.mkdir()
    write_gguf(other / "m.gguf", CONFIG, tensors(), progress=False,
               vqgan=(VQ[0], {"quantize.embedding.weight": torch.zeros(8, 4)}))
    os.replace(companion_path(other / "m.gguf"), companion_path(main))
    with pytest.raises(FuselmError, match=rf"m-vqgan\.gguf: this image tokenizer was not written with m\.gguf "
                                          rf"\(key '{COMPANION_ID_KEY}'"):
        read_companion(gf)
    # a model written with a companion does not load as text-only without it
    companion_path(main).unlink()
    with pytest.raises(FuselmError, match=r"m\.gguf: its image tokenizer m-vqgan\.gguf is missing"):
        read_companion(gf)
    # files written separately (and llama.cpp's files) carry no id: a companion beside them still loads
    write_gguf(main, CONFIG, tensors(), progress=False)
    write_vqgan_gguf(companion_path(main), *VQ)
    assert read_companion(read_gguf(main))[0] == VQ[0]
    # a text-only write removes the companion of the file it replaces
    write_gguf(main, CONFIG, tensors(), progress=False)
    assert not companion_path(main).exists()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_umask_modes(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_gguf(tmp_path / "m.gguf", CONFIG, tensors(), progress=False, vqgan=VQ)
        write_hf_dir(tmp_path / "hf", {"model_type": "llama"}, {"w": torch.ones(2)})
        with atomic_write(tmp_path / "page.html") as tmp:
            tmp.write_text("<p>hi</p>")
    finally:
        os.umask(old)
    for path in (tmp_path / "m.gguf", tmp_path / "m-vqgan.gguf", tmp_path / "hf" / "config.json",
                 tmp_path / "hf" / "model.safetensors", tmp_path / "page.html"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_errors_leave_nothing_and_stale_partials_are_reported(tmp_path, capsys):
    with pytest.raises(ValueError):
        with atomic_write(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("failed mid-write")
    assert list(tmp_path.iterdir()) == []
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.bin.{dead.stdout.strip()}.0123abcd.partial"
    stale.write_bytes(b"debris")
    live = tmp_path / f".out.bin.{os.getpid()}.0123abcd.partial"  # our own: a write in progress, kept
    live.write_bytes(b"ours")
    assert clean_stale_partials(tmp_path / "out.bin") == [stale]
    assert f"removed {stale}" in capsys.readouterr().err
    assert live.exists()


# `fuselm quantize` of the demo model (a Chameleon with its image tokenizer).
QUANTIZE_CHILD = PAUSE_POINTS + textwrap.dedent("""
    import fuselm
    from fuselm.formats import gguf_exact

    if point == "main-data":
        real_write, calls = gguf_exact.write_tensor, []
        def write_tensor(f, t, alignment):
            calls.append(t)
            if len(calls) == 3:
                pause()
            real_write(f, t, alignment)
        gguf_exact.write_tensor = write_tensor
    fuselm.quantize_model("demo", out, "Q8_0", progress=False)
""")


@pytest.mark.parametrize("point", ["main-data", "before-rename", "between-renames"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["TERM", "INT", "KILL"])
def test_interrupted_quantize(tmp_path, point, signum):
    """Issue 16: a killed quantize left a .partial file, and its companion was written after the main file."""
    import fuselm

    _interrupted_leaves_nothing(tmp_path, _interrupt(tmp_path, point, signum, QUANTIZE_CHILD, "q.gguf"), "q", signum)
    fuselm.quantize_model("demo", tmp_path / "q.gguf", "Q8_0", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q-vqgan.gguf", "q.gguf"]
    assert fuselm.load(tmp_path / "q.gguf").image_tokenizer is not None
