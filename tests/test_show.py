"""The pairs gallery (`prefpipe show`): lazy, uniform pair sampling and the page's cards (winner, scores,
source, AI-human agreement)."""

import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from prefpipe.stages.eval.show import agreement, sample_locations, sample_pairs, write_gallery
from tests.test_eval import png, write_pairs


# -- helpers (also used by test_report_browser.py) ----------------------------------------------
def pair_rows(n=11):
    colors = ["red", "green", "blue", "white", "black", "yellow", "purple", "orange", "gray", "cyan", "pink"]
    rows, ai = [], []
    for i in range(n):
        label = [1.0, 0.0, 0.5][i % 3]
        human = i % 2 == 0
        rows.append(dict(caption=f"caption {i}", jpg_0=png(colors[i % 11]), jpg_1=png(colors[(i + 1) % 11], (32, 16)),
                         label_0=label, label_1=1 - label, source="human" if human else "ai",
                         scorer=None if human else "pickscore", score_0=None if human else 21.5 + i,
                         score_1=None if human else 20.0, margin=None if human else 1.5 + i, prompt_id=f"p{i}"))
        ai.append([1.0, 1.0, 0.0][i % 3] if human else None)  # an AI relabel of the human rows
    rows[5]["jpg_1"] = b"not an image"
    return rows, ai


# -- sampling and the page ----------------------------------------------------------------------
def test_pair_sampling_is_uniform_distinct_deterministic_and_reads_only_sampled_row_groups(tmp_path, monkeypatch):
    counts = [(0, 0, 3), (0, 1, 3), (1, 0, 5), (2, 0, 0), (2, 1, 1)]
    picks = sample_locations(counts, 6, seed=3)
    flat = [(f, g, r) for f, g, rows in picks for r in rows]
    assert len(flat) == len(set(flat)) == 6
    assert all(r < dict(((f, g), n) for f, g, n in counts)[(f, g)] for f, g, r in flat)
    assert picks == sample_locations(counts, 6, seed=3) and picks != sample_locations(counts, 6, seed=4)
    everything = sample_locations(counts, 100, seed=0)
    assert sum(len(rows) for *_, rows in everything) == 12
    hits = np.zeros(12)
    for s in range(600):
        for f, g, rows in sample_locations(counts, 2, seed=s):
            start = {(0, 0): 0, (0, 1): 3, (1, 0): 6, (2, 1): 11}[(f, g)]
            hits[[start + r for r in rows]] += 1
    assert hits.min() > 50 and hits.max() < 150  # each of 12 rows drawn about 600 * 2 / 12 = 100 times

    rows, ai = pair_rows()
    folder = write_pairs(tmp_path / "pairs", rows, extra={"ai_label_0": ai})
    read_groups = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read the whole file"))
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, **k: read_groups.append(i) or real(self, i, **k))
    sample, total, n_files = sample_pairs(folder, 3, seed=1)
    assert total == 11 and n_files == 2 and len(sample) == 3
    assert len(read_groups) <= 3  # at most one row group per sampled row, never a whole file
    assert len({r["caption"] for r in sample}) == 3


def test_pairs_gallery_marks_winner_scores_source_and_ai_human_agreement(tmp_path):
    rows, ai = pair_rows()
    folder = write_pairs(tmp_path / "pairs", rows, extra={"ai_label_0": ai})
    out = tmp_path / "g" / "gallery.html"
    counters = write_gallery(folder, out, sample=50, seed=0)
    html = out.read_text()
    assert counters["sampled"] == counters["total"] == 11 and counters["bad_rows"] == 1
    assert counters["sources"] == {"human": 6, "ai": 5}
    # human rows 0, 2, 4, 6, 8, 10: labels 1, 0.5, 0, 1, 0.5, 0 against AI 1, 0, 1, 1, 0, 1
    assert (counters["agree"], counters["disagree"], counters["one_tie"]) == (2, 2, 2)
    assert all(f"caption {i}" in html for i in range(11))
    assert html.count('class="badge win"') == 8  # every row but the 3 ties (i % 3 == 2) has a winner
    assert "AI agrees with human" in html and "AI disagrees with human" in html and "undecodable image" in html
    assert "margin 6.5" in html and "score 26.5" in html and "scorer pickscore" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert agreement({"label_0": 1.0, "source": "human", "score_0": 1.0, "score_1": 2.0}) == "disagree"
    assert agreement({"label_0": 1.0, "source": "ai", "score_0": 1.0, "score_1": 2.0}) is None
