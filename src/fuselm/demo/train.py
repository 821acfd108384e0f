"""`fuselm demo train`: train the bundled demo model on the picture world, on the CPU, from a seed.

Two models, both the project's own classes:
1. a small VQGAN of Chameleon's architecture (fuselm.vision.VQGAN), trained as a VQ-VAE: L1 + L2 reconstruction,
   codebook and commitment losses with a straight-through estimator; a short warm-up without quantization, then a
   k-means initialisation of the codebook from the encoder's outputs, so no code starts dead;
2. a small Chameleon decoder (fuselm.model.Transformer, arch "chameleon", qk-norm) over a byte-level BPE vocab
   laid out as Chameleon's (specials 0-3, image tokens IMGIMG..Z from id 4, then <eoss>, <racm3:break>,
   <reserved08706>), trained on three mixed tasks:
      caption -> image   <s> caption [<reserved08706>] <racm3:break> 64 image tokens <eoss> </s>
      image -> caption   <s> <racm3:break> 64 image tokens <eoss> <reserved08706> caption </s>
      interleaved        <s> draw two pictures <reserved08706> caption <racm3:break> image <eoss>
                             caption <racm3:break> image <eoss> </s>
   The end of turn after a caption is there in some caption -> image rows only: a prompt that ends its turn asks
   for a picture, and a bare caption is continued with its picture, as a document would be.

Only the world's train split is seen (held-out scenes are new combinations of seen objects). Training is
reproducible from the seed on a given machine type and thread count: every random choice comes from seeded
generators, and the step counts are fixed (the time budget only stops a run early, and says so).
The result is written as a GGUF with its companion image-tokenizer GGUF, tokenizer.json and TRAINING.md.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

from ..archs import config_to_hf, internal_to_gguf, internal_to_hf
from ..config import ModelConfig
from ..errors import FuselmError
from ..formats.hf import write_hf_dir
from ..model.transformer import Transformer
from ..vision import VQGAN, VQGANConfig, vqgan_state_dict
from ..vision.vocab import BEGIN_IMAGE, END_IMAGE, END_TURN, image_token_name
from .recipe import Recipe, TrainingLog, pixels_of
from .train_vqgan import decoded_accuracy, drawing_targets, reconstruction_accuracy, train_vqgan
from .world import IMAGE_SIZE, STORY_REQUEST, Scene, all_scenes, caption

MODEL_FILE = "demo.gguf"
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3, as in Chameleon
IMAGE_SPECIALS = (END_IMAGE, BEGIN_IMAGE, END_TURN)  # right after the image tokens, as in Chameleon's order
BOS, PAD, EOS = 0, 1, 2
IGNORE = -100


# ---------------------------------------------------------------- data


def build_tokenizer(texts: list[str], image_codes: int, merges: int) -> Tokenizer:
    """Byte-level BPE with Chameleon's pre-tokenizer splits and vocab layout; BOS is added on encode."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))

    def isolated(rx: str) -> pre_tokenizers.Split:
        return pre_tokenizers.Split(Regex(rx), behavior="isolated")

    # Chameleon's text_tokenizer.json splits (sentinels, image-token names, whitespace runs, digits, punctuation)
    # before byte-level BPE; formats/gguf_vocab recognizes this structure as llama.cpp's "chameleon" pre-tokenizer.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        isolated(r"<sentinel:[0-9]+>"), isolated(r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z"),
        isolated(r"([\t\n]|    |  )"), isolated(r"\p{N}"), isolated(r"[\p{P}!-/:-@\[-`{-~]"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    reserved = [*SPECIALS, *(image_token_name(i) for i in range(image_codes)), *IMAGE_SPECIALS]
    trainer = trainers.BpeTrainer(vocab_size=len(reserved) + 256 + merges, special_tokens=reserved,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS)])
    return tok


class Sequences:
    """Token-id sequences of the three tasks, from scenes and their image codes."""

    def __init__(self, tok: Tokenizer, read: dict[Scene, list[int]], drawn: dict[Scene, list[int]]):
        vocab = tok.get_vocab()
        self.tok = tok
        # Pictures the model reads are the VQGAN's encodings; pictures it draws are the drawing targets.
        self.read_ids = {scene: [vocab[image_token_name(c)] for c in cs] for scene, cs in read.items()}
        self.drawn_ids = {scene: [vocab[image_token_name(c)] for c in cs] for scene, cs in drawn.items()}
        self.boi, self.eoi, self.eot = vocab[BEGIN_IMAGE], vocab[END_IMAGE], vocab[END_TURN]

    def text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def image(self, scene: Scene, drawn: bool) -> list[int]:
        return [self.boi, *(self.drawn_ids if drawn else self.read_ids)[scene], self.eoi]

    def caption_to_image(self, scene: Scene, prompt: str, end_turn: bool = True) -> list[int]:
        return [BOS, *self.text(prompt), *([self.eot] if end_turn else []), *self.image(scene, True), EOS]

    def image_to_caption(self, scene: Scene) -> list[int]:
        return [BOS, *self.image(scene, False), self.eot, *self.text(caption(scene)), EOS]

    def interleaved(self, first: Scene, second: Scene) -> list[int]:
        return [BOS, *self.text(STORY_REQUEST), self.eot, *self.text(caption(first)), *self.image(first, True),
                *self.text(caption(second)), *self.image(second, True), EOS]


def swapped_caption(scene: Scene) -> str:
    """The caption with its two objects in the other order (parse_caption reads both orders)."""
    first, second = caption(scene).split(" and ")
    return f"{second} and {first}"


def batch_tensors(rows: list[list[int]], targets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs [B, T] and targets [B, T] (IGNORE where nothing is predicted)."""
    width = max(len(r) for r in rows) - 1
    x = torch.full((len(rows), width), PAD, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, targets)):
        x[i, : len(r) - 1] = torch.tensor(r[:-1])
        y[i, : len(t) - 1] = torch.tensor(t[1:])
    return x, y


# ---------------------------------------------------------------- decoder


def decoder_config(r: Recipe, tok: Tokenizer, vq_config: VQGANConfig) -> ModelConfig:
    if r.hidden_size % r.heads:
        raise FuselmError(f"demo recipe: hidden_size {r.hidden_size} is not a multiple of heads {r.heads}")
    return ModelConfig(arch="chameleon", vocab_size=tok.get_vocab_size(), hidden_size=r.hidden_size,
                       intermediate_size=r.intermediate_size, num_hidden_layers=r.layers,
                       num_attention_heads=r.heads, num_key_value_heads=r.heads, head_dim=r.hidden_size // r.heads,
                       max_position_embeddings=r.context, qk_norm=True, bos_token_id=BOS, eos_token_ids=(EOS,),
                       pad_token_id=PAD,
                       extra={"vocabulary_map": tok.get_vocab(), "vq_config": vq_config.to_dict()})


def _init_weights(model: Transformer, layers: int) -> None:
    """GPT-2 style: N(0, 0.02) matrices, residual outputs scaled by 1/sqrt(2 layers); norms stay ones/zeros."""
    for name, p in model.named_parameters():
        if p.ndim == 2 and "norm" not in name:
            std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn.o.weight", "mlp.down.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)


def _masked(row: list[int], keep_from: int) -> list[int]:
    """Targets for a row: IGNORE before position keep_from (what is never worth predicting, e.g. after BOS)."""
    return [IGNORE] * keep_from + row[keep_from:]


def training_rows(seqs: Sequences, scenes: list[Scene], rng: np.random.Generator, r: Recipe
                  ) -> tuple[list[list[int]], list[list[int]], list[list[int]], list[list[int]]]:
    """One step's rows: (short rows, their targets, interleaved rows, their targets)."""
    short, short_t = [], []
    for i in range(r.lm_short_batch):
        scene = scenes[rng.integers(len(scenes))]
        if i % 3 < 2:  # two drawing rows for each reading row: drawing new combinations is the harder task
            two = len(scene.objects) == 2
            prompt = swapped_caption(scene) if two and rng.random() < r.swap_order else caption(scene)
            row = seqs.caption_to_image(scene, prompt, end_turn=rng.random() < r.end_turn)
        else:
            row = seqs.image_to_caption(scene)
        short.append(row)
        short_t.append(_masked(row, 1))
    long, long_t = [], []
    for _ in range(r.lm_long_batch):
        a, b = (scenes[j] for j in rng.integers(len(scenes), size=2))
        row = seqs.interleaved(a, b)
        long.append(row)
        long_t.append(_masked(row, 1))
    return short, short_t, long, long_t


def _loss_sum(model: Transformer, rows: list[list[int]], targets: list[list[int]]) -> tuple[torch.Tensor, int]:
    x, y = batch_tensors(rows, targets)
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                           reduction="sum"), int((y != IGNORE).sum())


def train_decoder(r: Recipe, config: ModelConfig, seqs: Sequences, scenes: list[Scene], log: TrainingLog,
                  deadline: float) -> Transformer:
    torch.manual_seed(r.seed + 1)
    rng = np.random.default_rng(r.seed + 1)
    model = Transformer(config).train()
    _init_weights(model, r.layers)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "norm" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.lm_weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=r.lm_lr, betas=(0.9, 0.95))
    t0 = time.perf_counter()
    smooth = None
    bar = tqdm(range(r.lm_steps), desc="decoder", unit="step", dynamic_ncols=True)
    for step in bar:
        warm = min(1.0, (step + 1) / r.lm_warmup)
        lr = r.lm_lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / r.lm_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        short, short_t, long, long_t = training_rows(seqs, scenes, rng, r)
        opt.zero_grad(set_to_none=True)
        s1, n1 = _loss_sum(model, short, short_t)
        s2, n2 = _loss_sum(model, long, long_t)
        loss = (s1 + s2) / (n1 + n2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smooth = loss.item() if smooth is None else 0.9 * smooth + 0.1 * loss.item()
        bar.set_postfix(loss=f"{smooth:.4f}")
        if time.perf_counter() > deadline:
            log.stopped_early.append(f"decoder stopped at step {step + 1} of {r.lm_steps} (time budget)")
            break
    bar.close()
    model.eval()
    log.seconds["decoder"] = time.perf_counter() - t0
    log.metrics["decoder_final_train_loss_smoothed"] = smooth
    return model


@torch.no_grad()
def task_losses(model: Transformer, seqs: Sequences, scenes: list[Scene]) -> dict[str, float]:
    """Mean cross-entropy per predicted token of the image (caption -> image) and of the caption (image ->
    caption), over every given scene, with greedy-exactness: the share of scenes whose every target token is the
    argmax."""
    out = {}
    for task in ("image", "caption"):
        rows, targets = [], []
        for scene in scenes:
            if task == "image":
                row = seqs.caption_to_image(scene, caption(scene))
                start = row.index(seqs.boi) + 1  # the 64 codes, <eoss> and </s>
            else:
                row = seqs.image_to_caption(scene)
                start = row.index(seqs.eot) + 1  # the caption and </s>
            rows.append(row)
            targets.append(_masked(row, start))
        x, y = batch_tensors(rows, targets)
        logits = model(x)
        mask = y != IGNORE
        ce = F.cross_entropy(logits[mask], y[mask])
        exact = ((logits.argmax(-1) == y) | ~mask).all(dim=1).float().mean()
        out[f"{task}_loss"] = float(ce)
        out[f"{task}_teacher_forced_exact"] = float(exact)
    return out


# ---------------------------------------------------------------- saving


def save_hf(directory: Path, config: ModelConfig, model: Transformer, vq: VQGAN, tok: Tokenizer) -> Path:
    """An HF directory (config.json with vq_config, model.safetensors with model.vqmodel.*, tokenizer files)."""
    state = internal_to_hf(config, {k: v.detach() for k, v in model.state_dict().items()})
    state.update({f"model.vqmodel.{k}": v for k, v in vqgan_state_dict(vq).items()})
    write_hf_dir(directory, config_to_hf(config), state)
    _save_tokenizer(directory, tok)
    return directory


def _save_tokenizer(directory: Path, tok: Tokenizer) -> None:
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIALS[0], "eos_token": SPECIALS[2], "pad_token": SPECIALS[1], "unk_token": SPECIALS[3],
         "sep_token": END_TURN, "add_bos_token": True}, indent=1) + "\n", encoding="utf-8")


def save_gguf(directory: Path, config: ModelConfig, model: Transformer, vq: VQGAN, tok: Tokenizer) -> Path:
    """demo.gguf (F32) + demo-vqgan.gguf + tokenizer.json/tokenizer_config.json in `directory`."""
    from ..archs import write_gguf

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    tensors = {name: (t, "F32") for name, t in internal_to_gguf(config, state).items()}
    path = write_gguf(directory / MODEL_FILE, config, tensors, tokenizer=tok, progress=False,
                      vqgan=(vq.config.to_dict(), vqgan_state_dict(vq)))
    _save_tokenizer(directory, tok)
    return path


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s ({s / 60:.1f} min)"


def training_note(log: TrainingLog, files: dict[str, int]) -> str:
    r = log.recipe
    m = log.metrics
    lines = [
        "# The bundled demo model",
        "",
        "Trained by `fuselm demo train --seed {}` (src/fuselm/demo/train.py) on {} with {} torch threads, "
        "torch {}.".format(r.seed, platform.machine() or "this CPU", r.threads, torch.__version__),
        "Reproducible from the seed on the same machine type and thread count (float results depend on the "
        "kernels the CPU selects).",
        "",
        "## Time",
        "",
        "| stage | wall time |",
        "|---|---|",
        *(f"| {k} | {_fmt_seconds(v)} |" for k, v in log.seconds.items()),
        "",
        *(f"**Stopped early:** {s}" for s in log.stopped_early),
        "## Results at the end of training",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in m.items()),
        "",
        "Losses are mean cross-entropy per predicted token (nats). `teacher_forced_exact` is the share of scenes "
        "whose every target token is the model's argmax when fed the true prefix. Reconstruction accuracy is the "
        "share of scenes whose VQGAN reconstruction the non-learned picture checker reads exactly right.",
        "",
        "## Files",
        "",
        "| file | bytes |",
        "|---|---|",
        *(f"| {name} | {size:,} |" for name, size in files.items()),
        f"| total | {sum(files.values()):,} |",
        "",
        "## Recipe",
        "",
        "```json",
        json.dumps(asdict(r), indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def gguf_writer_available() -> bool:
    try:
        from ..archs import write_gguf  # noqa: F401
    except ImportError:
        return False
    return True


def train_demo(out_dir: Path, seed: int = 0, minutes: float = 60.0, recipe: Recipe | None = None) -> Path:
    """Train both models and write the shipped files into out_dir. Returns the model path (or HF dir)."""
    r = recipe or Recipe(seed=seed)
    torch.set_num_threads(r.threads)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    deadline = t_start + minutes * 60
    log = TrainingLog(recipe=r)
    out_dir = Path(out_dir)
    train, heldout = all_scenes("train"), all_scenes("heldout")

    vq = train_vqgan(r, train, log)
    codes = vq.encode(pixels_of(train))
    log.metrics["vqgan_codes_used_by_train_scenes"] = int(codes.unique().numel())
    if r.checks:
        acc_train, _ = reconstruction_accuracy(vq, train)
        acc_heldout, _ = reconstruction_accuracy(vq, heldout)
        log.metrics["vqgan_reconstruction_accuracy_train"] = acc_train
        log.metrics["vqgan_reconstruction_accuracy_heldout"] = acc_heldout
        print(f"VQGAN: reconstructions read right {acc_train:.1%} (train), {acc_heldout:.1%} (held-out); "
              f"{log.metrics['vqgan_codes_used_by_train_scenes']} of {r.vq_codes} codes used")

    tok = build_tokenizer([caption(s) for s in all_scenes("all")] + [STORY_REQUEST], r.vq_codes, r.text_merges)
    grid = vq.grid(IMAGE_SIZE, IMAGE_SIZE)[0]
    drawn = drawing_targets(train, codes, grid)
    # Held-out targets are only measured (from train halves), never trained on.
    drawn_heldout = drawing_targets(train, codes, grid, wanted=heldout)
    if r.checks:
        log.metrics["drawing_targets_decoded_right_train"] = decoded_accuracy(vq, drawn)
        log.metrics["drawing_targets_decoded_right_heldout"] = decoded_accuracy(vq, drawn_heldout)
    seqs = Sequences(tok, {s: c.tolist() for s, c in zip(train, codes)}, drawn)
    config = decoder_config(r, tok, vq.config)
    model = train_decoder(r, config, seqs, train, log, deadline)
    log.metrics.update({f"train_{k}": v for k, v in task_losses(model, seqs, train).items()})
    held = Sequences(tok, {s: c.tolist() for s, c in zip(heldout, vq.encode(pixels_of(heldout)))}, drawn_heldout)
    log.metrics.update({f"heldout_{k}": v for k, v in task_losses(model, held, heldout).items()})
    log.metrics["decoder_parameters"] = sum(p.numel() for p in model.parameters())
    log.metrics["vqgan_parameters"] = sum(p.numel() for p in vq.parameters())

    out_dir.mkdir(parents=True, exist_ok=True)
    if gguf_writer_available():
        result = save_gguf(out_dir, config, model, vq, tok)
    else:
        result = save_hf(out_dir / "hf", config, model, vq, tok)
    log.seconds["total"] = time.perf_counter() - t_start
    # On a shared machine wall time overstates the cost; CPU time over the thread count is what an idle machine
    # with that many cores would take (roughly: waiting threads also spin).
    log.seconds[f"CPU time / {r.threads} threads"] = (time.process_time() - cpu_start) / r.threads
    files = {p.relative_to(out_dir).as_posix(): p.stat().st_size for p in sorted(out_dir.rglob("*"))
             if p.is_file() and p.name != "TRAINING.md"}
    (out_dir / "TRAINING.md").write_text(training_note(log, files), encoding="utf-8")
    print(f"wrote {result} ({sum(files.values()) / 2**20:.1f} MiB in {out_dir}) in "
          f"{_fmt_seconds(log.seconds['total'])}")
    return result

