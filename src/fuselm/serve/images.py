"""Pictures over HTTP: data URLs in, base64 PNG out. The server never fetches a URL."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image

from .errors import ApiError

MAX_PIXELS = 4096 * 4096  # a decompression bomb is refused before it is decoded
DATA_URL_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp")


def image_from_data_url(url: str, field: str) -> Image.Image:
    """An RGB picture from `data:image/...;base64,...`; one clear 400 naming `field` otherwise."""
    if not url.startswith("data:"):
        raise ApiError(400, f"{field}: only data URLs (data:image/png;base64,...) are accepted; the server does not "
                            "fetch URLs", param=field)
    header, sep, payload = url.partition(",")
    mime = header[5:].split(";")[0]
    if not sep or not header.endswith(";base64") or mime not in DATA_URL_TYPES:
        raise ApiError(400, f"{field}: expected data:<{'|'.join(DATA_URL_TYPES)}>;base64,<data>, got "
                            f"{header[:40]!r}", param=field)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{field}: the base64 data is malformed", param=field) from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ApiError(400, f"{field}: {img.width}x{img.height} is larger than {MAX_PIXELS} pixels",
                               param=field)
            return img.convert("RGB")
    except ApiError:
        raise
    except Exception as err:  # PIL raises many kinds for bad bytes
        raise ApiError(400, f"{field}: not a readable picture ({type(err).__name__})", param=field) from None


def png_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def png_data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + png_base64(image)


def parse_size(size: str, default: tuple[int, int]) -> tuple[int, int]:
    """OpenAI's "WIDTHxHEIGHT" (or "auto") as (height, width) in pixels."""
    if size == "auto":
        return default
    w, sep, h = size.partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1 or len(size) > 11:
        raise ApiError(400, f"size: expected 'WIDTHxHEIGHT' in pixels or 'auto', got {size!r}", param="size")
    return int(h), int(w)
