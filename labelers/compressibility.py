"""JPEG (in)compressibility, DDPO's weight-free rewards (kvablack/ddpo-pytorch, `rewards.py`).

The reward is the size of the image saved as JPEG at quality 95 with Pillow's defaults, in kB
(bytes / 1000): `incompressibility` is that size, `compressibility` its negation. Both are
higher-is-better; the sign lives in the value. DDPO feeds RGB uint8 arrays, so every image is converted
to RGB first (an alpha channel is dropped, grayscale is replicated to three channels).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from labelers.base import check_inputs
from prefpipe.core.errors import PrefpipeError

QUALITY = 95


def jpeg_kilobytes(image: Image.Image, quality: int = QUALITY) -> float:
    """Size in kB (1000 bytes) of `image` as an RGB JPEG at `quality`."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


class JpegSize:
    """JPEG size of each image in kB, times `sign`; the prompts are ignored.

    Accepts (and ignores) the model scorers' `batch_size`, `device` and `dtype`, so every scorer is
    built the same way; there are no weights.
    """

    name = "incompressibility"
    sign = 1.0
    higher_is_better = True

    def __init__(self, weights: None = None, quality: int = QUALITY, **_ignored) -> None:
        if weights is not None:
            raise PrefpipeError(f"the {self.name} scorer has no weights (got {weights!r})")
        if not 1 <= quality <= 100:
            raise PrefpipeError(f"JPEG quality must be 1-100, got {quality}")
        self.quality = quality
        self.version = f"jpeg-q{quality}-kB"

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """Signed JPEG sizes in kB, float32 array of shape (N,)."""
        check_inputs(images, prompts)
        return np.array([self.sign * jpeg_kilobytes(im, self.quality) for im in images], dtype=np.float32)


class Incompressibility(JpegSize):
    """JPEG size in kB: larger files (more detail, texture, noise) score higher."""

    name = "incompressibility"
    sign = 1.0


class Compressibility(JpegSize):
    """Negated JPEG size in kB: smaller files (flat, simple images) score higher."""

    name = "compressibility"
    sign = -1.0
