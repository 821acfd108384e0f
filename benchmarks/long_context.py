"""End-to-end RoPE context extension: train a tiny Llama to retrieve passkeys at 256 tokens, then extend it.

    python benchmarks/long_context.py [--train-seconds 300] [--trials 20] [--threads 2]

1. A character-level tokenizer (built with `tokenizers`) and a tiny llama-arch `fuselm` Transformer
   (2 layers, hidden 128, 4 heads of 32, RoPE base 10000) are trained from scratch, on the CPU, on passkey
   prompts (`fuselm.evals.passkey`, "compact" wording) of 64..256 tokens. Its context is 256 tokens.
2. The model is saved as an HF directory (benchmarks/out/long_context_model/) and loaded back through
   `fuselm.load(path, rope_scaling=...)` once per method, as a user would.
3. Every method (none, linear, ntk, dynamic, yarn, llama3, ntk-margin, ntk-yarn) is evaluated on the same
   passkey prompts at 256..2048 tokens, and by the sliding-window perplexity of a held-out 2048-token haystack:
   - "auto" factor: s = length / 256 at each length (at most 8), the best a static method can be set to;
   - "fixed" factor: s = 8 at every length, as when one configures a model once for its longest context.
4. Writes benchmarks/out/long_context.md (+ .csv) and benchmarks/out/long_context.png.

No fine-tuning after scaling: this measures the methods applied at load time to a model that has only ever seen
256 tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import string
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from fuselm.archs import config_to_hf, internal_to_hf
from fuselm.config import ModelConfig
from fuselm.evals.compare import (
    METHODS,
    compare_methods,
    format_table,
    passkey_context,
    plot_comparison,
    require_matplotlib,
    write_tables,
)
from fuselm.evals.passkey import KEY_RANGE, STYLES, build_passkey_prompt
from fuselm.formats.hf import write_hf_dir
from fuselm.model.transformer import Transformer
from fuselm.tokenizer import Tokenizer

TRAIN_CONTEXT = 256
STYLE = STYLES["compact"]
SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]
BOS, EOS, PAD = 0, 1, 2
OUT = Path(__file__).parent / "out"


def build_char_tokenizer() -> HFTokenizer:
    """One token per character (letters, digits, punctuation, space), specials first."""
    chars = sorted(set(string.ascii_letters + string.digits + " .,;:!?'\"-\n"))
    vocab = {t: i for i, t in enumerate([*SPECIALS, *chars])}
    tok = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return tok


def model_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                       max_position_embeddings=TRAIN_CONTEXT, rope_theta=10000.0, bos_token_id=BOS,
                       eos_token_ids=(EOS,), pad_token_id=PAD)


def example(tok: Tokenizer, rng: np.random.Generator, max_len: int) -> list[int]:
    """A passkey prompt of 96..max_len tokens (answer included), the key at a uniform depth."""
    key = int(rng.integers(*KEY_RANGE))
    answer = tok.encode(f" {key}.", add_special_tokens=False) + [EOS]
    length = int(rng.integers(96, max_len - len(answer) + 1))
    prompt = build_passkey_prompt(tok, length, float(rng.random()), key, STYLE)
    return prompt.ids + answer


def batch(tok: Tokenizer, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [example(tok, rng, TRAIN_CONTEXT + 1) for _ in range(size)]
    width = max(map(len, rows))
    x = torch.full((size, width - 1), PAD)
    y = torch.full((size, width - 1), -100)
    for i, r in enumerate(rows):
        t = torch.tensor(r)
        x[i, :len(r) - 1] = t[:-1]
        y[i, :len(r) - 1] = t[1:]
    return x, y


def answer_accuracy(model: Transformer, tok: Tokenizer, n: int = 64, seed: int = 99) -> float:
    """Teacher-forced exactness of the five key digits on fresh prompts (a quick training monitor)."""
    rng = np.random.default_rng(seed)
    x, y = batch(tok, rng, n)
    with torch.no_grad():
        pred = model(x).argmax(-1)
    ok = 0
    for i in range(n):
        pos = (y[i] != -100).nonzero().flatten()[-7:-2]  # the five digits before "." and </s>
        ok += bool((pred[i, pos] == y[i, pos]).all())
    return ok / n


def train(tok: Tokenizer, config: ModelConfig, seconds: float, max_steps: int, batch_size: int, lr: float,
          seed: int) -> tuple[Transformer, dict]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Transformer(config).train()
    for name, p in model.named_parameters():
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.02)
            if name.endswith(("attn.o.weight", "mlp.down.weight")):
                p.data /= math.sqrt(2 * config.num_hidden_layers)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = 50
    t0 = time.perf_counter()
    bar = tqdm(range(max_steps), desc="train", unit="step", dynamic_ncols=True)
    smooth, step = None, 0
    for step in bar:
        elapsed = time.perf_counter() - t0
        if elapsed > seconds:
            break
        # cosine decay over the time budget (the step count is what the shared cores allow)
        progress = min(1.0, max(elapsed / seconds, step / max_steps))
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        x, y = batch(tok, rng, batch_size)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smooth = float(loss) if smooth is None else 0.95 * smooth + 0.05 * float(loss)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{smooth:.3f}")
    bar.close()
    model.eval()
    stats = {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "final_loss_smoothed": smooth,
             "tokens_seen_approx": step * batch_size * (TRAIN_CONTEXT + 64) // 2}
    stats["teacher_forced_key_accuracy"] = answer_accuracy(model, tok)
    return model, stats


def save(directory: Path, config: ModelConfig, model: Transformer, hf_tok: HFTokenizer) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_hf_dir(directory, config_to_hf(config), internal_to_hf(config, state))
    hf_tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True}))
    return directory


def haystack_ids(tok: Tokenizer, length: int, seed: int = 12345) -> torch.Tensor:
    """A held-out long document for perplexity: one passkey prompt of `length` tokens plus its answer."""
    key = int(np.random.default_rng(seed).integers(*KEY_RANGE))
    prompt = build_passkey_prompt(tok, length + 32, 0.37, key, STYLE)  # at least `length` tokens
    return torch.tensor(prompt.ids + tok.encode(f" {key}.", add_special_tokens=False) + [EOS])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-seconds", type=float, default=300, help="training time budget (default 300)")
    ap.add_argument("--max-steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--trials", type=int, default=20, help="passkey prompts per method and length")
    ap.add_argument("--lengths", default="256,384,512,768,1024,1536,2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="reuse a model saved by an earlier run instead of training (default: train)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    require_matplotlib()
    args.out.mkdir(parents=True, exist_ok=True)
    hf_tok = build_char_tokenizer()
    tok = Tokenizer(hf_tok, bos_token="<s>", eos_token="</s>", add_bos=True, source="char tokenizer")
    config = model_config(hf_tok.get_vocab_size())
    if args.model_dir is None:
        model, stats = train(tok, config, args.train_seconds, args.max_steps, args.batch, args.lr, args.seed)
        model_dir = save(args.out / "long_context_model", config, model, hf_tok)
        print(f"trained: {json.dumps(stats)}; saved {model_dir}")
    else:
        model_dir, stats = args.model_dir, {"reused": str(args.model_dir)}
    lengths = [int(n) for n in args.lengths.split(",")]
    text = haystack_ids(tok, max(lengths))
    t0 = time.perf_counter()
    runs = {}
    for label, factor in (("auto", None), ("fixed", 8.0)):
        runs[label] = compare_methods(model_dir, METHODS, lengths, factor=factor, original_context=TRAIN_CONTEXT,
                                      trials=args.trials, seed=args.seed, style=STYLE, text_ids=text)
    eval_seconds = time.perf_counter() - t0
    preamble = [
        "# RoPE context extension on a tiny passkey model (benchmarks/long_context.py)", "",
        f"A {sum(p.numel() for p in Transformer(config).parameters()) / 1e6:.2f}M-parameter llama-arch model "
        f"(2 layers, hidden 128, 4 heads of 32, base 10000, char tokenizer) trained from scratch for "
        f"{stats.get('steps', '?')} steps ({stats.get('seconds', '?')} s on {args.threads} CPU threads) on passkey "
        f"prompts of 64..{TRAIN_CONTEXT} tokens; its context is {TRAIN_CONTEXT}. Then each RoPE scaling method "
        "is applied at load time, with no fine-tuning. Passkey: the same prompts for every method (compact "
        f"wording, {args.trials} per cell, depths spread evenly). Perplexity: one held-out {max(lengths)}-token "
        "haystack, windows of the column's length, stride length/2.", "",
        f"Training: {json.dumps(stats)}. Evaluation took {eval_seconds:.0f} s.", "",
    ]
    sections = []
    for label, title in (("auto", "## Factor s = length / 256 at each length"),
                         ("fixed", "## Factor s = 8 at every length")):
        sections.append(title + "\n\n" + format_table(runs[label].rows, TRAIN_CONTEXT))
    report = "\n".join(preamble) + "\n" + "\n".join(sections)
    md = args.out / "long_context.md"
    tmp = md.with_name(".long_context.md.tmp")
    tmp.write_text(report)
    tmp.replace(md)
    write_tables(runs["auto"].rows + [_fixed(r) for r in runs["fixed"].rows], args.out / "long_context")
    md_csv_only = args.out / "long_context.md"
    tmp.write_text(report)  # write_tables wrote a plain table to .md; keep the full report there
    tmp.replace(md_csv_only)
    png = plot_comparison(runs["auto"].rows, args.out / "long_context.png", original_context=TRAIN_CONTEXT,
                          title="tiny passkey model trained at 256 tokens; RoPE scaling at load, s = length/256")
    plot_comparison(runs["fixed"].rows, args.out / "long_context_fixed8.png", original_context=TRAIN_CONTEXT,
                    title="tiny passkey model trained at 256 tokens; RoPE scaling at load, s = 8")
    print(report)
    for label in ("auto", "fixed"):
        ctx = {m: passkey_context(runs[label].rows, m) for m in METHODS}
        print(f"passkey context (>= 80%), factor {label}: {ctx}")
    print(f"wrote {md}, {args.out / 'long_context.csv'}, {png}")


def _fixed(row):
    from dataclasses import replace

    return replace(row, method=f"{row.method} (s=8)")


if __name__ == "__main__":
    main()
