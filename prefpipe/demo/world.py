"""The demo's drawn world: captions, prompt files, the images, and reading an image's colours back.

32 px images of a coloured shape (circle, square, triangle; random size and place) on a coloured
background; the caption names the three ("a red circle on a blue background"). The background's
*texture* (flat, striped, checkered, noisy; random orientation, phase, contrast) is never named, so at a
fixed caption the JPEG size varies from about 0.75 to 1.5 kB: the spread that the compressibility reward
(`labelers/compressibility.py`) ranks and Diffusion-DPO can move. Textures sit on the 4 px grid of the
latent cells, which a small VAE can keep (finer noise came back blurred).

14 of the 90 (shape colour, shape, background colour) combinations are held out: never in the training
prompts, only in the evaluation ones.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIDE = 32  # image side in pixels

# Six well separated hues (the colour check classifies by hue).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (235, 215, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "purple": (140, 50, 185),
}
SHAPES = ("circle", "square", "triangle")
TEXTURES = ("flat", "striped", "checkered", "noisy")  # never named in a caption


# ------------------------------------------------------------------------------------------------------
# Captions and prompt files
# ------------------------------------------------------------------------------------------------------


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def caption(fg: str, shape: str, bg: str) -> str:
    """"a red circle on a blue background", "an orange square on a green background"."""
    return f"{_a(fg)} {shape} on {_a(bg)} background"


def combinations() -> list[tuple[str, str, str]]:
    """Every (shape colour, shape, background colour) with two different colours: 6 x 3 x 5 = 90."""
    return [(fg, shape, bg) for fg in COLOURS for shape in SHAPES for bg in COLOURS if bg != fg]


def is_held_out(fg: str, shape: str, bg: str) -> bool:
    """14 of the 90 combinations, one background per (colour, shape): every colour, shape and colour pair
    still appears in the train prompts, only these triples never do."""
    colours = list(COLOURS)
    return (colours.index(fg) + colours.index(bg) + SHAPES.index(shape)) % len(colours) == 0


def demo_prompts() -> tuple[list[str], list[str]]:
    """(train, held_out) captions; no caption is in both."""
    combos = combinations()
    return (
        [caption(*c) for c in combos if not is_held_out(*c)],
        [caption(*c) for c in combos if is_held_out(*c)],
    )


def write_demo_prompts(folder: str | Path) -> tuple[Path, Path]:
    """Write `train.txt` (76 prompts) and `held_out.txt` (14 prompts never in train.txt) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, prompts in zip(("train.txt", "held_out.txt"), demo_prompts()):
        (folder / name).write_text("\n".join(prompts) + "\n")
        paths.append(folder / name)
    return paths[0], paths[1]


# ------------------------------------------------------------------------------------------------------
# The drawn dataset
# ------------------------------------------------------------------------------------------------------

_YY, _XX = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) + 0.5


def draw_image(rng: np.random.Generator, fg: str, shape: str, bg: str, texture: str) -> np.ndarray:
    """One (32, 32, 3) uint8 image.

    Textures live on the 4 px grid of the latent cells (8x8 latents), so a small VAE can keep them: stripes
    4 px wide, checks of 4 px, noise of 4x4 px blocks; the second tone is a darker shade of the background
    (same hue, random contrast), so the background keeps the colour its caption names.
    """
    base = np.array(COLOURS[bg], np.float32)
    img = np.empty((SIDE, SIDE, 3), np.float32)
    img[:] = base
    shade = base * rng.uniform(0.5, 0.8)
    cells_y, cells_x = _YY.astype(int) // 4, _XX.astype(int) // 4
    if texture == "striped":
        img[((cells_x if rng.random() < 0.5 else cells_y) + int(rng.integers(0, 2))) % 2 == 0] = shade
    elif texture == "checkered":
        img[(cells_x + cells_y + int(rng.integers(0, 2))) % 2 == 0] = shade
    elif texture == "noisy":
        levels = rng.uniform(rng.uniform(0.45, 0.8), 1.1, (SIDE // 4, SIDE // 4, 1)).astype(np.float32)
        img = base * levels[cells_y, cells_x]
    elif texture != "flat":
        raise ValueError(f"unknown texture {texture!r}")
    r = rng.uniform(6, 10)  # the shape stays >= 3 px from the border: the border shows the background
    cx, cy = rng.uniform(3 + r, SIDE - 3 - r, 2)
    if shape == "circle":
        mask = (_XX - cx) ** 2 + (_YY - cy) ** 2 <= r * r
    elif shape == "square":
        h = r * 0.85
        mask = (np.abs(_XX - cx) <= h) & (np.abs(_YY - cy) <= h)
    elif shape == "triangle":
        top, bottom = cy - r, cy + 0.8 * r
        frac = (_YY - top) / (bottom - top)
        mask = (frac >= 0) & (frac <= 1) & (np.abs(_XX - cx) <= frac * r)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    img[mask] = COLOURS[fg]
    return np.clip(img, 0, 255).round().astype(np.uint8)


@dataclass
class DrawnImages:
    pixels: np.ndarray  # (N, 32, 32, 3) uint8
    combos: np.ndarray  # (N,) int64, index into combinations()
    textures: np.ndarray  # (N,) int64, index into TEXTURES

    def captions(self) -> list[str]:
        combos = combinations()
        return [caption(*combos[i]) for i in self.combos]


def draw_dataset(n: int, seed: int) -> DrawnImages:
    """`n` images with uniformly drawn combination and texture; a pure function of (n, seed)."""
    rng = np.random.default_rng(seed)
    combos = combinations()
    which = rng.integers(0, len(combos), n)
    textures = rng.integers(0, len(TEXTURES), n)
    pixels = np.stack([draw_image(rng, *combos[c], TEXTURES[t]) for c, t in zip(which, textures)])
    return DrawnImages(pixels, which, textures)


# ------------------------------------------------------------------------------------------------------
# Measuring: colours of an image, JPEG sizes
# ------------------------------------------------------------------------------------------------------

_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLOURS.items()}


def pixel_colours(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) index into COLOURS by nearest hue; -1 for grey/dark pixels."""
    from PIL import Image

    hsv = np.asarray(Image.fromarray(pixels).convert("HSV"), np.float32) / 255
    hues = np.array(list(_HUES.values()), np.float32)
    d = np.abs(hsv[..., :1] - hues)
    d = np.minimum(d, 1 - d)  # hue is circular
    labels = d.argmin(-1)
    labels[(hsv[..., 1] < 0.25) | (hsv[..., 2] < 0.15)] = -1
    return labels


def read_colours(pixels: np.ndarray, border: int = 2, min_pixels: int = 12) -> tuple[str | None, str | None]:
    """(shape colour, background colour) of a (32, 32, 3) uint8 image, by hue votes.

    Background: the majority colour of the `border`-pixel frame (drawn shapes never reach it). Shape: the
    majority colour among inner pixels of any other colour, if at least `min_pixels` of them; else None.
    """
    labels = pixel_colours(pixels)
    frame = np.ones(labels.shape, bool)
    frame[border:-border, border:-border] = False
    names = list(COLOURS)
    votes = np.bincount(labels[frame & (labels >= 0)], minlength=len(names))
    if votes.sum() == 0:
        return None, None
    bg = int(votes.argmax())
    inner = labels[~frame]
    inner = inner[(inner >= 0) & (inner != bg)]
    votes = np.bincount(inner, minlength=len(names))
    fg = names[int(votes.argmax())] if votes.max(initial=0) >= min_pixels else None
    return fg, names[bg]


def colour_accuracy(images: list, prompts: list[str]) -> dict[str, float]:
    """Fraction of images whose background / shape / both colours are those their prompt names."""
    wanted = {caption(*c): c for c in combinations()}
    bg_ok = fg_ok = both = 0
    for image, prompt in zip(images, prompts):
        fg, _, bg = wanted[prompt]
        got_fg, got_bg = read_colours(np.asarray(image.convert("RGB")))
        bg_ok += got_bg == bg
        fg_ok += got_fg == fg
        both += got_bg == bg and got_fg == fg
    n = max(1, len(images))
    return {"background": bg_ok / n, "shape": fg_ok / n, "both": both / n}


def jpeg_sizes(pixels: np.ndarray) -> np.ndarray:
    """JPEG size in kB (the compressibility reward's own measure) of each (N, H, W, 3) uint8 image."""
    from PIL import Image

    from labelers.compressibility import jpeg_kilobytes

    return np.array([jpeg_kilobytes(Image.fromarray(p)) for p in pixels], np.float64)
