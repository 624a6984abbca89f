"""`prefpipe feedback` (prefpipe/stages/feedback.py): per-image labels for KTO from pairs, scores and thumbs,
each derivation checked on its edges (ties, thresholds equal to a score, fractions that round to 0, one-image
prompts) against a plain-Python reading of the documented rule."""

from __future__ import annotations

import math
import random

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.schema import FEEDBACK, PAIRS, conform
from prefpipe.stages.feedback import (
    ScoreCuts,
    feedback_from_pairs,
    feedback_from_scores,
    feedback_from_thumbs,
)
from tests.conftest import run_cli


def _labels(df: pl.DataFrame, key=("prompt_id", "candidate")) -> dict:
    return {tuple(r[k] for k in key): r["desirable"] for r in df.iter_rows(named=True)}


# ------------------------------------------------------------------------------------------------- pairs


def _pairs_df(labels):
    n = len(labels)
    return pl.DataFrame({"label_0": labels, "caption": [f"c{i}" for i in range(n)], "prompt_id": [f"p{i}" for i in range(n)],
                         "image_0_uid": [f"a{i}" for i in range(n)], "image_1_uid": [f"b{i}" for i in range(n)]})


def test_pairs_winner_desirable_loser_undesirable_ties_neither():
    counts: dict = {}
    out = feedback_from_pairs(_pairs_df([1.0, 0.0, 0.5, 1.0]), "train-0.parquet", counts=counts)
    assert _labels(out, ("image_uid",)) == {("a0",): True, ("b0",): False, ("a1",): False, ("b1",): True,
                                            ("a3",): True, ("b3",): False}
    assert counts == {"pairs": 4, "bad_label": 0, "ties_skipped": 1, "desirable": 3, "undesirable": 3}
    row = out.filter(pl.col("image_uid") == "b1").row(0, named=True)
    assert (row["pairs_file"], row["pairs_row"], row["side"], row["caption"], row["source"]) == (
        "train-0.parquet", 1, 1, "c1", "pairs")


@pytest.mark.parametrize("ties", ["desirable", "undesirable"])
def test_pairs_ties_label_both_images_when_asked(ties):
    counts: dict = {}
    out = feedback_from_pairs(_pairs_df([0.5, 1.0, 7.0, None]), "f", ties=ties, counts=counts)
    tie = out.filter(pl.col("pairs_row") == 0)
    assert tie["desirable"].to_list() == [ties == "desirable"] * 2
    assert counts["ties_labelled"] == 1 and counts["bad_label"] == 2 and out.height == 4


# ------------------------------------------------------------------------------------------------ scores


def _scores_df(per_prompt: dict[str, list[float]], scorer="s") -> pl.DataFrame:
    rows = [(p, c, scorer, s) for p, ss in per_prompt.items() for c, s in enumerate(ss)]
    return pl.DataFrame(rows, schema=["prompt_id", "candidate", "scorer", "score"], orient="row")


def _rule_fractions(scores: list[float], top: float, bottom: float) -> dict[int, bool]:
    """The documented rule read literally: an image is desirable when it and every image scoring the same
    are among the floor(n x top) best (likewise the bottom)."""
    n = len(scores)
    k_top, k_bottom = math.floor(n * top + 1e-9), math.floor(n * bottom + 1e-9)
    out = {}
    for i, s in enumerate(scores):
        higher = sum(x > s for x in scores)
        lower = sum(x < s for x in scores)
        same = sum(x == s for x in scores)
        if higher + same <= k_top:
            out[i] = True
        elif lower + same <= k_bottom:
            out[i] = False
    return out


def test_scores_fractions_edges():
    per_prompt = {
        "one": [0.7],                          # one image: floor(0.25) = 0, nothing
        "three": [0.1, 0.9, 0.5],              # floor(0.75) = 0: a fraction that rounds to 0 labels none
        "four": [0.1, 0.9, 0.5, 0.3],          # one desirable (0.9), one undesirable (0.1)
        "tied_cut": [0.9, 0.9, 0.2, 0.1],      # the cut (k=1) falls inside the 0.9 pair: neither is desirable
        "all_equal": [0.5, 0.5, 0.5, 0.5],
        "eight": [3, 1, 4, 1, 5, 9, 2, 6],     # k = 2: 9 and 6 desirable; 1, 1 undesirable
    }
    counts: dict = {}
    out = feedback_from_scores(_scores_df(per_prompt), ScoreCuts(desirable_top=0.25, undesirable_bottom=0.25),
                               counts=counts)
    got = _labels(out)
    assert got == {("four", 1): True, ("four", 0): False, ("tied_cut", 3): False,
                   ("eight", 5): True, ("eight", 7): True, ("eight", 1): False, ("eight", 3): False}
    assert counts["single_image_prompts"] == 1 and counts["fraction_rounds_to_zero_prompts"] == 2
    assert counts["desirable"] + counts["undesirable"] + counts["unlabelled"] == counts["images"] == 24
    for p, ss in per_prompt.items():  # the same as the rule read literally
        assert {c: d for (q, c), d in got.items() if q == p} == _rule_fractions(ss, 0.25, 0.25), p


def test_scores_fractions_agree_with_the_rule_on_random_prompts():
    rng = random.Random(0)
    per_prompt = {f"p{i}": [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) if i % 2 else rng.random()
                            for _ in range(rng.randint(1, 9))] for i in range(60)}
    for top, bottom in ((0.25, 0.25), (0.5, 0.5), (1.0, 0.0), (0.1, 0.6)):
        got = _labels(feedback_from_scores(_scores_df(per_prompt), ScoreCuts(top, bottom)))
        for p, ss in per_prompt.items():
            assert {c: d for (q, c), d in got.items() if q == p} == _rule_fractions(ss, top, bottom), (p, top, bottom)


def test_scores_fraction_one_labels_a_single_image_prompt():
    out = feedback_from_scores(_scores_df({"one": [0.3]}), ScoreCuts(desirable_top=1.0))
    assert _labels(out) == {("one", 0): True}


def test_scores_thresholds_count_a_score_equal_to_the_threshold():
    df = _scores_df({"a": [0.2, 0.5, 0.8, 0.5], "b": [1.0, 0.2]})
    out = feedback_from_scores(df, ScoreCuts(desirable_above=0.8, undesirable_below=0.2))
    assert _labels(out) == {("a", 2): True, ("b", 0): True, ("a", 0): False, ("b", 1): False}
    assert out["score"].to_list() == pytest.approx([0.2, 0.8, 1.0, 0.2])
    only_top = feedback_from_scores(df, ScoreCuts(desirable_above=0.5))
    assert _labels(only_top) == {("a", 1): True, ("a", 2): True, ("a", 3): True, ("b", 0): True}


def test_scores_choose_a_scorer_and_bad_cuts_are_one_message():
    df = pl.concat([_scores_df({"a": [0.1, 0.9]}, "s"), _scores_df({"a": [0.9, 0.1]}, "t")])
    with pytest.raises(PrefpipeError, match="several scorers .*--by"):
        feedback_from_scores(df, ScoreCuts(desirable_top=0.5))
    assert _labels(feedback_from_scores(df, ScoreCuts(desirable_top=0.5), scorer="t")) == {("a", 0): True}
    for cuts, msg in ((ScoreCuts(0.6, 0.6), "> 1"), (ScoreCuts(), "needs"), (ScoreCuts(0.5, None, 1.0), "exclude"),
                      (ScoreCuts(None, None, 0.5, 0.5), "must be below"), (ScoreCuts(1.5), r"in \[0, 1\]")):
        with pytest.raises(PrefpipeError, match=msg):
            feedback_from_scores(df, cuts, scorer="s")


# ------------------------------------------------------------------------------------------------ thumbs


def test_thumbs_are_summed_per_image():
    df = pl.DataFrame({"prompt_id": ["a", "a", "a", "a", "b", "b", "b"], "candidate": [0, 0, 1, 2, 0, 0, 1],
                       "thumbs": [1, 1, -1, 0, 1, -1, None], "caption": ["x"] * 4 + ["y"] * 3})
    counts: dict = {}
    out = feedback_from_thumbs(df, counts=counts)
    assert _labels(out) == {("a", 0): True, ("a", 1): False}
    assert out["score"].to_list() == [2.0, -1.0] and out["caption"].to_list() == ["x", "x"]
    assert counts == {"votes": 5, "images": 5, "unlabelled": 3, "desirable": 1, "undesirable": 1}
    with pytest.raises(PrefpipeError, match="row 1: thumbs = 5"):
        feedback_from_thumbs(df.with_columns(pl.Series("thumbs", [1, 5, 1, 1, 1, 1, 1])), "t.parquet")


# -------------------------------------------------------------------------------------------------- CLI


def test_feedback_command_writes_the_table_without_images(tmp_path):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    rows = {"caption": ["a", "b", "c"], "jpg_0": [b"x"] * 3, "jpg_1": [b"y"] * 3, "label_0": [1.0, 0.5, 0.0],
            "image_0_uid": ["u0", "u1", "u2"], "image_1_uid": ["v0", "v1", "v2"]}
    pq.write_table(conform(pa.table(rows), PAIRS), pairs / "train-00000-of-00001.parquet")
    proc = run_cli("feedback", "--from", "pairs", "--in", str(pairs), "--out", str(tmp_path / "fb"))
    assert "2 desirable and 2 undesirable" in proc.stderr
    table = pq.read_table(next((tmp_path / "fb").glob("*.parquet")))
    assert table.schema.equals(FEEDBACK) and table.num_rows == 4
    assert (tmp_path / "fb" / "README.md").exists()  # the dataset card every stage writes
    thumbs = tmp_path / "thumbs.parquet"
    pq.write_table(pa.table({"prompt_id": ["a"], "candidate": ["zero"], "thumbs": [1]}), thumbs)
    bad = run_cli("feedback", "--from", "thumbs", "--in", str(thumbs), "--out", str(tmp_path / "t"), check=False)
    assert bad.returncode != 0 and "candidate" in bad.stderr and "Traceback" not in bad.stderr
