"""The command line: each command runs on a tiny model and errors come out as one line, not a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import tiny_hf

from fuselm.cli import build_parser, main


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_hf.make_llama(tmp_path_factory.mktemp("cli"))


def test_every_command_has_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("generate", "chat", "quantize", "convert", "flashify", "regroup-qknorm", "inspect", "bench", "demo"):
        assert name in commands, name
        assert len(commands[name].format_help()) > 200, f"{name} --help should teach, not just list flags"


def test_generate_and_inspect(llama_dir, capsys):
    assert main(["generate", str(llama_dir), "-p", "", "--max-tokens", "4", "--temperature", "0"]) in (0, 1)
    assert main(["inspect", str(llama_dir), "-v"]) == 0
    out = capsys.readouterr().out
    assert "architecture: llama" in out and "layers.1.mlp.down.weight" in out


def test_bench_json(llama_dir, capsys):
    assert main(["bench", str(llama_dir), "--prompt-tokens", "16", "--gen-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= {"prefill_tok_s", "decode_tok_s", "peak_rss_mb"} and result["decode_tok_s"] > 0


def test_bad_input_is_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fuselm", "generate", str(tmp_path / "nope"), "-p", "hi"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("fuselm: error:") and "no such file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_flashify_and_regroup_roundtrip(tmp_path, capsys):
    import torch

    import fuselm

    cham = tiny_hf.make_chameleon(tmp_path / "cham")
    assert main(["flashify", str(cham), str(tmp_path / "flash"), "--strict"]) == 0
    assert json.loads((tmp_path / "flash" / "config.json").read_text())["flashnorm"] is True
    ids = torch.randint(30, tiny_hf.VOCAB, (1, 10))
    torch.testing.assert_close(fuselm.load(tmp_path / "flash")(ids), fuselm.load(cham)(ids), rtol=1e-5, atol=1e-5)
    assert main(["regroup-qknorm", str(cham), str(tmp_path / "g"), "--groups", "1"]) == 1  # random heads differ
    assert "max deviation" in capsys.readouterr().err


def test_version(capsys):
    import fuselm

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fuselm {fuselm.__version__}"
