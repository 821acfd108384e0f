"""Tensor parallelism over gloo on loopback (issue 13): 2 and 4 ranks give the logits, tokens, pictures and server
answers of one process, each rank holds about its share of the weights, and a rank that dies stops the others.

Ranks are real processes started by torchrun (torch.distributed.run) running tests/tp_worker.py or `fuselm`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from PIL import Image
from serve_process import MARKER, ServerProcess, kill_marked, marked, wait_until
from tiny_hf import make_chameleon, make_falcon, make_llama, make_qwen2
from tp_worker import IDS, sampled_ids

import fuselm

pytestmark = pytest.mark.xdist_group("tensor_parallel")  # one xdist worker: the models and torchrun runs are shared
WORKER = Path(__file__).with_name("tp_worker.py")
TIMEOUT = 600
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
FLOAT_MODELS = ["llama-gqa", "chameleon-per-head", "chameleon-g2", "chameleon-g4", "chameleon-swin", "falcon-7b",
                "falcon-40b", "qwen2-bias"]


def torchrun(ranks: int, *args: str, timeout: float = TIMEOUT, cwd: Path | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *args]
    tag = uuid.uuid4().hex
    try:
        done = subprocess.run(argv, env={**ENV, MARKER: tag}, capture_output=True, text=True, timeout=timeout,
                              cwd=cwd)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"torchrun {args} did not finish in {timeout} s") from err
    finally:
        kill_marked(tag)  # the ranks live in sessions of their own: none may outlive the test
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-models")
    out = {
        "llama-gqa": make_llama(root / "llama", kv_heads=2),
        "chameleon-per-head": make_chameleon(root / "cham", num_attention_heads=8, num_key_value_heads=4),
        "chameleon-swin": make_chameleon(root / "swin", swin=True, num_attention_heads=8, num_key_value_heads=4),
        "falcon-7b": make_falcon(root / "falcon7"),
        "falcon-40b": make_falcon(root / "falcon40", new_arch=True, bias=True),
        "qwen2-bias": make_qwen2(root / "qwen2"),
    }
    for groups in (2, 4):
        out[f"chameleon-g{groups}"], _ = fuselm.regroup_model(out["chameleon-per-head"], root / f"cham-g{groups}.gguf",
                                                              groups, average=True)
    wide = make_llama(root / "wide", kv_heads=2, hidden_size=256, intermediate_size=512)
    fuselm.quantize_model(wide, root / "wide-q4_k_m.gguf", "Q4_K_M")
    out["q4_k_m"] = root / "wide-q4_k_m.gguf"
    return out


def _run_logits(models: dict[str, Path], ranks: int, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp(f"tp{ranks}") / "results.pt"
    torchrun(ranks, str(WORKER), "logits", str(out), *(str(models[n]) for n in [*FLOAT_MODELS, "q4_k_m"]))
    results = torch.load(out)
    return {name: results[str(models[name])] for name in [*FLOAT_MODELS, "q4_k_m"]}


@pytest.fixture(scope="module")
def tp2(models, tmp_path_factory) -> dict:
    return _run_logits(models, 2, tmp_path_factory)


@pytest.fixture(scope="module")
def tp4(models, tmp_path_factory) -> dict:
    return _run_logits(models, 4, tmp_path_factory)


def _solo(path: Path) -> dict:
    model = fuselm.load(path)
    cache = model.transformer.new_cache(2, 32)
    with torch.inference_mode():
        prefill = model.transformer(IDS[:, :6], cache=cache)
        steps = [model.transformer(IDS[:, i:i + 1], cache=cache) for i in range(6, 10)]
    return {"full": model(IDS), "cached": torch.cat([prefill, *steps], dim=1), "seeded": sampled_ids(model, 3)}


@pytest.mark.parametrize("name", FLOAT_MODELS)
@pytest.mark.parametrize("ranks", [2, 4])
def test_float32_logits_equal_one_process(name, ranks, models, request):
    got = request.getfixturevalue(f"tp{ranks}")[name]
    solo = _solo(models[name])
    for key in ("full", "cached"):
        diff = float((got[key] - solo[key]).abs().max())
        assert diff < 1e-4, (name, ranks, key, diff)
    assert got["seeded"] == solo["seeded"]  # the same seed samples the same tokens
    unseeded = [r["unseeded"] for r in got["ranks"]]
    assert all(u == unseeded[0] for u in unseeded), unseeded  # every rank has rank 0's tokens


@pytest.mark.parametrize("ranks", [2, 4])
def test_q4_k_m_logits_and_weight_share(ranks, models, request):
    """fuselm quantize's Q4_K_M: a 128-wide o input (TP=2 and 4) and a 128-wide down input (TP=4) would cut a
    256-wide K-quant block; those weights are split by output rows, and the logits still agree."""
    got = request.getfixturevalue(f"tp{ranks}")["q4_k_m"]
    solo_model = fuselm.load(models["q4_k_m"])
    solo = _solo(models["q4_k_m"])
    for key in ("full", "cached"):
        rel = float((got[key] - solo[key]).pow(2).mean().sqrt() / solo[key].pow(2).mean().sqrt())
        assert rel < 1e-3, (ranks, key, rel)
    from tp_worker import weight_bytes

    from fuselm.formats.gguf_read import read_gguf

    whole = weight_bytes(solo_model)
    shares = [r["weight_bytes"] / whole for r in got["ranks"]]
    tensors = read_gguf(models["q4_k_m"]).tensors
    size = lambda *parts: sum(t.data.nbytes for n, t in tensors.items() if any(p in n for p in parts))  # noqa: E731
    norms, kv = size("norm") / size(""), size("attn_k.", "attn_v.") / size("")
    # 1/N of every split weight; k/v: the 2 KV heads split (TP=2) or each held by 2 of 4 ranks; norms everywhere
    expected = (1 - norms - kv) / ranks + kv * max(1 / ranks, 1 / 2) + norms
    for share in shares:
        assert abs(share - expected) < 0.02, (shares, expected)


def test_a_rank_that_dies_stops_the_others(models):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(ENV, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), FUSELM_TP_TIMEOUT="60")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "die", str(models["llama-gqa"])], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    t0 = time.monotonic()
    try:
        out, _ = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 3, out[-2000:]
    assert "tensor parallel rank 0 of 2" in out and "another rank died or stopped answering" in out, out[-2000:]
    assert "Traceback" not in out
    assert time.monotonic() - t0 < 90


def _pictures(folder: Path, stem: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob(f"{stem}-*.png"))]


def test_generate_under_torchrun_equals_one_process(tmp_path):
    """`fuselm generate demo` greedy, text and a picture (with CFG), one process vs torchrun with 2 ranks."""
    args = ["generate", "demo", "-p", "draw a red circle", "--temperature", "0", "--images", "on", "--threads", "1"]
    solo = subprocess.run([sys.executable, "-m", "fuselm", *args, "--out", str(tmp_path / "solo.md")], env=ENV,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert solo.returncode == 0, solo.stderr[-2000:]
    tp = torchrun(2, "-m", "fuselm", *args, "--out", str(tmp_path / "tp.md"))
    text = lambda out: out.split("\n[")[0]  # noqa: E731 (the stream before the timing line)
    assert text(tp.stdout) == text(solo.stdout) and "[image 1]" in solo.stdout
    assert (tmp_path / "tp.md").read_text().replace("tp-", "X-") == (tmp_path / "solo.md").read_text().replace(
        "solo-", "X-")
    pictures, expected = _pictures(tmp_path, "tp"), _pictures(tmp_path, "solo")
    assert len(pictures) == len(expected) == 1
    assert all(np.array_equal(a, b) for a, b in zip(pictures, expected))


def test_serve_under_torchrun_answers_as_one_process():
    """...and a killed torchrun takes its ranks with it (they run in sessions of their own)."""
    request = dict(model="demo", messages=[{"role": "user", "content": "describe the picture"}], temperature=0,
                   max_tokens=24)
    answers = []
    for ranks in (1, 2):
        with ServerProcess("--quiet", ranks=ranks) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
            answers.append(client.chat.completions.create(**request).choices[0].message.content)
            assert "Traceback" not in server.output
            if ranks == 2:
                assert len(marked(server.tag)) == 3  # torchrun and its two ranks
                server.proc.send_signal(signal.SIGKILL)  # the launcher alone
                assert wait_until(lambda: not marked(server.tag), timeout=30), marked(server.tag)
    assert answers[0] and answers[0] == answers[1]
