"""Eval's statistics: tuned against base, image by image, per scorer (as the Diffusion-DPO and D3PO papers report).

- win rate of tuned over base: over the (prompt, seed) pairs both models have, a win scores 1, a tie
  (equal scores) 1/2, a loss 0; `win_rate` = points / n, with a 95% Wilson interval
  (`prefpipe.core.stats.wilson_interval`). "Better" follows the scorer's `higher_is_better`.
  The interval treats comparisons as independent; seeds of one prompt are not quite, so
  `prompt_win_rate` repeats the test at the prompt level (mean score over the prompt's seeds).
- mean and median score of base and tuned over the same pairs, and the differences (tuned - base,
  in the scorer's units, not sign-adjusted).
- checkpoint selection: the Diffusion-DPO paper picks the checkpoint with the best median reward on
  held-out prompts; `selection[scorer].best` is that checkpoint among the tuned runs.

The keys of each result (`RESULT_KEYS`) and of the selection are documented with report.json in
`prefpipe.stages.eval`.
"""

from __future__ import annotations

import math

import numpy as np

from prefpipe.core.errors import PrefpipeError
from prefpipe.stages.eval.runs import BASE

RESULT_KEYS = ("scorer", "tuned", "higher_is_better", "n", "wins", "ties", "losses", "win_rate", "win_rate_ci",
               "n_prompts", "prompt_win_rate", "prompt_win_rate_ci", "base_mean", "tuned_mean", "mean_diff",
               "base_median", "tuned_median", "median_diff", "unmatched")


def win_counts(base, tuned, higher_is_better: bool = True) -> tuple[int, int, int]:
    """(wins, ties, losses) of tuned over base, element by element (same prompt and seed)."""
    base = np.asarray(base, dtype=np.float64)
    tuned = np.asarray(tuned, dtype=np.float64)
    if base.shape != tuned.shape:
        raise PrefpipeError(f"win_counts: {base.shape} base scores against {tuned.shape} tuned scores")
    diff = tuned - base if higher_is_better else base - tuned
    return int((diff > 0).sum()), int((diff == 0).sum()), int((diff < 0).sum())


def compare(base, tuned, higher_is_better: bool = True) -> dict:
    """Win rate of tuned over base (ties count half) with its 95% Wilson interval, and mean/median of each."""
    from prefpipe.core.stats import wilson_interval

    base = np.asarray(base, dtype=np.float64)
    tuned = np.asarray(tuned, dtype=np.float64)
    wins, ties, losses = win_counts(base, tuned, higher_is_better)
    n = wins + ties + losses
    points = wins + 0.5 * ties
    low, high = wilson_interval(points, n)
    nan = float("nan")
    stat = {
        "n": n, "wins": wins, "ties": ties, "losses": losses,
        "win_rate": points / n if n else nan, "win_rate_ci": [low, high],
        "base_mean": float(base.mean()) if n else nan, "tuned_mean": float(tuned.mean()) if n else nan,
        "base_median": float(np.median(base)) if n else nan, "tuned_median": float(np.median(tuned)) if n else nan,
    }
    stat["mean_diff"] = stat["tuned_mean"] - stat["base_mean"]
    stat["median_diff"] = stat["tuned_median"] - stat["base_median"]
    return stat


def summarize(scores, tuned: list[str], higher_is_better: dict[str, bool]) -> list[dict]:
    """One result per (scorer, tuned run) from a long table (model, prompt_id, candidate, scorer, score).

    Base and tuned are paired on (prompt_id, candidate): same prompt, same seed.
    """
    import polars as pl

    results = []
    for scorer, hib in higher_is_better.items():
        s = scores.filter(pl.col("scorer") == scorer)
        base = s.filter(pl.col("model") == BASE).select("prompt_id", "candidate", pl.col("score").alias("base"))
        for name in tuned:
            t = s.filter(pl.col("model") == name).select("prompt_id", "candidate", pl.col("score").alias("tuned"))
            both = base.join(t, on=["prompt_id", "candidate"], how="inner")
            by_prompt = both.group_by("prompt_id").agg(pl.col("base").mean(), pl.col("tuned").mean())
            stat = compare(both["base"].to_numpy(), both["tuned"].to_numpy(), hib)
            per_prompt = compare(by_prompt["base"].to_numpy(), by_prompt["tuned"].to_numpy(), hib)
            results.append({
                "scorer": scorer, "tuned": name, "higher_is_better": hib,
                **{k: stat[k] for k in ("n", "wins", "ties", "losses", "win_rate", "win_rate_ci")},
                "n_prompts": per_prompt["n"], "prompt_win_rate": per_prompt["win_rate"],
                "prompt_win_rate_ci": per_prompt["win_rate_ci"],
                **{k: stat[k] for k in ("base_mean", "tuned_mean", "mean_diff", "base_median", "tuned_median", "median_diff")},
                "unmatched": base.height + t.height - 2 * both.height,
            })
    return results


def select_checkpoints(results: list[dict]) -> dict[str, dict]:
    """Per scorer, the tuned run with the best median score (the Diffusion-DPO checkpoint-selection rule)."""
    out: dict[str, dict] = {}
    for r in results:
        sel = out.setdefault(r["scorer"], {"statistic": "median", "best": None, "best_median": None,
                                           "best_beats_base": False, "base_median": r["base_median"],
                                           "medians": {}})
        sel["medians"][r["tuned"]] = r["tuned_median"]
    for scorer, sel in out.items():
        hib = next(r["higher_is_better"] for r in results if r["scorer"] == scorer)
        finite = {k: v for k, v in sel["medians"].items() if not math.isnan(v)}
        if finite:
            best = (max if hib else min)(finite, key=finite.get)
            base = sel["base_median"]
            beats = base is not None and not math.isnan(base) and (finite[best] > base if hib else finite[best] < base)
            sel.update(best=best, best_median=finite[best], best_beats_base=bool(beats))
    return out


def headline(results: list[dict], scorers: list[str]) -> str:
    """One line: each tuned run's win rate over base (first scorer) and the mean score of each."""
    if not results:
        return "eval: nothing compared"
    first = scorers[0]
    parts = []
    for r in (r for r in results if r["scorer"] == first):
        lo, hi = r["win_rate_ci"]
        parts.append(
            f"{r['tuned']} beats base {100 * r['win_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] of {r['n']} "
            f"(prompt, seed) pairs, mean {r['tuned_mean']:.4g} vs {r['base_mean']:.4g}"
        )
    more = f" (+{len(scorers) - 1} more scorers in the report)" if len(scorers) > 1 else ""
    return f"eval [{first}]: " + "; ".join(parts) + more


def jsonable(x):
    """`x` with every non-finite float (NaN, inf) replaced by None, through dicts, lists and tuples: valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x
