"""Small statistics shared by label (agreement with humans) and eval (win rates), and the stable split
of pairs that label's agreement report chooses its tie threshold on."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion `successes / n` (successes may be fractional: ties count half).

    Returns (low, high); (0, 1) when n == 0.
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def tie_aware_points(human: np.ndarray, diff: np.ndarray, threshold: float) -> np.ndarray:
    """Per-pair points of the PickScore paper's tie-aware accuracy (Kirstain et al. 2023, "Pick-a-Pic").

    human: label_0 per pair (1 = image 0 preferred, 0 = image 1, 0.5 = tie).
    diff: score_0 - score_1 of the model; |diff| < threshold predicts a tie.
    Points: 1 when model and human agree (same preference, or both tie), 0.5 when exactly one of them
    calls a tie, 0 when they prefer opposite images.
    """
    diff = np.asarray(diff, float)
    return _points(human, diff, np.abs(diff) < threshold)


def _points(human: np.ndarray, diff: np.ndarray, model_tie: np.ndarray) -> np.ndarray:
    """The points of :func:`tie_aware_points` for a given mask of the pairs the model calls ties."""
    human = np.asarray(human, float)
    human_tie = human == 0.5
    agree = np.where(model_tie | human_tie, model_tie & human_tie, (diff > 0) == (human > 0.5))
    return np.where(agree, 1.0, np.where(model_tie ^ human_tie, 0.5, 0.0))


def best_tie_threshold(human: np.ndarray, diff: np.ndarray) -> float:
    """The tie threshold that maximises tie-aware accuracy on this split. Candidates, in order: 0, then
    just above each distinct |diff| (0 included), ascending (a threshold just above a value makes that
    value a tie); on equal accuracy the first best candidate wins; 0.0 when there are no pairs.

    O(n log n): pair i scores `a_i` when |diff_i| >= t and `b_i` when |diff_i| < t, so the total at t is
    sum(a) plus the sum of (b - a) over the pairs whose |diff| lies below t: a prefix sum over the pairs
    sorted by |diff|. Points are counted in half-points (integers), so totals compare exactly.
    """
    human = np.asarray(human, float)
    diff = np.asarray(diff, float)
    if diff.size == 0:
        return 0.0
    magnitude = np.abs(diff)
    values = np.unique(np.concatenate([[0.0], magnitude]))
    candidates = np.concatenate([[0.0], np.nextafter(values, np.inf)])
    a = np.rint(2 * _points(human, diff, np.zeros(diff.shape, bool))).astype(np.int64)
    b = np.rint(2 * _points(human, diff, ~np.isnan(diff))).astype(np.int64)  # a NaN is never below t
    order = np.argsort(magnitude, kind="stable")  # NaN last
    gain = np.concatenate([[0], np.cumsum((b - a)[order])])
    below = np.searchsorted(magnitude[order], candidates, side="left")  # how many |diff| < t
    below[np.isnan(candidates)] = 0  # nothing is below a NaN threshold
    return float(candidates[int(np.argmax(a.sum() + gain[below]))])


def stable_halves(keys: Iterable[str]) -> np.ndarray:
    """Split keys half and half, the same on every machine and library version: the first bit of the
    SHA-256 digest of each key's UTF-8 bytes (0 or 1, int8)."""
    return np.fromiter((hashlib.sha256(k.encode("utf-8")).digest()[0] >> 7 for k in keys), dtype=np.int8)
