import json

import pytest

from prefpipe.core.errors import PrefpipeError
from prefpipe.demo.headline import demo_headline, headline, seeds_table


def _report(folder, results):
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"results": results}))


def _result(scorer, win_rate, ci, n, base, tuned):
    return {"scorer": scorer, "tuned": "run", "win_rate": win_rate, "win_rate_ci": ci, "n": n,
            "base_mean": base, "tuned_mean": tuned}


def test_headline_reads_both_runs_on_the_reward_scale(tmp_path):
    _report(tmp_path / "eval-compressibility", [_result("compressibility", 0.875, [0.82, 0.91], 224, -1.25, -1.05),
                                                _result("incompressibility", 0.125, [0.09, 0.18], 224, 1.25, 1.05)])
    _report(tmp_path / "eval-incompressibility", [_result("incompressibility", 0.8, [0.74, 0.85], 224, 1.25, 1.4),
                                                  _result("compressibility", 0.2, [0.15, 0.26], 224, -1.25, -1.4)])
    passed, lines = headline(tmp_path, "compressibility", "incompressibility")
    assert passed
    assert "beats base on compressibility in 87.5% (95% CI 82.0-91.0) of 224 held-out" in lines[0]
    assert "mean compressibility -1.2500 (base) -> -1.0500 (tuned)" in lines[0]
    assert lines[1].startswith("demo control: DPO on incompressibility pairs -> tuned beats base on compressibility in 20.0%")
    assert "moved the way its labels point" in lines[2]


@pytest.mark.parametrize("reward_ci, control_ci, why", [
    ([0.45, 0.6], [0.1, 0.3], "reward run's 95% interval reaches 50%"),
    ([0.6, 0.7], [0.4, 0.55], "control run's 95% interval reaches 50%"),
])
def test_verdict_fails_when_an_interval_reaches_one_half(tmp_path, reward_ci, control_ci, why):
    _report(tmp_path / "eval-compressibility", [_result("compressibility", sum(reward_ci) / 2, reward_ci, 50, -1, -1)])
    _report(tmp_path / "eval-incompressibility", [_result("compressibility", sum(control_ci) / 2, control_ci, 50, -1, -1)])
    passed, lines = headline(tmp_path, "compressibility", "incompressibility")
    assert not passed and "NOT shown" in lines[2] and why in lines[2]


def test_headline_without_a_report_says_which_target_to_run(tmp_path):
    with pytest.raises(PrefpipeError, match="make eval SCORER=compressibility"):
        headline(tmp_path, "compressibility", "incompressibility")


def test_control_report_without_the_reward_scorer_says_how_to_evaluate(tmp_path):
    _report(tmp_path / "eval-compressibility", [_result("compressibility", 0.8, [0.7, 0.9], 50, -1, -1)])
    _report(tmp_path / "eval-incompressibility", [_result("incompressibility", 0.8, [0.7, 0.9], 50, 1, 1)])
    with pytest.raises(PrefpipeError, match='EVAL_SCORERS="incompressibility compressibility"'):
        headline(tmp_path, "compressibility", "incompressibility")


def test_headline_picks_the_named_tuned_model_from_a_multi_run_report(tmp_path):
    def arm(folder, up):
        folder.mkdir(parents=True)
        rs = [dict(_result("compressibility", w, [w - 0.05, w + 0.05], 100, -1, -1), tuned=name)
              for name, w in (("round-1", 0.55 if up else 0.45), ("round-2", 0.8 if up else 0.2))]
        (folder / "report.json").write_text(json.dumps({"results": rs}))

    arm(tmp_path / "d3po-compressibility" / "eval", True)
    arm(tmp_path / "d3po-incompressibility" / "eval", False)
    passed, lines = headline(tmp_path, "compressibility", "incompressibility", "d3po-{run}/eval", "round-2", "D3PO")
    assert passed and "D3PO on compressibility pairs" in lines[0] and "in 80.0%" in lines[0] and "in 20.0%" in lines[1]
    with pytest.raises(PrefpipeError, match="no tuned model named round-3; the report has round-1, round-2"):
        headline(tmp_path, "compressibility", "incompressibility", "d3po-{run}/eval", "round-3")


def test_seeds_table_has_a_row_per_seed_the_spread_and_fails_check_when_a_seed_fails(tmp_path):
    from click.testing import CliRunner

    for seed, (up, down) in enumerate(((0.93, 0.05), (0.88, 0.12), (0.6, 0.55))):
        arm = tmp_path / f"demo-seed-{seed}"
        _report(arm / "eval-compressibility", [_result("compressibility", up, [up - 0.04, up + 0.03], 224, -1.2, -1.1)])
        _report(arm / "eval-incompressibility", [_result("compressibility", down, [down - 0.03, down + 0.04], 224, -1.2, -1.3)])
    pattern = str(tmp_path / "demo-seed-{seed}")
    passed, lines = seeds_table(pattern, [0, 1], "compressibility", "incompressibility")
    assert passed and len(lines) == 2 + 2 + 2
    assert lines[2].startswith("| 0 | 93.0% [89.0, 96.0] | 5.0% [2.0, 9.0] | +0.1000 / -0.1000 | shown | met |")
    assert lines[3].endswith("| shown | missed |")  # 88% < 90%, control 12% > 10%
    assert lines[4] == "demo seeds: reward arm wins 88.0-93.0% over 2 seeds (mean 90.5%)"
    result = CliRunner().invoke(demo_headline, ["--workdir", pattern, "--seeds", "0,1,2", "--check"])
    assert result.exit_code == 1 and "| 2 | 60.0%" in result.output and "NOT shown" in result.output
    result = CliRunner().invoke(demo_headline, ["--workdir", str(tmp_path), "--seeds", "0"])
    assert isinstance(result.exception, PrefpipeError) and "{seed}" in str(result.exception)
