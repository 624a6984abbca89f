"""The agreement report's statistics: the O(n log n) tie threshold against its quadratic definition, and
the stable split of pairs (pinned, so it cannot move with a library version)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.schema import PAIRS, conform
from prefpipe.core.stats import best_tie_threshold, stable_halves, tie_aware_points
from prefpipe.stages.label import agreement_report, relabel_pairs


def quadratic_best_tie_threshold(human, diff) -> float:
    """The definition (the code before issue 15): every candidate scored on every pair; first best wins."""
    candidates = np.unique(np.concatenate([[0.0], np.abs(np.asarray(diff, float))]))
    candidates = np.concatenate([[0.0], np.nextafter(candidates, np.inf)])
    scores = [tie_aware_points(human, diff, t).mean() for t in candidates]
    return float(candidates[int(np.argmax(scores))])


def random_case(rng: np.random.Generator):
    """Human labels of every kind (some splits all ties or none) and scores of several kinds: JPEG-kB-like
    discrete values (many equal |diff|, diff == 0), small integers, continuous draws, with equal pairs mixed in."""
    n = int(rng.integers(1, 80))
    mix = rng.dirichlet(np.ones(3)) if rng.random() < 0.8 else np.eye(3)[rng.integers(3)]
    human = rng.choice([0.0, 0.5, 1.0], size=n, p=mix)
    kind = rng.integers(4)
    if kind == 0:  # compressibility: -kB with 3 decimals, few distinct sizes
        s0, s1 = -rng.integers(1000, 1012, n) / 1000, -rng.integers(1000, 1012, n) / 1000
    elif kind == 1:  # small integers: ties in |diff| everywhere, symmetric +-d
        s0, s1 = rng.integers(-3, 4, n).astype(float), rng.integers(-3, 4, n).astype(float)
    elif kind == 2:  # continuous, float32 as relabel stores them
        s0, s1 = rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)
    else:  # continuous with some exactly equal pairs
        s0 = rng.normal(size=n)
        s1 = np.where(rng.random(n) < 0.3, s0, rng.normal(size=n))
    # scores correlated with the human label, so the best threshold is not always the first candidate
    lean = np.where(human == 1.0, 1, np.where(human == 0.0, -1, 0)) * rng.uniform(0, 2)
    diff = np.asarray(s0, float) - np.asarray(s1, float) + (lean * (kind >= 2))
    return human, diff


def test_fast_threshold_equals_the_quadratic_definition_on_random_data():
    rng = np.random.default_rng(15)
    for case in range(3000):
        human, diff = random_case(rng)
        fast, slow = best_tie_threshold(human, diff), quadratic_best_tie_threshold(human, diff)
        assert fast == slow, (case, human.tolist(), diff.tolist())


@pytest.mark.parametrize("human, diff", [
    ([1.0, 0.0, 0.5, 0.5, 1.0], [2.0, 0.1, 0.05, 3.0, -1.0]),
    ([0.5, 0.5, 0.5], [0.0, 0.0, 0.0]),  # all ties, all equal: the first candidate just above 0
    ([1.0, 0.0], [0.0, -0.0]),
    ([1.0, 1.0, 0.0, 0.5], [0.5, -0.5, 0.5, -0.5]),  # one |diff| for all
    ([1.0, 0.5, 0.0], [np.inf, 1.0, -np.inf]),
    ([1.0, 0.5, 0.0, 0.5], [np.nan, 1.0, -2.0, np.nan]),
    ([0.5], [5e-324]),  # the smallest subnormal
])
def test_fast_threshold_equals_the_definition_on_edge_cases(human, diff):
    human, diff = np.array(human), np.array(diff)
    assert best_tie_threshold(human, diff) == quadratic_best_tie_threshold(human, diff)


def test_fast_threshold_handles_no_pairs():
    assert best_tie_threshold(np.array([]), np.array([])) == 0.0


def test_stable_halves_are_pinned():
    keys = ["u0au0bprompt 0", "u1au1bprompt 1", "u2au2bprompt 2", "u3au3bprompt 3", "A0A1a red cat",
            "B0B1a blue dog", "", "\u00e9\U0001f431", "prompt only"]
    # the first bit of sha256(key): c8 ab c6 8a 0a 36 e3 ef 3b (first digest bytes)
    assert stable_halves(keys).tolist() == [1, 1, 1, 1, 0, 0, 1, 1, 0]
    assert abs(stable_halves(f"k{i}" for i in range(20_000)).mean() - 0.5) < 0.02


def test_agreement_report_chooses_on_half_0_and_reports_on_half_1(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    human = rng.choice([0.0, 0.5, 1.0], size=n)
    s0 = rng.normal(size=n).astype(np.float32)
    s1 = (s0 - (human - 0.5) * rng.uniform(0, 1, n)).astype(np.float32)
    uid0, uid1, captions = [f"a{i}" for i in range(n)], [f"b{i}" for i in range(n)], [f"prompt {i % 37}" for i in range(n)]
    uid0[3] = None  # a missing uid counts as ""
    (tmp_path / "relabel").mkdir()
    pq.write_table(pa.table({"caption": captions, "image_0_uid": uid0, "image_1_uid": uid1, "label_0": human,
                             "s_score_0": s0, "s_score_1": s1}), tmp_path / "relabel" / "part-00000.parquet")
    report = agreement_report(tmp_path / "relabel", ["s"])["scorers"]["s"]
    split = stable_halves((u0 or "") + u1 + c for u0, u1, c in zip(uid0, uid1, captions))
    a, b = split == 0, split == 1
    diff = s0.astype(float) - s1.astype(float)
    assert report["tie_threshold_split_pairs"] == a.sum() and report["tie_aware_split_pairs"] == b.sum()
    assert report["tie_threshold"] == quadratic_best_tie_threshold(human[a], diff[a])
    assert report["tie_aware_accuracy"] == pytest.approx(tie_aware_points(human[b], diff[b], report["tie_threshold"]).mean())


class Brightness:
    """An in-process continuous scorer: the mean pixel value."""

    name, version, higher_is_better = "brightness", "test", True

    def score(self, images, prompts):
        return np.array([np.asarray(im.convert("RGB"), np.float32).mean() for im in images], np.float32)


def test_relabel_takes_scorers_built_in_process(tmp_path):
    def png(level: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (level, level, level)).save(buf, format="PNG")
        return buf.getvalue()

    rows = [dict(caption=f"p{i}", jpg_0=png(10 * i), jpg_1=png(200 - 10 * i), label_0=1.0 if i < 3 else 0.0,
                 image_0_uid=f"a{i}", image_1_uid=f"b{i}") for i in range(8)]
    (tmp_path / "human").mkdir()
    pq.write_table(conform(pa.Table.from_pylist(rows), PAIRS), tmp_path / "human" / "train-00000-of-00001.parquet")
    with pytest.raises(PrefpipeError, match="do not match"):
        relabel_pairs(tmp_path / "human", tmp_path / "bad", ["compressibility"], {}, progress=False, scorers=[Brightness()])
    ds = relabel_pairs(tmp_path / "human", tmp_path / "relabel", ["brightness"], {}, progress=False, scorers=[Brightness()])
    report = agreement_report(ds.folder, ["brightness"])["scorers"]["brightness"]
    # image 1 is the brighter in every pair (10 i < 200 - 10 i): the scorer agrees with the 5 humans who chose it
    assert report["non_tie_pairs"] == 8 and report["accuracy_non_tie"] == pytest.approx(5 / 8)
