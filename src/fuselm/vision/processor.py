"""Pictures <-> VQGAN pixel tensors, as Chameleon prepares them.

preprocess: alpha composited on white -> shortest side resized to `size` (LANCZOS) -> centre crop -> x/255*2-1.

Where the two references differ, and what we do:
- Long side after the resize: HF floors `int(size*long/short)`, Meta rounds. We floor (HF), so a 1-pixel
  different intermediate size (and hence a slightly different crop) is possible versus Meta.
- Value scale: HF computes `x*0.0078 - 1` (white -> 0.989); Meta computes `x/255*2 - 1` (white -> 1.0).
  We follow Meta; versus HF the difference is `x*(2/255 - 0.0078)`, at most 0.011 (at x = 255).
- Alpha: HF uses PIL's integer `alpha_composite` over white; Meta blends in float and truncates to uint8.
  We use PIL's (HF); the two differ by at most 1/255 on partly transparent pixels.
postprocess: clamp to [-1, 1], (x+1)*127.5 rounded to uint8 (Meta truncates; rounding makes
preprocess -> postprocess an exact round trip).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fuselm.errors import FuselmError

# Largest picture we decode: a decompression-bomb guard (PIL's own warning threshold is ~89 MP).
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if width <= 0 or height <= 0:
        raise FuselmError(f"{what}: empty image ({width}x{height})")
    if width * height > max_pixels:
        raise FuselmError(f"{what}: {width}x{height} = {width * height} pixels exceeds the limit of "
                          f"{max_pixels} (possible decompression bomb)")


def open_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file; corrupt, truncated or oversized files raise one FuselmError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(img.width, img.height, max_pixels, str(path))  # header only, before decoding
                img.load()
                return img
    except FuselmError:
        raise
    except FileNotFoundError:
        raise FuselmError(f"{path}: image file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise FuselmError(f"{path}: refused as a possible decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise FuselmError(f"{path}: not a readable image (unknown format or corrupt header)") from None
    except (OSError, SyntaxError, ValueError) as e:
        # PIL raises OSError for truncated data, SyntaxError/ValueError for some malformed headers.
        raise FuselmError(f"{path}: corrupt or truncated image: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; anything with an alpha band or transparency key is composited onto white."""
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_and_crop(img: Image.Image, size: int) -> Image.Image:
    """Shortest side -> size (long side floored, as HF) with LANCZOS, then a centre crop to size x size."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageProcessor:
    """PIL images (or ready pixel tensors) -> float[B, 3, size, size] in [-1, 1], and back."""

    def __init__(self, size: int = 512, *, max_pixels: int = DEFAULT_MAX_PIXELS):
        if not isinstance(size, int) or size <= 0:
            raise FuselmError(f"ImageProcessor: size must be a positive int, got {size!r}")
        self.size = size
        self.max_pixels = max_pixels

    def preprocess(self, images: Image.Image | Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return self._check_tensor(images)
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (str, Path)):
            raise FuselmError(f"ImageProcessor.preprocess: got a path ({images}); open it with open_image() first")
        if not isinstance(images, Sequence) or not images:
            raise FuselmError("ImageProcessor.preprocess: expected a non-empty list of PIL images or a float "
                              f"tensor [B, 3, {self.size}, {self.size}], got {type(images).__name__}")
        arrays = []
        for i, img in enumerate(images):
            if not isinstance(img, Image.Image):
                raise FuselmError(f"ImageProcessor.preprocess: item {i} is {type(img).__name__}, "
                                  "expected a PIL image")
            _check_pixels(img.width, img.height, self.max_pixels, f"image {i}")
            arrays.append(np.asarray(resize_and_crop(to_rgb(img), self.size), dtype=np.uint8))
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        # float64 then float32, so the values equal Meta's numpy `x/255.0*2-1` bit for bit.
        return (batch.double() / 255.0 * 2 - 1).float()

    def _check_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (self.size, self.size) or not x.is_floating_point():
            raise FuselmError(f"ImageProcessor.preprocess: expected a float tensor [B, 3, {self.size}, "
                              f"{self.size}] in [-1, 1], got {x.dtype} {list(x.shape)}")
        if x.numel() and not (bool(torch.isfinite(x).all()) and float(x.abs().max()) <= 1.0 + 1e-3):
            raise FuselmError("ImageProcessor.preprocess: pixel tensor values must be finite and within [-1, 1]")
        return x

    def postprocess(self, pixels: torch.Tensor) -> list[Image.Image]:
        """float[B, 3, H, W] (clamped to [-1, 1]) -> RGB PIL images."""
        if pixels.ndim != 4 or pixels.shape[1] != 3 or not pixels.is_floating_point():
            raise FuselmError(f"ImageProcessor.postprocess: expected float pixels [B, 3, H, W], "
                              f"got {pixels.dtype} {list(pixels.shape)}")
        u8 = ((pixels.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        hwc = u8.permute(0, 2, 3, 1).contiguous().numpy()
        return [Image.fromarray(a) for a in hwc]
