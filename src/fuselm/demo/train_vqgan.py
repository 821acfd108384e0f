"""The demo's image tokenizer: train a small Chameleon VQGAN on the picture world, and derive from its codes the
code grids the decoder is taught to draw (see fuselm.demo.train for the whole run)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..vision import VQGAN, VQGANConfig
from ..vision.processor import ImageProcessor
from ..vision.vqgan import nearest_code
from .picture_checker import scene_matches
from .recipe import Recipe, TrainingLog, pixels_of
from .world import IMAGE_SIZE, Scene


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
