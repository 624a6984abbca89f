"""Pair building on hand-made score tables with known answers."""

import math

import numpy as np
import polars as pl
import pytest

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.stats import best_tie_threshold, tie_aware_points, wilson_interval
from prefpipe.stages.pairs import PairCounts, PairOptions, build_pairs


def scores(rows):
    return pl.DataFrame(rows, schema=["prompt_id", "candidate", "scorer", "score"], orient="row")


S = scores([
    ("p", 0, "a", 1.0), ("p", 1, "a", 5.0), ("p", 2, "a", 3.0), ("p", 3, "a", -2.0),
    ("q", 0, "a", 2.0), ("q", 1, "a", 2.0),            # all equal: a tie
    ("r", 0, "a", 9.0),                                 # one candidate: no pair
])


def winners(df):
    """(prompt, winner, loser) whatever position each sits in."""
    out = set()
    for r in df.iter_rows(named=True):
        w, lo = (r["candidate_0"], r["candidate_1"]) if r["label_0"] == 1.0 else (r["candidate_1"], r["candidate_0"])
        out.add((r["prompt_id"], w, lo))
    return out


def test_best_worst_pairs_highest_against_lowest_with_margin_and_both_scores():
    counts = PairCounts()
    df = build_pairs(S, PairOptions(), counts)
    assert winners(df) == {("p", 1, 3)}
    row = df.row(0, named=True)
    assert row["margin"] == pytest.approx(7.0)
    assert {row["score_0"], row["score_1"]} == {5.0, -2.0}
    assert row["label_0"] + row["label_1"] == 1.0
    assert (row["score_0"] > row["score_1"]) == (row["label_0"] == 1.0)
    assert counts.as_dict() | {} == {"prompts": 3, "single_candidate_prompts": 1, "pairs": 1, "ties_dropped": 1,
                                     "ties_kept": 0, "candidates_missing_scores": 0,
                                     "candidates_nonfinite_scores": 0}


def test_ties_are_dropped_by_default_and_kept_at_half_when_asked():
    df = build_pairs(S, PairOptions(ties="keep"))
    tie = df.filter(pl.col("prompt_id") == "q").row(0, named=True)
    assert tie["label_0"] == tie["label_1"] == 0.5 and tie["margin"] == 0.0


def test_all_strategy_gives_every_pair_and_min_margin_drops_close_ones():
    df = build_pairs(S, PairOptions(strategy="all"))
    assert winners(df) == {("p", 1, 0), ("p", 2, 0), ("p", 0, 3), ("p", 1, 2), ("p", 1, 3), ("p", 2, 3)}
    close = build_pairs(S, PairOptions(strategy="all", min_margin=2.5))  # drops |1-3|=2 and |5-3|=2
    assert winners(close) == {("p", 1, 0), ("p", 0, 3), ("p", 1, 3), ("p", 2, 3)}


def test_random_k_is_deterministic_and_draws_k_distinct_pairs_per_prompt():
    a = build_pairs(S, PairOptions(strategy="random-k", k=3, seed=1))
    b = build_pairs(S, PairOptions(strategy="random-k", k=3, seed=1))
    assert a.equals(b)
    p = a.filter(pl.col("prompt_id") == "p")
    assert p.height == 3
    assert len({tuple(sorted(x)) for x in p.select(["candidate_0", "candidate_1"]).rows()}) == 3


def test_positions_are_mixed_so_label_0_carries_the_preference():
    many = scores([(f"p{i}", c, "a", float(c)) for i in range(200) for c in range(2)])
    df = build_pairs(many, PairOptions())
    share = df["label_0"].mean()
    assert 0.35 < share < 0.65  # winner in position 0 about half the time
    assert winners(df) == {(f"p{i}", 1, 0) for i in range(200)}


def test_mean_rank_ensemble_averages_ranks_within_the_prompt():
    t = scores([
        ("p", 0, "a", 10.0), ("p", 1, "a", 20.0), ("p", 2, "a", 30.0),
        ("p", 0, "b", 0.3), ("p", 1, "b", 0.1), ("p", 2, "b", 0.2),
    ])
    # ranks a: 1,2,3; b: 3,1,2 -> mean 2, 1.5, 2.5 -> best 2, worst 1, margin 1
    df = build_pairs(t, PairOptions(ensemble="mean-rank"))
    assert winners(df) == {("p", 2, 1)}
    assert df["margin"][0] == pytest.approx(1.0)
    assert df["scorer"][0] == "mean-rank(a,b)"


def test_unanimous_ensemble_keeps_only_pairs_all_scorers_agree_on():
    t = scores([
        ("p", 0, "a", 1.0), ("p", 1, "a", 2.0), ("p", 2, "a", 3.0),
        ("p", 0, "b", 1.0), ("p", 1, "b", 3.0), ("p", 2, "b", 2.0),
    ])
    df = build_pairs(t, PairOptions(strategy="all", ensemble="unanimous"))
    assert winners(df) == {("p", 1, 0), ("p", 2, 0)}  # 1 vs 2: a says 2, b says 1 -> tie, dropped


def test_candidates_without_a_score_are_left_out_and_counted():
    t = scores([("p", 0, "a", 1.0), ("p", 1, "a", float("nan")), ("p", 2, "a", 3.0)])
    counts = PairCounts()
    df = build_pairs(t, PairOptions(), counts)
    assert winners(df) == {("p", 2, 0)} and counts.candidates_missing_scores == 1


def test_several_scorers_need_by_or_ensemble():
    t = scores([("p", 0, "a", 1.0), ("p", 0, "b", 1.0)])
    with pytest.raises(PrefpipeError, match="--by SCORER"):
        build_pairs(t, PairOptions())
    with pytest.raises(PrefpipeError, match="--by c: no such scorer"):
        build_pairs(t, PairOptions(by="c"))


def test_wilson_interval_matches_the_closed_form():
    lo, hi = wilson_interval(80, 100)
    z = 1.959963984540054
    p, n = 0.8, 100
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert (lo, hi) == pytest.approx((0.7112, 0.8666), abs=1e-4)  # the textbook values for 80/100
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_tie_aware_points_and_threshold_choice():
    human = np.array([1.0, 0.0, 0.5, 0.5, 1.0])
    diff = np.array([2.0, 0.1, 0.05, 3.0, -1.0])
    assert tie_aware_points(human, diff, 0.0).tolist() == [1.0, 0.0, 0.5, 0.5, 0.0]
    assert tie_aware_points(human, diff, 0.2).tolist() == [1.0, 0.5, 1.0, 0.5, 0.0]
    t = best_tie_threshold(human, diff)
    assert tie_aware_points(human, diff, t).mean() == max(
        tie_aware_points(human, diff, x).mean() for x in [0, 0.06, 0.11, 1.01, 2.01, 3.01])


def test_infinite_scores_are_counted_logged_and_never_paired(caplog):
    scores = pl.DataFrame({"prompt_id": ["a"] * 3 + ["b"] * 2, "candidate": [0, 1, 2, 0, 1], "scorer": ["s"] * 5,
                           "score": [1.0, float("inf"), 3.0, float("-inf"), 2.0]})
    counts = PairCounts()
    with caplog.at_level("WARNING", logger="prefpipe.label"):
        df = build_pairs(scores, PairOptions(strategy="all"), counts)
    assert df.height == 1 and np.isfinite(df["margin"].to_numpy()).all()
    assert counts.candidates_nonfinite_scores == 2 and counts.pairs == 1
    assert "a/1 has no finite score (s inf)" in caplog.text and "b/0 has no finite score (s -inf)" in caplog.text
