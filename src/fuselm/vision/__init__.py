"""Images <-> codebook indices: VQGAN, pixel processor, image-token vocab, and the ImageTokenizer tying them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from fuselm.errors import FuselmError
from fuselm.vision.processor import DEFAULT_MAX_PIXELS, ImageProcessor, open_image
from fuselm.vision.vocab import ImageVocab, image_token_name, parse_image_token_name
from fuselm.vision.vqgan import (
    VQGAN,
    VQGANConfig,
    load_meta_vqgan,
    vqgan_from_hf_state_dict,
    vqgan_from_state_dict,
    vqgan_state_dict,
)


class ImageTokenizer:
    """PIL images or pixel tensors <-> LongTensor[B, h*w] codebook indices, at one square size."""

    def __init__(self, vqgan: VQGAN, size: int | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.vqgan = vqgan
        self.size = vqgan.config.resolution if size is None else size
        self.grid = vqgan.grid(self.size, self.size)
        self.processor = ImageProcessor(self.size, max_pixels=max_pixels)

    @property
    def can_decode(self) -> bool:
        return self.vqgan.has_decoder

    def encode(self, images: Image.Image | Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """PIL images, or float[B, 3, size, size] in [-1, 1] -> LongTensor[B, h*w]."""
        return self.vqgan.encode(self.processor.preprocess(images))

    def decode(self, codes: torch.Tensor) -> list[Image.Image]:
        """LongTensor[B, h*w] -> RGB PIL images of size x size."""
        h, w = self.grid
        if codes.ndim != 2 or codes.shape[1] != h * w:
            raise FuselmError(f"ImageTokenizer.decode: expected codes [B, {h * w}] for a {h}x{w} grid, "
                              f"got {list(codes.shape)}")
        return self.processor.postprocess(self.vqgan.decode(codes, h, w))


__all__ = [
    "VQGAN",
    "VQGANConfig",
    "ImageProcessor",
    "ImageTokenizer",
    "ImageVocab",
    "image_token_name",
    "load_meta_vqgan",
    "open_image",
    "parse_image_token_name",
    "vqgan_from_hf_state_dict",
    "vqgan_from_state_dict",
    "vqgan_state_dict",
]
