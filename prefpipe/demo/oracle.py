"""The demo's oracle: does an image show what its prompt asked for? Read from pixels, by rule.

The drawing program (`prefpipe/demo/world.py`) knows what every caption names: a shape colour, a shape,
a background colour. The oracle reads the three back from an image, deterministically and without any
learnt part, so it can judge a learnt scorer (the demo's CLIP) that never saw it:

- colours: `world.read_colours` (hue votes: the border frame is the background, the majority of the other
  inner colours is the shape);
- shape: the pixels of the shape colour are compared with the three shapes the program draws (circle,
  square, apex-up triangle), each placed where it would have the same area and centroid as those pixels;
  the best overlap (IoU) names the shape. On drawn images it reads 99-100% (`shape_reading_accuracy`).

`alignment(images, prompts)` gives, per image, which parts are right; `accuracy` the fractions with 95%
Wilson intervals: shape colour, background colour, both colours, shape, and all three.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from prefpipe.core.stats import wilson_interval
from prefpipe.demo.world import COLOURS, SHAPES, SIDE, caption, combinations, pixel_colours, read_colours

_YY, _XX = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) + 0.5
PARTS = ("shape_colour", "background", "colours", "shape", "all")  # what `accuracy` reports, in order
PART_NAMES = {"shape_colour": "shape colour", "background": "background colour", "colours": "both colours",
              "shape": "shape", "all": "colours and shape"}


def shape_templates(mask: np.ndarray) -> dict[str, np.ndarray]:
    """The three shapes as the drawing program draws them, with the area and centroid of `mask`."""
    area = float(mask.sum())
    my, mx = float(_YY[mask].mean()), float(_XX[mask].mean())
    out = {}
    r = np.sqrt(area / np.pi)
    out["circle"] = (_XX - mx) ** 2 + (_YY - my) ** 2 <= r * r
    h = np.sqrt(area) / 2
    out["square"] = (np.abs(_XX - mx) <= h) & (np.abs(_YY - my) <= h)
    r = np.sqrt(area / 1.8)  # base 2r, height 1.8r; its centroid lies 0.2r below the drawn centre
    top, bottom = my - 1.2 * r, my + 0.6 * r
    frac = (_YY - top) / (bottom - top)
    out["triangle"] = (frac >= 0) & (frac <= 1) & (np.abs(_XX - mx) <= frac * r)
    return out


def read_shape(pixels: np.ndarray, colour: str | None, min_pixels: int = 12) -> str | None:
    """The shape drawn in `colour` in a (32, 32, 3) uint8 image (None: no colour, or too few pixels)."""
    if colour is None:
        return None
    mask = pixel_colours(pixels) == list(COLOURS).index(colour)
    if mask.sum() < min_pixels:
        return None
    best, best_iou = None, -1.0
    for name, template in shape_templates(mask).items():
        iou = float((mask & template).sum() / max(1, (mask | template).sum()))
        if iou > best_iou:
            best, best_iou = name, iou
    return best


@dataclass(frozen=True)
class Reading:
    """What the oracle read from one image, and what its prompt asked for."""

    wanted: tuple[str, str, str]  # (shape colour, shape, background colour)
    shape_colour: str | None
    shape: str | None
    background: str | None

    @property
    def parts(self) -> dict[str, bool]:
        fg, shape, bg = self.wanted
        ok = {"shape_colour": self.shape_colour == fg, "background": self.background == bg,
              "shape": self.shape == shape}
        ok["colours"] = ok["shape_colour"] and ok["background"]
        ok["all"] = ok["colours"] and ok["shape"]
        return {p: ok[p] for p in PARTS}

    @property
    def utility(self) -> int:
        """How many of the three asked-for things the image shows (0-3): what a simulated annotator prefers."""
        p = self.parts
        return int(p["shape_colour"]) + int(p["background"]) + int(p["shape"])


WANTED = {caption(*c): c for c in combinations()}


def read(pixels: np.ndarray, prompt: str) -> Reading:
    """The oracle's reading of one (32, 32, 3) uint8 image generated for `prompt` (a demo caption)."""
    if prompt not in WANTED:
        raise ValueError(f"not a demo caption: {prompt!r}")
    fg, bg = read_colours(pixels)
    return Reading(WANTED[prompt], fg, read_shape(pixels, fg), bg)


def to_pixels(image) -> np.ndarray:
    """PIL image or encoded bytes -> (32, 32, 3) uint8 RGB."""
    import io

    from PIL import Image

    if isinstance(image, bytes | bytearray):
        image = Image.open(io.BytesIO(image))
    return np.asarray(image.convert("RGB"))


def alignment(images: Iterable, prompts: Iterable[str]) -> list[Reading]:
    return [read(to_pixels(im), p) for im, p in zip(images, prompts)]


def accuracy(readings: list[Reading]) -> dict[str, dict]:
    """Per part: {"accuracy", "ci95": [low, high] (Wilson), "n"}."""
    n = len(readings)
    out = {}
    for part in PARTS:
        k = sum(r.parts[part] for r in readings)
        lo, hi = wilson_interval(k, n)
        out[part] = {"accuracy": k / n if n else float("nan"), "ci95": [lo, hi], "n": n}
    return out


def shape_reading_accuracy(n: int = 600, seed: int = 5) -> float:
    """How often `read_shape` names the drawn shape of fresh drawings (flat or textured backgrounds)."""
    from prefpipe.demo.world import draw_dataset

    drawn = draw_dataset(n, seed)
    combos = combinations()
    right = 0
    for pixels, c in zip(drawn.pixels, drawn.combos):
        fg, shape, _ = combos[c]
        right += read_shape(pixels, fg) == shape
    return right / n


__all__ = ["PARTS", "PART_NAMES", "SHAPES", "Reading", "accuracy", "alignment", "read", "read_shape",
           "shape_reading_accuracy"]
