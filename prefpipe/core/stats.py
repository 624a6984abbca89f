"""Small statistics shared by label (agreement with humans) and eval (win rates)."""

from __future__ import annotations

import math

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
    """Per-pair points of the PickScore paper's tie-aware accuracy.

    human: label_0 per pair (1 = image 0 preferred, 0 = image 1, 0.5 = tie).
    diff: score_0 - score_1 of the model; |diff| < threshold predicts a tie.
    Points: 1 when model and human agree (same preference, or both tie), 0.5 when exactly one of them
    calls a tie, 0 when they prefer opposite images.
    """
    human = np.asarray(human, float)
    diff = np.asarray(diff, float)
    model_tie = np.abs(diff) < threshold
    human_tie = human == 0.5
    model_pref0 = diff > 0
    human_pref0 = human > 0.5
    agree = np.where(model_tie | human_tie, model_tie & human_tie, model_pref0 == human_pref0)
    one_tie = model_tie ^ human_tie
    return np.where(agree, 1.0, np.where(one_tie, 0.5, 0.0))


def best_tie_threshold(human: np.ndarray, diff: np.ndarray) -> float:
    """The tie threshold that maximises tie-aware accuracy on this split (candidates: 0 and each |diff|)."""
    candidates = np.unique(np.concatenate([[0.0], np.abs(np.asarray(diff, float))]))
    # a threshold just above a value makes that value a tie
    candidates = np.concatenate([[0.0], np.nextafter(candidates, np.inf)])
    scores = [tie_aware_points(human, diff, t).mean() for t in candidates]
    return float(candidates[int(np.argmax(scores))])
