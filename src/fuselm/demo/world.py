"""The demo's procedural picture world: one or two flat shapes on white, their captions, and a fixed split.

Shapes are drawn from pixel-centre geometry with no anti-aliasing, so palette colours appear verbatim and the
non-learned checker (`fuselm.demo.picture_checker`) can reuse the exact same masks.

Scene space (312 scenes):
- one object at the centre: 3 shapes x 4 colours x 2 sizes = 24;
- two small objects, left/right or top/bottom: 2 layouts x 12 x 12 = 288.
The held-out split is a fixed sixth of the two-object scenes (by a CRC of the caption), so every object in every
slot is still seen in training: held-out scenes are new combinations, not new objects.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

from fuselm.errors import FuselmError

IMAGE_SIZE = 32
BACKGROUND = (255, 255, 255)
# Far apart in RGB (pairwise distance >= 170) so that blur and VQGAN colour drift keep the nearest colour right.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 12, "large": 24}  # side of the shape's bounding box, in pixels
# Centre (x, y) of each position's bounding box; multiples of 4 so boxes sit on an 8x8 VQGAN code grid.
POSITIONS = {"centre": (16, 16), "left": (8, 16), "right": (24, 16), "top": (16, 8), "bottom": (16, 24)}
# A layout is the ordered positions of a scene's objects.
LAYOUTS = {"centre": ("centre",), "left-right": ("left", "right"), "top-bottom": ("top", "bottom")}
SPLITS = ("train", "heldout", "all")
_HELDOUT_MODULUS = 6
_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


def sizes_at(position: str) -> tuple[str, ...]:
    """Sizes allowed at a position: two-object slots are half the picture wide, so only small fits."""
    return tuple(SIZES) if position == "centre" else ("small",)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    position: str
    size: str

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(COLOURS)),
            ("position", self.position, tuple(POSITIONS)),
            ("size", self.size, sizes_at(self.position) if self.position in POSITIONS else tuple(SIZES)),
        ):
            if value not in allowed:
                raise FuselmError(f"world object: {field}={value!r}, expected one of {allowed}")


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        positions = tuple(o.position for o in self.objects)
        if positions not in LAYOUTS.values():
            raise FuselmError(f"world scene: object positions {positions}, expected one of {tuple(LAYOUTS.values())}")

    @property
    def layout(self) -> str:
        positions = tuple(o.position for o in self.objects)
        return next(name for name, slots in LAYOUTS.items() if slots == positions)


def box(position: str, size: str) -> tuple[int, int, int]:
    """(x0, y0, side) of the bounding box of a shape of `size` at `position`."""
    side = SIZES[size]
    cx, cy = POSITIONS[position]
    return cx - side // 2, cy - side // 2, side


@cache
def shape_mask(shape: str, position: str, size: str) -> np.ndarray:
    """Boolean [32, 32] mask of the pixels a shape covers, decided at pixel centres (no anti-aliasing)."""
    x0, y0, side = box(position, size)
    cx, cy = x0 + side / 2, y0 + side / 2
    px = np.arange(IMAGE_SIZE)[None, :] + 0.5
    py = np.arange(IMAGE_SIZE)[:, None] + 0.5
    inside_box = (px >= x0) & (px < x0 + side) & (py >= y0) & (py < y0 + side)
    if shape == "square":
        mask = inside_box
    elif shape == "circle":
        mask = (px - cx) ** 2 + (py - cy) ** 2 <= (side / 2) ** 2
    elif shape == "triangle":  # apex up at the top middle, base along the bottom edge
        mask = inside_box & (np.abs(px - cx) <= (py - y0) / 2)
    else:
        raise FuselmError(f"world shape {shape!r}, expected one of {SHAPES}")
    mask = np.broadcast_to(mask, (IMAGE_SIZE, IMAGE_SIZE)).copy()
    mask.flags.writeable = False
    return mask


def render(scene: Scene) -> Image.Image:
    """The scene as a 32x32 RGB picture: exact palette colours on a white background."""
    pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    for obj in scene.objects:
        pixels[shape_mask(obj.shape, obj.position, obj.size)] = COLOURS[obj.colour]
    return Image.fromarray(pixels, "RGB")


STORY_REQUEST = "draw two pictures"  # the user turn that opens an interleaved document (two captioned pictures)


def caption(scene: Scene) -> str:
    """'a large green triangle' (one object) or 'a red circle on the left and a blue square on the right'."""
    if scene.layout == "centre":
        (obj,) = scene.objects
        return f"a {obj.size} {obj.colour} {obj.shape}"
    return " and ".join(f"a {o.colour} {o.shape} {_PHRASES[o.position]}" for o in scene.objects)


def _alternatives(words) -> str:
    return "(" + "|".join(re.escape(w) for w in words) + ")"


_SINGLE = re.compile(f"a {_alternatives(SIZES)} {_alternatives(COLOURS)} {_alternatives(SHAPES)}")
_OBJECT = f"a {_alternatives(COLOURS)} {_alternatives(SHAPES)} {_alternatives(_PHRASES.values())}"
_DOUBLE = re.compile(f"{_OBJECT} and {_OBJECT}")
_POSITION_OF_PHRASE = {phrase: position for position, phrase in _PHRASES.items()}


def parse_caption(text: str) -> Scene | None:
    """Inverse of `caption`, or None if `text` is not a caption of this world.

    Case, runs of whitespace and a trailing full stop are ignored; two objects may come in either order."""
    text = " ".join(text.lower().split()).removesuffix(".").rstrip()
    if m := _SINGLE.fullmatch(text):
        size, colour, shape = m.groups()
        return Scene((Obj(shape, colour, "centre", size),))
    if m := _DOUBLE.fullmatch(text):
        g = m.groups()
        objs = [Obj(shape, colour, _POSITION_OF_PHRASE[phrase], "small") for colour, shape, phrase in (g[:3], g[3:])]
        for slots in LAYOUTS.values():
            if len(slots) == 2 and {o.position for o in objs} == set(slots):
                return Scene(tuple(sorted(objs, key=lambda o: slots.index(o.position))))
    return None


def split_of(scene: Scene) -> str:
    """'train' or 'heldout'. One-object scenes are always train (a size or shape never seen at the centre
    would test extrapolation, not composition)."""
    if scene.layout == "centre":
        return "train"
    return "heldout" if zlib.crc32(caption(scene).encode()) % _HELDOUT_MODULUS == 0 else "train"


@cache
def _scenes(split: str) -> tuple[Scene, ...]:
    objects = {pos: [Obj(s, c, pos, z) for s in SHAPES for c in COLOURS for z in sizes_at(pos)] for pos in POSITIONS}
    everything = [Scene((o,)) for o in objects["centre"]]
    for slots in LAYOUTS.values():
        if len(slots) == 2:
            everything += [Scene((a, b)) for a in objects[slots[0]] for b in objects[slots[1]]]
    return tuple(s for s in everything if split == "all" or split_of(s) == split)


def all_scenes(split: str = "all") -> list[Scene]:
    """Every scene of the world (or of one split), in a fixed order."""
    if split not in SPLITS:
        raise FuselmError(f"world split {split!r}, expected one of {SPLITS}")
    return list(_scenes(split))


def sample_scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """`n` scenes drawn uniformly with replacement from a split; the same (n, seed, split) gives the same list."""
    if n < 0 or seed < 0:
        raise FuselmError(f"sample_scenes: n={n} and seed={seed}, expected both >= 0")
    pool = all_scenes(split)
    picks = np.random.default_rng(seed).integers(len(pool), size=n)
    return [pool[i] for i in picks]
