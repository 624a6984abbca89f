"""The reduced demo: `make demo` itself, with fewer steps, must move the reward the way the labels point.

This runs the Makefile's own chain (demo-model -> generate -> two arms of label -> train -> eval ->
demo-headline) as a user would, on a smaller base model and fewer prompts, seeds and DPO steps. A sign
error anywhere (scorer, pair order, loss, LoRA export, eval comparison) turns one of the two assertions:
the run trained on compressibility pairs must beat the base on compressibility with its whole 95% Wilson
interval above 50%, and the control trained on incompressibility pairs must lose with its interval below.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_make

pytestmark = pytest.mark.slow

# The reduced settings (the full demo: README). Measured here: see the closing note of issue 7.
REDUCED = {
    "DEMO_ARGS": "--steps-vae 150 --steps-unet 200 --no-progress",
    "PER_PROMPT": "4",
    "EVAL_PER_PROMPT": "8",
    "TRAIN_ARGS": "--beta 500 --learning-rate 1e-3 --lora-rank 8 --lora-targets attn,ff,conv --batch-size 32 "
                  "--max-steps 100 --checkpoint-every 0 --no-progress",
}


@pytest.fixture(scope="module")
def reduced_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    proc = run_make("demo", WORKDIR=str(workdir), **REDUCED, timeout=1500)
    return workdir, proc


def _result(workdir, arm: str, scorer: str) -> dict:
    report = json.loads((workdir / f"eval-{arm}" / "report.json").read_text())
    (result,) = [r for r in report["results"] if r["scorer"] == scorer]
    return result


def test_reduced_demo_moves_the_reward_the_labelled_way_and_the_control_the_other(reduced_demo):
    workdir, proc = reduced_demo
    assert proc.returncode == 0, f"make demo failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    reward = _result(workdir, "compressibility", "compressibility")
    control = _result(workdir, "incompressibility", "compressibility")
    # 14 held-out prompts x 8 seeds, none of them trained on
    assert reward["n"] == control["n"] == 14 * 8
    assert reward["win_rate_ci"][0] > 0.5, reward
    assert control["win_rate_ci"][1] < 0.5, control
    assert reward["tuned_mean"] > reward["base_mean"] > control["tuned_mean"]
    # the control arm's own reward moved its way too (its eval scored it with both)
    assert _result(workdir, "incompressibility", "incompressibility")["win_rate_ci"][0] > 0.5
    # the headline printed by make demo says the same
    assert "demo verdict: the reward moved the way its labels point" in proc.stdout


def test_reduced_demo_held_out_prompts_were_never_trained_on(reduced_demo):
    workdir, proc = reduced_demo
    assert proc.returncode == 0
    train = set((workdir / "prompts" / "train.txt").read_text().splitlines())
    held_out = set((workdir / "prompts" / "held_out.txt").read_text().splitlines())
    assert train and held_out and not train & held_out
    prompts = json.loads((workdir / "eval-compressibility" / "report.json").read_text())["prompts"]
    # eval read the held-out file, knew the training pairs' 76 prompts, and none had to be removed
    assert prompts["count"] == len(held_out) and prompts["training_prompts"] == len(train), prompts
    assert prompts["removed_by_holdout"] == 0, prompts


def test_stages_chain_by_their_folders_so_a_second_run_redoes_nothing(reduced_demo):
    workdir, proc = reduced_demo
    assert proc.returncode == 0
    for scorer in ("compressibility", "incompressibility"):
        q = run_make("-q", "eval", WORKDIR=str(workdir), SCORER=scorer, **REDUCED, timeout=1500)
        assert q.returncode == 0, f"make eval SCORER={scorer} is not up to date after make demo:\n{q.stdout}{q.stderr}"
    # a later stage after an earlier one: `make train` has nothing to do, and says what it would run: nothing
    dry = run_make("-n", "train", WORKDIR=str(workdir), SCORER="compressibility", **REDUCED, timeout=1500)
    assert dry.returncode == 0 and "prefpipe" not in dry.stdout, dry.stdout
