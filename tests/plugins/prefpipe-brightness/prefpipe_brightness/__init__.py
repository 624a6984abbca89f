"""Mean brightness in [0, 1] (ITU-R 601 luma of the RGB image, as PIL's "L" conversion), higher is better.

A plugin example: a class that follows `labelers.base.BaseScorer` and an entry point in pyproject.toml.
The prompt is ignored; `weights`, if given, is a text file holding one float, a gain applied to the score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from labelers.base import BaseScorer


class Brightness(BaseScorer):
    name = "brightness"
    higher_is_better = True
    default_weights = None

    def __init__(self, weights=None, **kwargs) -> None:
        super().__init__(weights=weights, **kwargs)
        self.gain = float(Path(self.weights).read_text()) if self.weights else 1.0

    def score_batch(self, images, prompts):
        return [self.gain * np.asarray(im.convert("L"), dtype=np.float64).mean() / 255 for im in images]
