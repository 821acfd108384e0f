"""What decides a demo training run (Recipe), what it reports (TrainingLog), and the pixels both models see."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..vision.processor import ImageProcessor
from .world import IMAGE_SIZE, Scene, render


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


def pixels_of(scenes: list[Scene]) -> torch.Tensor:
    """float[B, 3, 32, 32] in [-1, 1], through the same processor the runtime uses."""
    return ImageProcessor(IMAGE_SIZE).preprocess([render(s) for s in scenes])
