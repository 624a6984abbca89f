import json

import pytest

from prefpipe.errors import PrefpipeError
from prefpipe.headline import headline


def _report(folder, scorer, win_rate, ci, n, base, tuned):
    folder.mkdir(parents=True)
    results = [{"scorer": scorer, "tuned": "run", "win_rate": win_rate, "win_rate_ci": ci, "n": n,
                "base_mean": base, "tuned_mean": tuned}]
    (folder / "report.json").write_text(json.dumps({"results": results}))


def test_headline_reads_both_reports(tmp_path):
    _report(tmp_path / "eval-compressibility", "compressibility", 0.875, [0.82, 0.91], 224, -1.25, -1.05)
    _report(tmp_path / "eval-incompressibility", "incompressibility", 0.8, [0.74, 0.85], 224, 1.25, 1.4)
    lines = headline(tmp_path, "compressibility", "incompressibility")
    assert "in 87.5% (95% CI 82.0-91.0) of 224 held-out" in lines[0]
    assert "mean compressibility -1.250 -> -1.050" in lines[0]
    assert lines[1].startswith("demo control: DPO on incompressibility pairs") and "80.0%" in lines[1]


def test_headline_without_a_report_says_which_target_to_run(tmp_path):
    with pytest.raises(PrefpipeError, match="make eval SCORER=compressibility"):
        headline(tmp_path, "compressibility", "incompressibility")
