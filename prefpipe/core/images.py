"""The one image decoder and verifier: every stage that reads encoded image bytes goes through here.

    decode(data)        -> a fully loaded PIL image, or BadImage naming why (empty, undecodable, zero size,
                           more pixels than MAX_PIXELS)
    decode_rgb(data)    -> the same, converted to RGB (what the trainer and the VAE need)
    to_rgb(image)       -> (RGB image, how it was converted or None): the one mode policy
    size_mismatch(...)  -> why an image's size is not the size its table declares, or None
    ImageChecker        -> ingest's check of bytes it stores: header parse, full decode, or none; shrinking

A bad image is a bad row (counted, logged with its key, skipped), never a crash: callers catch BadImage.

The policies (the README's "bad input" paragraph states them):
- pixels: more than MAX_PIXELS (from the header, before decoding) is a bad image;
- mode: everything is scored and trained as 8-bit RGB: alpha is dropped (as the scorers' references do),
  palette and grayscale are expanded, CMYK goes through Pillow's conversion, 16-bit images are scaled to
  8 bits (Pillow's plain conversion would clip them to white); each conversion is named (`to_rgb`), and
  the stages count and log it;
- size: a candidate whose image is not the width x height its row declares is a bad row (a 1x1 image in a
  64x64 table would otherwise win every compressibility pair).
"""

from __future__ import annotations

import io

from PIL import Image

# Pillow refuses images above twice its MAX_IMAGE_PIXELS as decompression bombs (about 179 megapixels);
# we name that limit and check it from the header, before any pixel is decoded.
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS


class BadImage(ValueError):
    """Bytes that are not a usable image; the message says why."""


def open_image(data: bytes | None) -> Image.Image:
    """The image's header parsed (nothing decoded yet); BadImage when there is nothing to parse or too many pixels."""
    if data is None:
        raise BadImage("image is null")
    if len(data) == 0:
        raise BadImage("image is empty (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise BadImage("not an image PIL can identify") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data (bombs included); each is a bad row
        raise BadImage(f"undecodable image ({type(e).__name__}: {e})") from e
    if im.width * im.height > MAX_PIXELS:
        raise BadImage(f"image of {im.width}x{im.height} pixels exceeds the limit of {MAX_PIXELS} pixels")
    return im


def decode(data: bytes | None) -> Image.Image:
    """Encoded bytes (PNG, JPEG, ...) -> a fully loaded PIL image in its stored mode; raises BadImage."""
    im = open_image(data)
    try:
        im.load()
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt image is a bad row, not a crash
        raise BadImage(f"undecodable image ({type(e).__name__}: {e})") from e
    if im.width == 0 or im.height == 0:
        raise BadImage("image has zero width or height")
    return im


def decode_rgb(data: bytes | None) -> Image.Image:
    """:func:`decode`, then converted to RGB by :func:`to_rgb`."""
    return to_rgb(decode(data))[0]


def to_rgb(im: Image.Image) -> tuple[Image.Image, str | None]:
    """(the image as 8-bit RGB, how it was converted; None when it already was RGB)."""
    if im.mode == "RGB":
        return im, None
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        import numpy as np

        wide = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(wide.max()), 1.0)
        eight = np.clip(np.round(wide * 255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(eight, "L").convert("RGB"), f"{im.mode} scaled to 8-bit"
    has_alpha = "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info)
    note = f"{im.mode}{' with alpha' if im.mode == 'P' and has_alpha else ''} converted to RGB"
    return im.convert("RGB"), note + (" (alpha dropped)" if has_alpha else "")


def size_mismatch(im: Image.Image, width: int | None, height: int | None) -> str | None:
    """Why `im` is not the declared `width` x `height` (None when it is, or when nothing is declared)."""
    if width is None or height is None or (im.width, im.height) == (width, height):
        return None
    return f"image is {im.width}x{im.height}, its row declares {width}x{height}"


class ImageChecker:
    """Checks (and optionally shrinks) encoded images before they are stored; `check` returns
    (bytes to store, None) or (None, why).

    - `header`: parse the header (`Image.open` + `verify`) and, for JPEG, require the end-of-image marker;
      a JPEG without it (truncated, or trailing bytes) gets a full decode to decide.
    - `full`: decode every image (`load`), about 30x the cost of `header` (see benchmarks/ingest.py).
    - `none`: trust the bytes (null and empty images are still bad rows).
    """

    MODES = ("full", "header", "none")

    def __init__(self, mode: str = "header", max_side: int | None = None, jpeg_quality: int = 90):
        self.mode, self.max_side, self.jpeg_quality = mode, max_side, jpeg_quality
        self.resized = 0

    def check(self, data: bytes | None) -> tuple[bytes | None, str | None]:
        try:
            return self._check(data), None
        except BadImage as e:
            return None, str(e)

    def _check(self, data: bytes | None) -> bytes:
        if data is None or len(data) == 0:
            open_image(data)  # raises the reason
        if self.mode == "none" and self.max_side is None:
            return data
        try:
            with open_image(data) as im:
                size, fmt = im.size, im.format
                if self.mode == "full" or (self.max_side and max(size) > self.max_side):
                    im.load()
                    if self.max_side and max(size) > self.max_side:
                        return self._shrink(im)
                elif self.mode == "header":
                    im.verify()
            if self.mode == "header" and fmt == "JPEG" and b"\xff\xd9" not in data[-64:]:
                with open_image(data) as im:  # no end marker: decode to decide (PIL's error is the reason)
                    im.load()
        except BadImage:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data; each is a bad row
            raise BadImage(f"{type(e).__name__}: {e}") from e
        return data

    def _shrink(self, im: Image.Image) -> bytes:
        scale = self.max_side / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        small = im.convert("RGB").resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=self.jpeg_quality)
        self.resized += 1
        return buf.getvalue()
