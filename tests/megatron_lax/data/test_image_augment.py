"""image_augment: the per-image operations on uint8 PIL images, the crops, and JPEG draft decoding."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from megatron_lax.data import image_augment as ia


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour image (gradients plus a few blobs): resampling it at another scale changes little."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rng = np.random.default_rng(seed)
    channels = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.uniform())) for _ in range(3)]
    return Image.fromarray(np.uint8(np.stack(channels, -1) * 100 + 128))


def jpeg(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    buffer.seek(0)
    return Image.open(buffer)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_every_operation_keeps_size_and_mode(mode):
    image = smooth_image(40, 32).convert(mode)
    fill = (124, 116, 104) if mode == "RGB" else 124
    rng = np.random.default_rng(0)
    for op in list(ia.AUTO_AUGMENT_OPS.values()) + ia.RAND_AUGMENT_OPS:
        for magnitude in (0, 5, 10):
            out = op(image, magnitude, rng, fill)
            assert (out.size, out.mode) == (image.size, mode), op.__name__


def test_operations_do_what_their_names_say():
    image = smooth_image(32, 32)
    pixels = np.asarray(image).astype(int)
    rng = np.random.default_rng(0)
    assert np.array_equal(np.asarray(ia.invert(image, 5, rng, 0)), 255 - pixels)
    assert np.array_equal(np.asarray(ia.posterize(image, 0, rng, 0)), pixels & 0xF0)  # 4 bits at magnitude 0
    assert np.array_equal(np.asarray(ia.solarize(image, 10, rng, 0)), pixels)  # threshold 256: nothing inverted
    added = np.asarray(ia.solarize_add(image, 10, rng, 0)).astype(int)
    assert np.array_equal(added, np.where(pixels < 128, np.minimum(pixels + 110, 255), pixels))
    grey = np.asarray(ia.color(image, 0, rng, 0)).astype(int)  # factor 0.1: nearly grey
    assert np.abs(grey - grey.mean(-1, keepdims=True)).mean() < 0.2 * np.abs(pixels - pixels.mean(-1, keepdims=True)).mean()
    assert ia.rotate(image, 0, rng, (0, 0, 0)).tobytes() == image.tobytes()


def test_policies_are_seeded_and_complete():
    assert len(ia.IMAGENET_POLICY) == 25 and all(len(sub) == 2 for sub in ia.IMAGENET_POLICY)
    assert {name for sub in ia.IMAGENET_POLICY for name, _, _ in sub} <= set(ia.AUTO_AUGMENT_OPS)
    image, fill = smooth_image(48, 48), (124, 116, 104)
    for augment in (lambda rng: ia.auto_augment(image, rng, fill), lambda rng: ia.rand_augment(image, rng, fill, 2, 9)):
        same = [augment(np.random.default_rng(5)).tobytes() for _ in range(2)]
        assert same[0] == same[1]
        assert len({augment(np.random.default_rng(s)).tobytes() for s in range(12)}) > 3


def test_random_resized_crop_boxes_fit_and_follow_the_scale():
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(300):
        left, top, w, h = ia.random_resized_crop_box(500, 375, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375 and w > 0 and h > 0
        fractions.append(w * h / (500 * 375))
    assert min(fractions) < 0.15 and max(fractions) > 0.85 and 0.4 < np.mean(fractions) < 0.6
    assert ia.random_resized_crop_box(1000, 10, (0.5, 1.0), (3 / 4, 4 / 3), rng) == (493, 0, 13, 10)  # the fallback


def test_centre_crop_box_equals_resize_then_crop():
    image = smooth_image(300, 200)
    box = ia.center_crop_box(300, 200, 64, 0.875)
    ours = np.asarray(ia.resize_box(image, box, 64)).astype(int)
    resized = image.resize((109, 73), Image.Resampling.BICUBIC)  # short side floor(64 / 0.875) = 73
    reference = np.asarray(resized.crop((22, 4, 86, 68))).astype(int)
    assert np.abs(ours - reference).mean() < 2.0


def test_jpeg_draft_decodes_at_reduced_scale_and_maps_the_box():
    source = smooth_image(640, 480)
    box = (64, 32, 480, 400)  # 480 x 400 -> 64: an 1/4 draft still covers 120 x 100 pixels
    drafted, drafted_box = ia.decode(jpeg(source), box, 64, "RGB")
    full, full_box = ia.decode(jpeg(source), box, 64, "RGB", draft=False)
    assert drafted.size == (160, 120) and full.size == (640, 480) and full_box == box
    assert drafted_box == (16, 8, 120, 100)
    a = np.asarray(ia.resize_box(drafted, drafted_box, 64)).astype(int)
    b = np.asarray(ia.resize_box(full, full_box, 64)).astype(int)
    assert np.abs(a - b).mean() < 3.0
    small, _ = ia.decode(jpeg(source), (0, 0, 100, 100), 64, "RGB")  # 100 -> 64 needs every pixel
    assert small.size == (640, 480)
