"""The demo world (determinism, geometry, captions, split) and its non-learned picture checker.

References: the scenes' own parameters (ground truth for the checker), closed-form areas and centroids for the
drawing, and the world's description (3 shapes, 4 colours, 2 sizes, 3 layouts) for the scene count."""

import numpy as np
import pytest
from PIL import Image

from fuselm.demo.picture_checker import best_reading, read_scene, scene_matches
from fuselm.demo.world import (
    BACKGROUND,
    COLOURS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    all_scenes,
    box,
    caption,
    parse_caption,
    render,
    sample_scenes,
    split_of,
)
from fuselm.errors import FuselmError

SCENES = all_scenes()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


def degrade(image: Image.Image, seed: int) -> Image.Image:
    """3x3 box blur (edges replicated) plus N(0, 10/255) noise, as a small VQGAN's output might look."""
    a = np.pad(np.asarray(image, dtype=np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(a[i : i + 32, j : j + 32] for i in range(3) for j in range(3)) / 9
    noisy = blurred + np.random.default_rng(seed).normal(0.0, 10.0, blurred.shape)
    return Image.fromarray(np.clip(noisy.round(), 0, 255).astype(np.uint8))


def test_sampling_and_drawing_are_deterministic():
    a, b = sample_scenes(40, seed=3), sample_scenes(40, seed=3)
    assert [caption(s) for s in a] == [caption(s) for s in b]
    assert all(np.array_equal(pixels(render(x)), pixels(render(y))) for x, y in zip(a, b))
    other = sample_scenes(40, seed=4)
    assert [caption(s) for s in a] != [caption(s) for s in other]
    assert not np.array_equal(np.stack([pixels(render(s)) for s in a]), np.stack([pixels(render(s)) for s in other]))
    # Every scene draws a different picture.
    assert len({render(s).tobytes() for s in SCENES}) == len(SCENES)


def test_scene_count_and_split():
    objects = len(SHAPES) * len(COLOURS)
    assert len(SCENES) == objects * len(SIZES) + 2 * objects**2 == 312
    train, heldout = all_scenes("train"), all_scenes("heldout")
    assert set(train).isdisjoint(heldout) and len(train) + len(heldout) == len(SCENES)
    assert 0.1 < len(heldout) / len(SCENES) < 0.25
    assert all(split_of(s) == "heldout" for s in sample_scenes(100, seed=0, split="heldout"))
    assert all(split_of(s) == "train" for s in sample_scenes(100, seed=0, split="train"))
    # Held-out scenes are new combinations of objects that training shows in the same slot.
    seen = {o for s in train for o in s.objects}
    assert all(o in seen for s in heldout for o in s.objects)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", list(SIZES))
def test_drawing_matches_closed_form_geometry(shape, size):
    scene = Scene((Obj(shape, "blue", "centre", size),))
    a = pixels(render(scene))
    ink = (a != BACKGROUND).any(-1)
    assert {tuple(p) for p in a[ink]} == {COLOURS["blue"]}  # exact colours: no anti-aliasing
    x0, y0, side = box("centre", size)
    area = {"square": side**2, "circle": np.pi * side**2 / 4, "triangle": side**2 / 2}[shape]
    assert abs(ink.sum() - area) <= 0.1 * area
    ys, xs = np.nonzero(ink)
    centroid_y = {"triangle": y0 + 2 * side / 3}.get(shape, y0 + side / 2)  # a triangle's centroid is 2/3 down
    assert abs(xs.mean() + 0.5 - (x0 + side / 2)) < 0.1 and abs(ys.mean() + 0.5 - centroid_y) < 0.5
    assert xs.min() >= x0 and xs.max() < x0 + side and ys.min() >= y0 and ys.max() < y0 + side


def test_two_objects_sit_in_their_halves():
    scene = parse_caption("a red circle on the left and a yellow triangle on the right")
    a = pixels(render(scene))
    assert {tuple(p) for p in a[:, :16].reshape(-1, 3)} == {BACKGROUND, COLOURS["red"]}
    assert {tuple(p) for p in a[:, 16:].reshape(-1, 3)} == {BACKGROUND, COLOURS["yellow"]}


def test_caption_round_trip_over_all_scenes():
    captions = [caption(s) for s in SCENES]
    assert len(set(captions)) == len(SCENES)
    assert all(parse_caption(c) == s for c, s in zip(captions, SCENES))
    assert parse_caption("  A large  GREEN\ttriangle.\n") == Scene((Obj("triangle", "green", "centre", "large"),))
    swapped = parse_caption("a blue square on the right and a red circle on the left")
    assert caption(swapped) == "a red circle on the left and a blue square on the right"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a purple circle",
        "a red circle",  # a centred object states its size
        "a large red circle on the left",
        "a red circle on the left and a blue square on the left",
        "a red circle on the left and a blue square at the bottom",
        "a red circle on the left and a blue square on the right and a green circle at the top",
    ],
)
def test_parse_caption_rejects_what_the_world_cannot_draw(text):
    assert parse_caption(text) is None


def test_checker_reads_ground_truth():
    right = sum(scene_matches(s, render(s)) for s in SCENES)
    assert right / len(SCENES) >= 0.99
    big = render(SCENES[100]).resize((128, 128), Image.Resampling.NEAREST)  # another size is boxed back to 32
    assert read_scene(big) == SCENES[100]


def test_checker_reads_blurred_noisy_pictures():
    right = sum(scene_matches(s, degrade(render(s), seed=i)) for i, s in enumerate(SCENES))
    assert right / len(SCENES) >= 0.9


def test_checker_rejects_wrong_pictures():
    expected = parse_caption("a red circle on the left and a blue square on the right")
    a = pixels(render(expected)).astype(np.uint8)
    assert read_scene(Image.new("RGB", (32, 32), BACKGROUND)) is None
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert read_scene(Image.fromarray(noise)) is None

    recoloured = a.copy()
    recoloured[(a == COLOURS["red"]).all(-1)] = COLOURS["green"]
    assert not scene_matches(expected, Image.fromarray(recoloured))
    assert read_scene(Image.fromarray(recoloured)) == parse_caption(
        "a green circle on the left and a blue square on the right"
    )

    grey = a.copy()
    grey[(a != BACKGROUND).any(-1)] = (128, 128, 128)
    assert read_scene(Image.fromarray(grey)) is None

    stray = a.copy()  # the right two objects plus a third one
    stray[2:14, 10:22] = COLOURS["yellow"]
    assert read_scene(Image.fromarray(stray)) is None

    one_missing = a.copy()
    one_missing[:, 16:] = BACKGROUND
    assert not scene_matches(expected, Image.fromarray(one_missing))
    assert best_reading(Image.fromarray(a), layout_hint="top-bottom")[1] < best_reading(Image.fromarray(a))[1]


def test_bad_arguments_raise_one_clear_error():
    with pytest.raises(FuselmError, match="shape"):
        Obj("hexagon", "red", "centre", "small")
    with pytest.raises(FuselmError, match="size"):
        Obj("circle", "red", "left", "large")
    with pytest.raises(FuselmError, match="positions"):
        Scene((Obj("circle", "red", "right", "small"), Obj("circle", "red", "left", "small")))
    with pytest.raises(FuselmError, match="split"):
        sample_scenes(3, seed=0, split="test")
    with pytest.raises(FuselmError, match="layout_hint"):
        read_scene(render(SCENES[0]), layout_hint="diagonal")
    with pytest.raises(FuselmError, match="PIL image"):
        read_scene(np.zeros((32, 32, 3)))
