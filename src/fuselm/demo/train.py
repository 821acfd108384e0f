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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

from ..archs import config_to_hf, internal_to_gguf, internal_to_hf
from ..config import ModelConfig
from ..errors import FuselmError
from ..evals.picture_checker import scene_matches
from ..formats.hf import write_hf_dir
from ..model.transformer import Transformer
from ..vision import VQGAN, VQGANConfig, vqgan_state_dict
from ..vision.processor import ImageProcessor
from ..vision.vocab import BEGIN_IMAGE, END_IMAGE, END_TURN, image_token_name
from ..vision.vqgan import nearest_code
from .world import IMAGE_SIZE, Scene, all_scenes, caption, render

MODEL_FILE = "demo.gguf"
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3, as in Chameleon
IMAGE_SPECIALS = (END_IMAGE, BEGIN_IMAGE, END_TURN)  # right after the image tokens, as in Chameleon's order
BOS, PAD, EOS = 0, 1, 2
IGNORE = -100
STORY_REQUEST = "draw two pictures"  # the user turn that opens an interleaved document


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the result, besides the machine."""

    seed: int = 0
    threads: int = 2
    # VQGAN: 32x32 pixels -> 8x8 codes (three levels), 256 codes of 32 dims.
    vq_base_channels: int = 32
    vq_channel_multiplier: tuple[int, ...] = (1, 1, 2)
    vq_res_blocks: int = 1
    vq_codes: int = 256
    vq_embed_dim: int = 32
    vq_warmup_steps: int = 300  # autoencoder without quantization, before the k-means codebook init
    vq_steps: int = 800  # total, warm-up included
    vq_batch: int = 16
    vq_lr: float = 2e-3
    vq_beta: float = 0.25  # commitment weight
    vq_restart_until: float = 0.5  # dead codes are restarted during this fraction of the VQ steps
    vq_pairs: int = 6  # of each batch, this many pairs of train scenes that share one object in one slot
    vq_locality: float = 1.0  # weight of the loss that makes such a pair's latents agree on that half
    # Decoder: every weight row a multiple of 256, so the K-quants apply without fallback.
    hidden_size: int = 256
    intermediate_size: int = 512
    layers: int = 4
    heads: int = 4
    context: int = 512
    text_merges: int = 200  # upper bound; BPE stops when the captions have nothing left to merge
    lm_steps: int = 500
    lm_short_batch: int = 48  # caption->image and image->caption rows per step, 2:1
    lm_long_batch: int = 8  # interleaved rows per step
    lm_lr: float = 2e-3
    lm_warmup: int = 30
    lm_weight_decay: float = 0.05
    checks: bool = True  # judge reconstructions and drawing targets with the picture checker (slow-ish)
    swap_order: float = 0.5  # share of two-object prompts written with the objects in the other order
    end_turn: float = 0.3  # share of caption -> image rows with <reserved08706> after the caption


@dataclass
class TrainingLog:
    recipe: Recipe
    seconds: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    stopped_early: list = field(default_factory=list)


# ---------------------------------------------------------------- data


def pixels_of(scenes: list[Scene]) -> torch.Tensor:
    """float[B, 3, 32, 32] in [-1, 1], through the same processor the runtime uses."""
    return ImageProcessor(IMAGE_SIZE).preprocess([render(s) for s in scenes])


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


# ---------------------------------------------------------------- VQGAN


def vqgan_config(r: Recipe) -> VQGANConfig:
    return VQGANConfig(embed_dim=r.vq_embed_dim, num_embeddings=r.vq_codes, latent_channels=r.vq_embed_dim,
                       resolution=IMAGE_SIZE, base_channels=r.vq_base_channels,
                       channel_multiplier=r.vq_channel_multiplier, num_res_blocks=r.vq_res_blocks)


def _latents(vq: VQGAN, x: torch.Tensor) -> torch.Tensor:
    return vq.quant_conv(vq.encoder(x))


def _reconstruct(vq: VQGAN, z: torch.Tensor) -> torch.Tensor:
    return vq.decoder(vq.post_quant_conv(z))


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iters: int = 20) -> torch.Tensor:
    """Centroids [k, D]: k-means++ seeding, then Lloyd steps; an emptied cluster takes the worst-served point."""
    n = points.shape[0]
    centroids = points[torch.randint(n, (1,), generator=generator)]
    for _ in range(1, k):
        d2 = torch.cdist(points, centroids).min(dim=1).values ** 2
        pick = torch.multinomial(d2 + 1e-12, 1, generator=generator) if float(d2.sum()) > 0 else \
            torch.randint(n, (1,), generator=generator)
        centroids = torch.cat([centroids, points[pick]])
    for _ in range(iters):
        dist = torch.cdist(points, centroids)
        assign = dist.argmin(dim=1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
        for j in torch.nonzero(counts == 0).flatten().tolist():
            centroids[j] = points[dist.min(dim=1).values.argmax()]
    return centroids


def _zero_init_residuals(vq: VQGAN) -> None:
    """Every residual branch starts as the identity (last conv of each res block and attention output zeroed):
    the net begins as a shallow conv stack that learns colours and edges fast, and grows depth as it trains."""
    for name, module in vq.named_modules():
        if name.endswith(("conv2", "proj_out")):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)


def slot_pairs(scenes: list[Scene]) -> list[tuple[int, int, int]]:
    """(i, j, slot) for two-object scenes i != j with the same layout and the same object in `slot`."""
    by_slot: dict[tuple, list[int]] = {}
    for i, s in enumerate(scenes):
        if len(s.objects) == 2:
            for k, obj in enumerate(s.objects):
                by_slot.setdefault((s.layout, k, obj), []).append(i)
    return [(i, j, k) for (_, k, _), group in by_slot.items() for i in group for j in group if i != j]


def half_masks(grid: int) -> dict[tuple[str, int], torch.Tensor]:
    """Latent-grid mask [grid, grid] of the half that holds slot k of a two-object layout."""
    rows = torch.arange(grid)[:, None].expand(grid, grid)
    cols = torch.arange(grid)[None, :].expand(grid, grid)
    half = grid // 2
    return {("left-right", 0): cols < half, ("left-right", 1): cols >= half,
            ("top-bottom", 0): rows < half, ("top-bottom", 1): rows >= half}


def locality_loss(za: torch.Tensor, zb: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Scale-free disagreement of two latents [B, D, h, w] over masked cells [B, h, w]: 0 when equal there.

    Two train pictures with the same object in the same slot should encode that half alike, whatever the other
    slot holds; then a new combination of seen objects is made of seen codes, which the decoder can compose."""
    m = masks[:, None].float()
    return ((za - zb) ** 2 * m).sum() / ((za**2 + zb**2) * m).sum().clamp(min=1e-6)


def train_vqgan(r: Recipe, scenes: list[Scene], log: TrainingLog) -> VQGAN:
    torch.manual_seed(r.seed)
    generator = torch.Generator().manual_seed(r.seed)
    vq = VQGAN(vqgan_config(r)).train()
    _zero_init_residuals(vq)
    images = pixels_of(scenes)
    params = [p for name, p in vq.named_parameters() if not name.startswith("quantize.")]
    opt = torch.optim.Adam(params, lr=r.vq_lr)
    code_opt = torch.optim.Adam(vq.quantize.parameters(), lr=r.vq_lr)
    codebook = vq.quantize.embedding.weight
    usage = torch.zeros(r.vq_codes)
    pairs = slot_pairs(scenes)
    grid = IMAGE_SIZE // vqgan_config(r).downsample_factor
    masks = half_masks(grid)
    n_pairs = min(r.vq_pairs, r.vq_batch // 2) if pairs else 0
    singles = [i for i, s in enumerate(scenes) if len(s.objects) == 1] if n_pairs else list(range(len(scenes)))
    t0 = time.perf_counter()
    bar = tqdm(range(r.vq_steps), desc="VQGAN", unit="step", dynamic_ncols=True)
    for step in bar:
        lr = r.vq_lr * 0.5 * (1 + math.cos(math.pi * step / r.vq_steps))
        for group in (*opt.param_groups, *code_opt.param_groups):
            group["lr"] = lr
        picked = [pairs[int(k)] for k in torch.randint(len(pairs), (n_pairs,), generator=generator)] if n_pairs \
            else []
        # The pairs cover the two-object scenes; the rest of the batch shows the rarer one-object scenes.
        rest = [singles[int(k)] for k in torch.randint(len(singles), (r.vq_batch - 2 * n_pairs,),
                                                        generator=generator)]
        order = [i for i, _, _ in picked] + [j for _, j, _ in picked] + rest
        x = images[order]
        z = _latents(vq, x)
        local = torch.zeros(())
        if n_pairs:
            pair_masks = torch.stack([masks[(scenes[i].layout, k)] for i, _, k in picked])
            local = locality_loss(z[:n_pairs], z[n_pairs:2 * n_pairs], pair_masks)
        vq_loss = torch.zeros(())
        if step >= r.vq_warmup_steps:
            if step == r.vq_warmup_steps:  # start every code on the data: k-means over all training latents
                with torch.no_grad():
                    flat = _latents(vq, images).permute(0, 2, 3, 1).reshape(-1, r.vq_embed_dim)
                    codebook.data.copy_(kmeans(flat, r.vq_codes, generator))
            b, d, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            idx = nearest_code(flat.detach(), codebook.detach())
            # A one-hot matmul, not codebook[idx]: indexing's backward accumulates with threads in no fixed order.
            e = F.one_hot(idx, r.vq_codes).to(codebook.dtype) @ codebook
            vq_loss = F.mse_loss(e, flat.detach()) + r.vq_beta * F.mse_loss(flat, e.detach())
            z = (flat + (e - flat).detach()).view(b, h, w, d).permute(0, 3, 1, 2)
            usage += torch.bincount(idx, minlength=r.vq_codes).float()
            restart_end = r.vq_warmup_steps + r.vq_restart_until * (r.vq_steps - r.vq_warmup_steps)
            if (step - r.vq_warmup_steps) % 20 == 19:
                dead = torch.nonzero(usage == 0).flatten()
                if len(dead) and step < restart_end:
                    with torch.no_grad():  # a dead code restarts on a random latent of this batch
                        pick = torch.randint(len(flat), (len(dead),), generator=generator)
                        codebook.data[dead] = flat.detach()[pick]
                usage.zero_()
        y = _reconstruct(vq, z)
        recon = F.l1_loss(y, x) + F.mse_loss(y, x)
        loss = recon + vq_loss + r.vq_locality * local
        opt.zero_grad(set_to_none=True)
        code_opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= r.vq_warmup_steps:
            code_opt.step()
        bar.set_postfix(recon=f"{recon.item():.4f}", vq=f"{vq_loss.item():.4f}", local=f"{local.item():.3f}")
    bar.close()
    vq.eval()
    log.seconds["vqgan"] = time.perf_counter() - t0
    log.metrics["vqgan_final_recon_loss"] = recon.item()
    log.metrics["vqgan_final_vq_loss"] = vq_loss.item()
    log.metrics["vqgan_final_locality_loss"] = local.item()
    return vq


def drawing_targets(scenes: list[Scene], codes: torch.Tensor, grid: int,
                    wanted: list[Scene] | None = None) -> dict[Scene, list[int]]:
    """The code grid the decoder is taught to draw for each scene (of `wanted`, default `scenes`).

    One-object scenes keep their own encoding. A two-object scene is put together from halves: each half is, cell
    by cell, the most common code among the encodings of the given scenes with the same object in the same slot.
    The VQGAN's codes are nearly local but not quite (a code can flip between two close codebook rows depending on
    the far half), and those flips are noise that ties a half's codes to the other object; with composed targets
    every half is one fixed code pattern, so a new combination of seen objects is drawn from seen parts."""
    masks = half_masks(grid)
    grids = codes.view(-1, grid, grid)
    halves: dict[tuple, list[torch.Tensor]] = {}
    for s, g in zip(scenes, grids):
        if len(s.objects) == 2:
            for k, obj in enumerate(s.objects):
                halves.setdefault((s.layout, k, obj), []).append(g)
    modes = {key: torch.stack(gs).mode(dim=0).values for key, gs in halves.items()}
    own = dict(zip(scenes, grids))
    out = {}
    for s in wanted if wanted is not None else scenes:
        if len(s.objects) == 1:
            out[s] = own[s].flatten().tolist()
            continue
        target = torch.zeros(grid, grid, dtype=torch.long)
        for k, obj in enumerate(s.objects):
            m = masks[(s.layout, k)]
            target[m] = modes[(s.layout, k, obj)][m]
        out[s] = target.flatten().tolist()
    return out


def decoded_accuracy(vq: VQGAN, targets: dict[Scene, list[int]]) -> float:
    """Share of scenes whose code grid the VQGAN decodes into a picture the checker reads right."""
    h, w = vq.grid(IMAGE_SIZE, IMAGE_SIZE)
    pictures = ImageProcessor(IMAGE_SIZE).postprocess(vq.decode(torch.tensor(list(targets.values())), h, w))
    return sum(scene_matches(s, p) for s, p in zip(targets, pictures)) / len(targets)


def reconstruction_accuracy(vq: VQGAN, scenes: list[Scene]) -> tuple[float, torch.Tensor]:
    """Share of scenes whose decoded reconstruction the picture checker reads exactly right, and their codes."""
    processor = ImageProcessor(IMAGE_SIZE)
    codes = vq.encode(pixels_of(scenes))
    h, w = vq.grid(IMAGE_SIZE, IMAGE_SIZE)
    pictures = processor.postprocess(vq.decode(codes, h, w))
    right = sum(scene_matches(s, p) for s, p in zip(scenes, pictures))
    return right / len(scenes), codes


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
    from ..formats.gguf import companion_path, write_gguf, write_vqgan_gguf

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    tensors = {name: (t, "F32") for name, t in internal_to_gguf(config, state).items()}
    path = write_gguf(directory / MODEL_FILE, config, tensors, tokenizer=tok, progress=False)
    write_vqgan_gguf(companion_path(path), vq.config.to_dict(), vqgan_state_dict(vq))
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
        from ..formats.gguf import write_gguf, write_vqgan_gguf  # noqa: F401
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

