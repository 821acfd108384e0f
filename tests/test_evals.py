"""Evaluations: passkey prompts and scoring, sliding-window perplexity against transformers, the RoPE comparison
table/plot, and the `fuselm eval` command line."""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import string
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_hf import make_llama
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from fuselm.archs import config_to_hf, internal_to_hf
from fuselm.commands import evals as evals_cmd
from fuselm.config import ModelConfig
from fuselm.errors import FuselmError
from fuselm.evals import compare, passkey
from fuselm.evals.perplexity import sliding_window_perplexity
from fuselm.formats.hf import write_hf_dir
from fuselm.load import load
from fuselm.model.transformer import Transformer
from fuselm.tokenizer import Tokenizer

SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]


def char_backend() -> HFTokenizer:
    chars = sorted(set(string.ascii_letters + string.digits + " .,?!'\n"))
    tok = HFTokenizer(models.WordLevel(vocab={t: i for i, t in enumerate([*SPECIALS, *chars])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return tok


def char_tokenizer() -> Tokenizer:
    return Tokenizer(char_backend(), bos_token="<s>", eos_token="</s>", add_bos=True)


def bpe_tokenizer() -> Tokenizer:
    """A small Metaspace BPE over the passkey texts (multi-digit tokens exist), specials at ids 0-3."""
    texts = [t for st in passkey.STYLES.values() for t in (st.task, st.filler, st.info, st.question)]
    texts = [*texts, "0123456789 12345 67890"] * 20
    backend = HFTokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    reserved = ["<s>", "<pad>", "</s>", "<unk>", "<eoss>", "<racm3:break>", "<reserved08706>"]
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120 + len(reserved), special_tokens=reserved,
                                                           show_progress=False))
    return Tokenizer(backend, bos_token="<s>", add_bos=True)


def char_model_dir(tmp: Path, max_pos: int = 64, seed: int = 0) -> Path:
    """A random tiny llama with a character tokenizer, written with fuselm's own HF writer."""
    backend = char_backend()
    config = ModelConfig(arch="llama", vocab_size=backend.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=max_pos, bos_token_id=0, eos_token_ids=(1,))
    torch.manual_seed(seed)
    model = Transformer(config)
    for p in model.parameters():
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.3)
    write_hf_dir(tmp, config_to_hf(config), internal_to_hf(config, model.state_dict()))
    backend.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "add_bos_token": True}))
    return tmp


# ---------------------------------------------------------------------------------------------------- passkey

@pytest.mark.parametrize("style", ["yarn", "compact"])
@pytest.mark.parametrize("make_tok", [char_tokenizer, bpe_tokenizer], ids=["char", "bpe"])
def test_prompt_length_and_depth(style, make_tok):
    tok = make_tok()
    sty = passkey.STYLES[style]
    filler = [s for s in re.split(r"(?<=\.)\s+", sty.filler)]
    longest_sentence = max(len(tok.encode(" " + s, add_special_tokens=False)) for s in filler)
    for length in (300, 1000):
        for depth in (0.0, 0.25, 0.5, 0.9, 1.0):
            p = passkey.build_passkey_prompt(tok, length, depth, 54321, sty)
            assert length - longest_sentence - 1 <= len(p.ids) <= length
            assert tok.decode(p.ids, skip_special_tokens=True) == p.text
            info = sty.info.format(key=54321)
            assert p.text.count(info) == 1 and p.text.endswith(sty.question)
            # depth = the share of filler sentences before the info line
            before, after = p.text.split(info)
            n_before = len(re.findall(r"\.", before)) - len(re.findall(r"\.", sty.task))
            n_after = len(re.findall(r"[.?]", after)) - len(re.findall(r"[.?]", sty.question))
            assert abs(n_before / (n_before + n_after) - depth) <= 1 / (n_before + n_after)
            # key_position is where the info line starts, in tokens
            assert tok.decode(p.ids[p.key_position:], skip_special_tokens=True).lstrip().startswith(info)


def test_prompt_errors():
    tok = char_tokenizer()
    with pytest.raises(FuselmError, match="too short"):
        passkey.build_passkey_prompt(tok, 40, 0.5, 12345, passkey.STYLES["compact"])
    with pytest.raises(FuselmError, match="depth"):
        passkey.build_passkey_prompt(tok, 400, 1.5, 12345)


def test_trials_are_the_same_for_every_method_and_spread_over_depths():
    keys, depths = passkey.trial_plan(1024, 10, seed=3)
    assert (keys, depths) == passkey.trial_plan(1024, 10, seed=3)
    assert keys != passkey.trial_plan(2048, 10, seed=3)[0]
    assert all(i / 10 <= d < (i + 1) / 10 for i, d in enumerate(depths))
    assert all(passkey.KEY_RANGE[0] <= k < passkey.KEY_RANGE[1] for k in keys)


def test_first_integer():
    assert passkey.first_integer(" 48213. Remember") == 48213
    assert passkey.first_integer("is: 007 and 12") == 7
    assert passkey.first_integer("no digits") is None


def test_scoring_with_an_echoing_model(tmp_path, monkeypatch):
    """Generation replaced by a stub that reads the key back from the prompt text and answers it for even keys
    (and a wrong number for odd ones): accuracy must count exactly the even keys."""
    model = load(char_model_dir(tmp_path))
    tok = model.tokenizer
    seen = []

    def echo(m, ids, max_new_tokens, done=None):
        key = int(re.search(r"pass key is (\d+)\.", tok.decode(ids, skip_special_tokens=True)).group(1))
        seen.append((key, len(ids)))
        answer = key if key % 2 == 0 else key + 1
        return tok.encode(f" {answer}. Remember", add_special_tokens=False)[:max_new_tokens]

    monkeypatch.setattr(passkey, "greedy_continuation", echo)
    r = passkey.passkey_accuracy(model, 200, trials=12, seed=1, style=passkey.STYLES["compact"])
    assert len(seen) == 12 and all(n <= 200 for _, n in seen)
    assert [a[0] for a in r.answers] == [k for k, _ in seen]
    assert r.correct == sum(k % 2 == 0 for k, _ in seen) and r.accuracy == r.correct / 12
    assert 0 < r.correct < 12  # both outcomes occur with this seed

    monkeypatch.setattr(passkey, "greedy_continuation", lambda m, ids, n, done=None: [])
    assert passkey.passkey_accuracy(model, 200, trials=3, style=passkey.STYLES["compact"]).correct == 0


def test_greedy_continuation_matches_transformers_generate(tmp_path):
    from transformers import LlamaForCausalLM

    path = make_llama(tmp_path, eos_token_id=None)
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    hf = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    want = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 20:].tolist()
    got = passkey.greedy_continuation(load(path, dtype="float32"), ids[0].tolist(), 8)
    assert got == want


# ---------------------------------------------------------------------------------------------------- perplexity

def hf_strided_nll(hf_model, ids: torch.Tensor, ctx: int, stride: int) -> tuple[float, int]:
    """HF's perplexity guide, with the loss of each window weighted by the number of tokens it really scores."""
    nll, count, prev_end = 0.0, 0, 0
    n = ids.shape[1]
    for begin in range(0, n, stride):
        end = min(begin + ctx, n)
        trg_len = end - prev_end
        x = ids[:, begin:end]
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf_model(x, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())
        nll += float(loss) * scored
        count += scored
        prev_end = end
        if end == n:
            break
    return nll, count


@pytest.mark.parametrize("ctx,stride", [(16, 5), (16, 16), (16, 1), (64, 8)])
def test_perplexity_matches_transformers(tmp_path, ctx, stride):
    from transformers import LlamaForCausalLM

    path = make_llama(tmp_path)
    ids = torch.randint(0, 128, (1, 53), generator=torch.Generator().manual_seed(1))
    hf = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    nll, count = hf_strided_nll(hf, ids, ctx, stride)
    r = sliding_window_perplexity(load(path, dtype="float32"), ids[0], ctx, stride)
    windows = 1 if ctx >= 53 else math.ceil((53 - ctx) / stride) + 1
    assert r.windows == windows
    assert r.scored_tokens == count == (52 if stride < ctx else 53 - windows)
    assert r.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_equals_per_token_cross_entropy(tmp_path):
    """Each token t >= 1 is scored once, with the context of the first window that holds t and a token before it."""
    model = load(char_model_dir(tmp_path))
    ids = torch.randint(4, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(2))
    ctx, stride = 12, 5
    total = 0.0
    for t in range(1, 40):
        begin = next(b for b in range(0, 40, stride) if b < t < b + ctx)
        with torch.no_grad():
            logits = model.transformer(ids[None, begin:t])[0, -1]
        total += float(F.cross_entropy(logits[None], ids[t:t + 1]))
    r = sliding_window_perplexity(model, ids, ctx, stride)
    assert r.scored_tokens == 39
    assert r.nll == pytest.approx(total / 39, rel=1e-5)


def test_perplexity_errors(tmp_path):
    model = load(char_model_dir(tmp_path))
    with pytest.raises(FuselmError, match="stride"):
        sliding_window_perplexity(model, torch.arange(4, 20), 8, 9)
    with pytest.raises(FuselmError, match="at least 2 tokens"):
        sliding_window_perplexity(model, [5], 8, 4)


# ---------------------------------------------------------------------------------------------------- compare

def test_rope_scaling_for():
    assert compare.rope_scaling_for("none", 4, 256) == {"rope_type": "default"}
    assert compare.rope_scaling_for(compare.CHECKPOINT, 4, 256) is None
    assert compare.rope_scaling_for("yarn", 4, 256) == {"rope_type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": 256}
    assert compare.rope_scaling_for("llama3", 2, 512)["high_freq_factor"] == 4.0
    assert compare.factor_for(1024, 256, None) == 4.0 and compare.factor_for(128, 256, None) == 1.0
    assert compare.factor_for(1024, 256, 8.0) == 8.0
    with pytest.raises(FuselmError, match="unknown"):
        compare.rope_scaling_for("rope-magic", 2, 256)


def test_compare_writes_table_csv_and_plot(tmp_path):
    path = char_model_dir(tmp_path / "m", max_pos=64)
    calls = []

    def recording_load(p, **kw):
        calls.append(kw.get("rope_scaling"))
        return load(p, **kw)

    text = torch.randint(4, 60, (160,), generator=torch.Generator().manual_seed(0))
    result = compare.compare_methods(path, ["none", "linear", "yarn"], [96, 128], trials=2, seed=0,
                                     style=passkey.STYLES["compact"], text_ids=text, progress=False,
                                     load=recording_load)
    assert result.original_context == 64
    rows = {(r.method, r.length): r for r in result.rows}
    assert len(rows) == 6 and all(r.trials == 2 and r.ppl > 1 for r in rows.values())
    # auto factor: length / trained length; every method loaded with its own scaling
    assert rows[("linear", 128)].factor == 2.0 and rows[("yarn", 96)].factor == 1.5
    assert {"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 64} in calls
    assert rows[("none", 128)].ppl != rows[("linear", 128)].ppl != rows[("yarn", 128)].ppl
    # the perplexity in the table is the one a direct evaluation gives
    direct = load(path, rope_scaling=compare.rope_scaling_for("linear", 2.0, 64))
    assert rows[("linear", 128)].ppl == pytest.approx(sliding_window_perplexity(direct, text, 128).ppl)

    md, csv_path = compare.write_tables(result.rows, tmp_path / "out" / "cmp", original_context=64)
    png = compare.plot_comparison(result.rows, tmp_path / "out" / "cmp.png", original_context=64)
    table = md.read_text()
    assert "Passkey accuracy" in table and "perplexity" in table and "128 (s=2)" in table
    with open(csv_path) as f:
        records = list(csv.DictReader(f))
    assert len(records) == 6
    for rec, row in zip(records, result.rows):
        assert (rec["method"], int(rec["length"]), int(rec["trials"])) == (row.method, row.length, row.trials)
        assert float(rec["perplexity"]) == pytest.approx(row.ppl, rel=1e-5)
        assert float(rec["passkey_accuracy"]) == row.accuracy
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list((tmp_path / "out").glob(".*tmp*"))  # atomic writes leave no temporaries


def test_passkey_context_summary():
    rows = [compare.CompareRow("m", n, 1.0, acc, 0, 10, None) for n, acc in ((1, 1.0), (2, 0.8), (4, 0.5), (8, 1.0))]
    assert compare.passkey_context(rows, "m") == 2


# ---------------------------------------------------------------------------------------------------- CLI

def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fuselm")
    evals_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_parse_lengths_and_factor():
    assert evals_cmd.parse_lengths("1k,2k,1536,0.5k") == [1024, 2048, 1536, 512]
    assert evals_cmd.parse_factor("auto") is None and evals_cmd.parse_factor("4") == 4.0
    with pytest.raises(FuselmError, match="lengths"):
        evals_cmd.parse_lengths("1k,two")
    with pytest.raises(FuselmError, match="factor"):
        evals_cmd.parse_factor("x")


def test_cli_passkey_ppl_compare(tmp_path, capsys):
    path = str(char_model_dir(tmp_path / "m", max_pos=64))
    text = tmp_path / "t.txt"
    text.write_text(passkey._FILLER * 4)
    assert run_cli(["eval", "passkey", path, "--lengths", "100", "--trials", "2", "--style", "compact",
                    "--rope", "ntk-yarn", "--rope-factor", "2", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])[0]["factor"] == 2.0 and "ntk-yarn" in out
    assert run_cli(["eval", "ppl", path, "--text", str(text), "--ctx", "64", "--stride", "16", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = load(path).tokenizer.encode(text.read_text())
    assert r["ppl"] == pytest.approx(sliding_window_perplexity(load(path), ids, 64, 16).ppl)
    assert run_cli(["eval", "compare", path, "--methods", "none,dynamic", "--lengths", "96", "--trials", "1",
                    "--style", "compact", "--text", str(text), "--out", str(tmp_path / "c")]) == 0
    assert {p.name for p in tmp_path.glob("c.*")} == {"c.md", "c.csv", "c.png"}
    with pytest.raises(FuselmError, match="needs --rope-factor"):
        run_cli(["eval", "passkey", path, "--rope", "yarn"])
    with pytest.raises(FuselmError, match="methods"):
        run_cli(["eval", "compare", path, "--methods", "none,bogus", "--no-plot"])


def test_cli_demo_eval_dispatch(monkeypatch):
    """One spelling: `fuselm demo eval ARGS` parses with the quality module's own arguments and runs it."""
    from fuselm.cli import main
    from fuselm.demo import quality

    got = []
    monkeypatch.setattr(quality, "run", lambda args: got.append(args) or 0)
    assert main(["demo", "eval", "--n", "3", "--seed", "2"]) == 0
    assert (got[0].n, got[0].seed) == (3, 2)
    with pytest.raises(SystemExit):
        main(["eval", "demo"])  # the old spellings are gone
    with pytest.raises(SystemExit):
        main(["eval-demo"])
