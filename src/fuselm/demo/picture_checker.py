"""A non-learned judge of demo-world pictures: reads shapes and colours from pixels with the world's own geometry.

How a picture is read:
1. every pixel is read as white mixed with one ink (a palette colour, or black for dark or grey ink that is
   foreign to the world and never matches); it takes the ink's label when it is at least half ink;
2. for each layout (centre, left-right, top-bottom), each slot is read on its own: the slot's colour is the most
   common palette label inside the slot's box (grown by MARGIN pixels), and its shape and size are the template
   from `fuselm.demo.world.shape_mask` with the highest IoU against that colour's mask in the box, each template
   first moved (by at most MARGIN pixels) so that its centroid meets the mask's;
3. each candidate scene is painted again (objects at their read offsets) and scored by label agreement over the
   pixels that are foreground in either picture; the best layout wins, and a picture whose best score is below
   `MIN_AGREEMENT` reads as None.

Step 3 is what rejects blank pictures, noise, extra blobs and the wrong number of objects.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from fuselm.demo.world import (
    BACKGROUND,
    COLOURS,
    IMAGE_SIZE,
    LAYOUTS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    box,
    shape_mask,
    sizes_at,
)
from fuselm.errors import FuselmError

_LABEL_NAMES = ("background", *COLOURS, "foreign")
_FOREIGN = len(_LABEL_NAMES) - 1
# Ink directions away from the white background: the palette, then black (dark or grey ink is foreign).
_INK = np.array([*COLOURS.values(), (0, 0, 0)], dtype=np.float32) - np.array(BACKGROUND, dtype=np.float32)
MARGIN = 2  # pixels added around a slot's largest box, for drift and blur
MIN_SLOT_PIXELS = 16  # a quarter of the smallest shape's area (small triangle: 72 pixels)
# Ground truth scores 1.0; under a 3x3 blur and N(0, 10) noise >= 0.9, under a 5x5 blur and N(0, 20) >= 0.72;
# the right two objects plus a third stray one score about 0.6, and so are rejected.
MIN_AGREEMENT = 0.7


def _pixels(image: Image.Image) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise FuselmError(f"picture checker: expected a PIL image, got {type(image).__name__}")
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):  # e.g. an upscaled render: box-average back to the world's grid
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


def pixel_labels(image: Image.Image) -> np.ndarray:
    """[32, 32] int labels: 0 background, 1..4 the palette in `COLOURS` order, 5 foreign (dark or grey).

    A blurred edge is a mix of white and one ink, so each pixel is matched to the nearest point on each
    white-to-ink segment (nearest raw RGB would call a pink edge of a red shape yellow). The pixel takes that ink's
    label when it is at least half ink, and is background otherwise."""
    paper = _pixels(image) - np.array(BACKGROUND, dtype=np.float32)
    share = np.clip(paper @ _INK.T / (_INK**2).sum(-1), 0.0, 1.0)  # [32, 32, inks]
    residual = ((paper[:, :, None, :] - share[..., None] * _INK) ** 2).sum(-1)
    ink = residual.argmin(-1)
    return np.where(np.take_along_axis(share, ink[..., None], -1)[..., 0] >= 0.5, ink + 1, 0)


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([ys.mean(), xs.mean()])


def _placed(obj: Obj, offset: tuple[int, int]) -> np.ndarray:
    """The object's mask moved by (dy, dx); offsets stay within MARGIN, so nothing wraps around the edge."""
    return np.roll(shape_mask(obj.shape, obj.position, obj.size), offset, axis=(0, 1))


def _labels_of(placed: list[tuple[Obj, tuple[int, int]]]) -> np.ndarray:
    labels = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.int64)
    for obj, offset in placed:
        labels[_placed(obj, offset)] = _LABEL_NAMES.index(obj.colour)
    return labels


def _slot_region(position: str) -> np.ndarray:
    x0, y0, side = box(position, max(sizes_at(position), key=SIZES.__getitem__))
    region = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    region[max(y0 - MARGIN, 0) : y0 + side + MARGIN, max(x0 - MARGIN, 0) : x0 + side + MARGIN] = True
    return region


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def _read_slot(labels: np.ndarray, position: str) -> tuple[Obj, tuple[int, int]] | None:
    """The slot's object and its offset from the slot's exact place, or None if the slot is (nearly) empty."""
    region = _slot_region(position)
    counts = np.bincount(labels[region], minlength=len(_LABEL_NAMES))[1:_FOREIGN]
    if counts.max() < MIN_SLOT_PIXELS:
        return None
    label = 1 + int(counts.argmax())
    colour = _LABEL_NAMES[label]
    mask = (labels == label) & region
    best, best_iou = None, -1.0
    for size in sizes_at(position):
        for shape in SHAPES:
            obj = Obj(shape, colour, position, size)
            # Align the template's centroid with the mask's, so a drawn shape a pixel or two off still reads.
            drift = _centroid(mask) - _centroid(shape_mask(shape, position, size))
            offset = tuple(int(v) for v in np.clip(np.round(drift), -MARGIN, MARGIN))
            iou = _iou(mask, _placed(obj, offset))
            if iou > best_iou:
                best, best_iou = (obj, offset), iou
    return best


def _agreement(labels: np.ndarray, placed: list[tuple[Obj, tuple[int, int]]]) -> float:
    """Fraction of pixels, among those foreground in `labels` or in the placed objects, whose labels agree."""
    expected = _labels_of(placed)
    foreground = (labels != 0) | (expected != 0)
    return float(((labels == expected) & foreground).sum()) / max(float(foreground.sum()), 1.0)


def best_reading(image: Image.Image, layout_hint: str | None = None) -> tuple[Scene | None, float]:
    """The scene that best explains the picture and its agreement score in [0, 1], before any threshold.

    `layout_hint` ("centre", "left-right" or "top-bottom") restricts the reading to that layout. The scene is None
    only when no layout has every slot inked."""
    if layout_hint is not None and layout_hint not in LAYOUTS:
        raise FuselmError(f"picture checker: layout_hint={layout_hint!r}, expected None or one of {tuple(LAYOUTS)}")
    labels = pixel_labels(image)
    best, best_score = None, 0.0
    for layout in [layout_hint] if layout_hint else LAYOUTS:
        placed = [_read_slot(labels, position) for position in LAYOUTS[layout]]
        if any(p is None for p in placed):
            continue
        score = _agreement(labels, placed)
        if best is None or score > best_score:
            best, best_score = Scene(tuple(obj for obj, _ in placed)), score
    return best, best_score


def read_scene(image: Image.Image, layout_hint: str | None = None) -> Scene | None:
    """The scene the picture shows, or None if no scene of the world explains at least `MIN_AGREEMENT` of it."""
    scene, score = best_reading(image, layout_hint)
    return scene if score >= MIN_AGREEMENT else None


def scene_matches(expected: Scene, image: Image.Image) -> bool:
    """True when the picture, read with no hint, is exactly `expected`: every object's shape, colour and position,
    and the size of a single centred object. Every caption of the world states all of these (two-object scenes
    are always small and their caption says where each object is), so exact equality is what the caption asks."""
    return read_scene(image) == expected
