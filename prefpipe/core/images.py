"""The one image decoder and verifier: every stage that reads encoded image bytes goes through here.

    decode(data)        -> a fully loaded PIL image, or BadImage naming why (empty, undecodable, zero size,
                           more pixels than MAX_PIXELS)
    decode_rgb(data)    -> the same, converted to RGB (what the trainer and the VAE need)
    ImageChecker        -> ingest's check of bytes it stores: header parse, full decode, or none; shrinking

A bad image is a bad row (counted, logged with its key, skipped), never a crash: callers catch BadImage.
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
    """:func:`decode`, then converted to RGB (alpha dropped, grayscale replicated)."""
    im = decode(data)
    return im if im.mode == "RGB" else im.convert("RGB")


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
