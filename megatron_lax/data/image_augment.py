"""Per-image augmentation on uint8 PIL images, run in the loader workers: random-resized crop (decoding
JPEGs at a reduced scale where that loses no resolution), horizontal flip, AutoAugment's ImageNet
policy or RandAugment, and evaluation's resize + centre crop. Every random choice is drawn from the
numpy Generator passed in, so a sample's augmentation depends on its seed only.

The operations and magnitude ranges are those of the AutoAugment paper (Cubuk et al., 2019, its
ImageNet policy and appendix) and, for RandAugment, of the "increasing" variants DeiT trains with (timm's
`rand-m9-mstd0.5-inc1`): a magnitude m on a 0-10 scale sets the strength, and geometric and colour
operations pick their direction at random. Geometric operations fill with the mean colour (what
normalisation turns into 0) and resample bilinearly.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps, JpegImagePlugin

MAX_LEVEL = 10.0


# --- the operations: (image, magnitude in [0, 10], rng, fill) -> image -----------------------------

def _signed(value: float, rng: np.random.Generator) -> float:
    return value if rng.random() < 0.5 else -value


def _affine(image: Image.Image, matrix, fill) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR,
                           fillcolor=fill)


def rotate(image, m, rng, fill):
    return image.rotate(_signed(30.0 * m / MAX_LEVEL, rng), resample=Image.Resampling.BILINEAR, fillcolor=fill)


def shear_x(image, m, rng, fill):
    return _affine(image, (1, _signed(0.3 * m / MAX_LEVEL, rng), 0, 0, 1, 0), fill)


def shear_y(image, m, rng, fill):
    return _affine(image, (1, 0, 0, _signed(0.3 * m / MAX_LEVEL, rng), 1, 0), fill)


def translate_x(image, m, rng, fill):
    return _affine(image, (1, 0, _signed(0.45 * m / MAX_LEVEL, rng) * image.size[0], 0, 1, 0), fill)


def translate_y(image, m, rng, fill):
    return _affine(image, (1, 0, 0, 0, 1, _signed(0.45 * m / MAX_LEVEL, rng) * image.size[1]), fill)


def auto_contrast(image, m, rng, fill):
    return ImageOps.autocontrast(image)


def equalize(image, m, rng, fill):
    return ImageOps.equalize(image)


def invert(image, m, rng, fill):
    return ImageOps.invert(image)


def posterize(image, m, rng, fill):
    """Keeps 4 (m = 0) to 8 bits (m = 10), the AutoAugment paper's range."""
    return ImageOps.posterize(image, 4 + int(4 * m / MAX_LEVEL))


def posterize_increasing(image, m, rng, fill):
    """Keeps 4 (m = 0) down to 1 bit (m >= 7.5; Pillow keeps at least one)."""
    return ImageOps.posterize(image, max(4 - int(4 * m / MAX_LEVEL), 1))


def solarize(image, m, rng, fill):
    """Inverts pixels at or above a threshold of 0 (m = 0) to 256 (m = 10, nothing inverted)."""
    return ImageOps.solarize(image, int(256 * m / MAX_LEVEL))


def solarize_increasing(image, m, rng, fill):
    return ImageOps.solarize(image, 256 - int(256 * m / MAX_LEVEL))


def solarize_add(image, m, rng, fill):
    """Adds up to 110 to the pixels below 128."""
    add = int(110 * m / MAX_LEVEL)
    table = [min(255, v + add) if v < 128 else v for v in range(256)]
    return image.point(table * len(image.getbands()))


def _enhance(kind):
    def original(image, m, rng, fill):  # factor 0.1 (m = 0) to 1.9 (m = 10)
        return kind(image).enhance(0.1 + 1.8 * m / MAX_LEVEL)

    def increasing(image, m, rng, fill):  # factor 1 -/+ 0.9 m / 10
        return kind(image).enhance(1.0 + _signed(0.9 * m / MAX_LEVEL, rng))
    return original, increasing


color, color_increasing = _enhance(ImageEnhance.Color)
contrast, contrast_increasing = _enhance(ImageEnhance.Contrast)
brightness, brightness_increasing = _enhance(ImageEnhance.Brightness)
sharpness, sharpness_increasing = _enhance(ImageEnhance.Sharpness)

AUTO_AUGMENT_OPS = {
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert, "Rotate": rotate, "Posterize": posterize,
    "Solarize": solarize, "Color": color, "Contrast": contrast, "Brightness": brightness, "Sharpness": sharpness,
    "ShearX": shear_x, "ShearY": shear_y, "TranslateX": translate_x, "TranslateY": translate_y,
}

# The AutoAugment paper's ImageNet policy: 25 sub-policies of two (operation, probability, magnitude).
IMAGENET_POLICY = [
    [("Posterize", 0.4, 8), ("Rotate", 0.6, 9)], [("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)],
    [("Equalize", 0.8, 8), ("Equalize", 0.6, 3)], [("Posterize", 0.6, 7), ("Posterize", 0.6, 6)],
    [("Equalize", 0.4, 7), ("Solarize", 0.2, 4)], [("Equalize", 0.4, 4), ("Rotate", 0.8, 8)],
    [("Solarize", 0.6, 3), ("Equalize", 0.6, 7)], [("Posterize", 0.8, 5), ("Equalize", 1.0, 2)],
    [("Rotate", 0.2, 3), ("Solarize", 0.6, 8)], [("Equalize", 0.6, 8), ("Posterize", 0.4, 6)],
    [("Rotate", 0.8, 8), ("Color", 0.4, 0)], [("Rotate", 0.4, 9), ("Equalize", 0.6, 2)],
    [("Equalize", 0.0, 7), ("Equalize", 0.8, 8)], [("Invert", 0.6, 4), ("Equalize", 1.0, 8)],
    [("Color", 0.6, 4), ("Contrast", 1.0, 8)], [("Rotate", 0.8, 8), ("Color", 1.0, 2)],
    [("Color", 0.8, 8), ("Solarize", 0.8, 7)], [("Sharpness", 0.4, 7), ("Invert", 0.6, 8)],
    [("ShearX", 0.6, 5), ("Equalize", 1.0, 9)], [("Color", 0.4, 0), ("Equalize", 0.6, 3)],
    [("Equalize", 0.4, 7), ("Solarize", 0.2, 4)], [("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)],
    [("Invert", 0.6, 4), ("Equalize", 1.0, 8)], [("Color", 0.6, 4), ("Contrast", 1.0, 8)],
    [("Equalize", 0.8, 8), ("Equalize", 0.6, 3)],
]

# RandAugment's 15 operations, DeiT's increasing-severity variants.
RAND_AUGMENT_OPS = [auto_contrast, equalize, invert, rotate, posterize_increasing, solarize_increasing, solarize_add,
                    color_increasing, contrast_increasing, brightness_increasing, sharpness_increasing, shear_x,
                    shear_y, translate_x, translate_y]


def auto_augment(image: Image.Image, rng: np.random.Generator, fill) -> Image.Image:
    """One sub-policy of the ImageNet policy, chosen uniformly; each operation runs with its probability."""
    for name, probability, magnitude in IMAGENET_POLICY[rng.integers(len(IMAGENET_POLICY))]:
        if rng.random() < probability:
            image = AUTO_AUGMENT_OPS[name](image, magnitude, rng, fill)
    return image


def rand_augment(image: Image.Image, rng: np.random.Generator, fill, n: int, m: float,
                 m_std: float = 0.5, p: float = 0.5) -> Image.Image:
    """n operations drawn with replacement, each run with probability p at a magnitude drawn from
    N(m, m_std^2) clipped to [0, 10]."""
    for op in rng.integers(len(RAND_AUGMENT_OPS), size=n):
        if rng.random() < p:
            level = float(np.clip(rng.normal(m, m_std), 0.0, MAX_LEVEL)) if m_std > 0 else m
            image = RAND_AUGMENT_OPS[op](image, level, rng, fill)
    return image


# --- crops ------------------------------------------------------------------------------------------

def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: np.random.Generator, attempts: int = 10) -> tuple[int, int, int, int]:
    """(left, top, w, h): a box of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio) that
    fits in the image (the first of `attempts` draws that does), else the centre box at the nearest
    aspect ratio in range."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(width - w + 1)), int(rng.integers(height - h + 1)), w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, size: int, crop_pct: float) -> tuple[float, float, float, float]:
    """(left, top, w, h) in the image of the centre size x size crop after resizing the short side to
    floor(size / crop_pct): the evaluation view, as one box to resample."""
    short = math.floor(size / crop_pct)
    if width <= height:
        resized_w, resized_h = short, int(short * height / width)
    else:
        resized_w, resized_h = int(short * width / height), short
    sx, sy = resized_w / width, resized_h / height
    left, top = round((resized_w - size) / 2), round((resized_h - size) / 2)
    return left / sx, top / sy, size / sx, size / sy


def decode(image: Image.Image, box: tuple[float, float, float, float], size: int, mode: str,
           draft: bool = True) -> tuple[Image.Image, tuple]:
    """Decodes a lazily opened image in `mode` (RGB or L). With `draft`, a JPEG is decoded at 1/2, 1/4
    or 1/8 scale when the box still covers at least size x size pixels there (the crop then loses no
    resolution, and decoding costs a fraction). Returns the image and the box in its coordinates."""
    left, top, w, h = box
    if draft and isinstance(image, JpegImagePlugin.JpegImageFile):
        full = image.size
        image.draft(mode, (math.ceil(full[0] * size / w), math.ceil(full[1] * size / h)))
        reduction = 2 ** round(math.log2(full[0] / image.size[0]))  # the decoder's 1, 2, 4 or 8
        left, top, w, h = left / reduction, top / reduction, w / reduction, h / reduction
    return image.convert(mode), (left, top, w, h)


def resize_box(image: Image.Image, box: tuple[float, float, float, float], size: int) -> Image.Image:
    """The box resampled to size x size, bicubic (antialiased when shrinking)."""
    left, top, w, h = box
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
