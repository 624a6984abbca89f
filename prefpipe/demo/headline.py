"""`prefpipe demo-headline`: the demo's result in a few lines, read from the two eval reports.

The demo trains twice from the same base and candidates: on the reward's pairs (`--scorer`) and, as the
control, on the opposite reward's pairs (`--control`). Both runs are evaluated *on the reward* (make demo
asks eval for both scorers), so the two lines read on one scale: the reward run should beat the base in
most comparisons, the control in few. The verdict line says whether both 95% intervals sit on their side
of 50%: if they do, the direction of the change came from the labels, not from training noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from prefpipe.core.errors import PrefpipeError

REPORTS = "eval-{run}"  # make demo's eval folders; make d3po-demo's are d3po-{run}/eval
# What the demo aims for on every base-model seed (`make demo-seeds`): the reward arm wins in >= 90% of the
# comparisons with its 95% lower bound above 80%, the control in <= 10%.
GOAL_REWARD, GOAL_REWARD_LOW, GOAL_CONTROL = 0.90, 0.80, 0.10


def read_result(workdir: Path, run: str, scorer: str, reports: str = REPORTS, tuned: str | None = None) -> dict:
    """The result for `scorer` (and the tuned model `tuned`, else the first) in the report of the run
    trained on RUN's pairs: `WORKDIR/<reports with {run}>/report.json`."""
    path = workdir / reports.format(run=run) / "report.json"
    if not path.exists():
        raise PrefpipeError(f"{path}: no eval report; run `make eval SCORER={run}` first")
    report = json.loads(path.read_text())
    results = [r for r in report["results"] if r["scorer"] == scorer and tuned in (None, r.get("tuned"))]
    if not results and tuned is not None and any(r["scorer"] == scorer for r in report["results"]):
        names = sorted({r.get("tuned") for r in report["results"]})
        raise PrefpipeError(f"{path}: no tuned model named {tuned}; the report has {', '.join(map(str, names))}")
    if not results:
        raise PrefpipeError(
            f"{path}: no result for scorer {scorer}; evaluate with both scorers "
            f"(make eval SCORER={run} EVAL_SCORERS=\"{run} {scorer}\")"
        )
    return results[0] | {"report": str(path.with_name("report.html"))}


def verdict(reward: dict, control: dict) -> tuple[bool, str]:
    """(passed, line): the reward run's interval above 50% and the control's below."""
    up = reward["win_rate_ci"][0] > 0.5
    down = control["win_rate_ci"][1] < 0.5
    if up and down:
        return True, "demo verdict: the reward moved the way its labels point, and the opposite labels moved it back"
    parts = []
    if not up:
        parts.append("the reward run's 95% interval reaches 50%")
    if not down:
        parts.append("the control run's 95% interval reaches 50%")
    return False, "demo verdict: NOT shown: " + "; ".join(parts)


def headline(workdir: str | Path, scorer: str, control: str, reports: str = REPORTS, tuned: str | None = None,
             method: str = "DPO") -> tuple[bool, list[str]]:
    workdir = Path(workdir)
    lines = []
    results = {}
    for role, run in (("reward", scorer), ("control", control)):
        r = results[role] = read_result(workdir, run, scorer, reports, tuned)
        lo, hi = r["win_rate_ci"]
        lines.append(
            f"demo {role}: {method} on {run} pairs -> tuned beats base on {scorer} in {100 * r['win_rate']:.1f}% "
            f"(95% CI {100 * lo:.1f}-{100 * hi:.1f}) of {r['n']} held-out (prompt, seed) comparisons; "
            f"mean {scorer} {r['base_mean']:.4f} (base) -> {r['tuned_mean']:.4f} (tuned)"
        )
    passed, line = verdict(results["reward"], results["control"])
    lines.append(line)
    lines.append(f"demo: reports {results['reward']['report']} and {results['control']['report']}")
    return passed, lines


def meets_goal(reward: dict, control: dict) -> bool:
    return (reward["win_rate"] >= GOAL_REWARD and reward["win_rate_ci"][0] > GOAL_REWARD_LOW
            and control["win_rate"] <= GOAL_CONTROL)


def seeds_table(workdir: str, seeds: list[int], scorer: str, control: str, reports: str = REPORTS,
                tuned: str | None = None) -> tuple[bool, list[str]]:
    """One row per base-model seed (`workdir` with `{seed}` standing for it), then the spread: (every
    seed's verdict holds, lines of a markdown table)."""
    if "{seed}" not in workdir:
        raise PrefpipeError(f"--workdir {workdir}: with --seeds, write {{seed}} where the seed goes (work/demo-seed-{{seed}})")
    lines = [
        f"| seed | reward arm: wins on {scorer} [95% CI] | control: wins on {scorer} [95% CI] | "
        f"Δ mean {scorer} (reward / control) | verdict | goal (>= {GOAL_REWARD:.0%}, low > {GOAL_REWARD_LOW:.0%}; "
        f"control <= {GOAL_CONTROL:.0%}) |",
        "|---|---|---|---|---|---|",
    ]
    rates: dict[str, list[float]] = {"reward": [], "control": []}
    every = True
    for seed in seeds:
        path = Path(workdir.format(seed=seed))
        reward, ctrl = (read_result(path, run, scorer, reports, tuned) for run in (scorer, control))
        passed, _ = verdict(reward, ctrl)
        every &= passed
        cells = []
        for role, r in (("reward", reward), ("control", ctrl)):
            rates[role].append(r["win_rate"])
            lo, hi = r["win_rate_ci"]
            cells.append(f"{100 * r['win_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]")
        delta = " / ".join(f"{r['tuned_mean'] - r['base_mean']:+.4f}" for r in (reward, ctrl))
        lines.append(f"| {seed} | {cells[0]} | {cells[1]} | {delta} | {'shown' if passed else 'NOT shown'} | "
                     f"{'met' if meets_goal(reward, ctrl) else 'missed'} |")
    for role, values in rates.items():
        lines.append(f"demo seeds: {role} arm wins {100 * min(values):.1f}-{100 * max(values):.1f}% over "
                     f"{len(values)} seeds (mean {100 * sum(values) / len(values):.1f}%)")
    return every, lines


@click.command("demo-headline")
@click.option("--workdir", default="work/demo", show_default=True, type=click.Path())
@click.option("--scorer", default="compressibility", show_default=True, help="The reward the demo trained on.")
@click.option("--control", default="incompressibility", show_default=True, help="The opposite reward (the control run).")
@click.option("--reports", default=REPORTS, show_default=True,
              help="Each arm's eval folder under WORKDIR, {run} standing for the reward it trained on.")
@click.option("--tuned", default=None, help="The tuned model's name in the reports [default: the first].")
@click.option("--method", default="DPO", show_default=True, help="How the arms trained (printed).")
@click.option("--seeds", default=None, metavar="K,K,...",
              help="Base-model seeds (make demo-seeds): one table row per seed, read from WORKDIR with {seed} "
                   "standing for it.")
@click.option("--check", is_flag=True, help="Exit with status 1 unless the verdict holds (with --seeds: on every seed).")
def demo_headline(workdir, scorer, control, reports, tuned, method, seeds, check):
    """Print the demo's headline: win rate on the reward of the run tuned on it and of the control run
    tuned on the opposite reward, over held-out prompts and seeds, and the verdict."""
    if seeds is not None:
        try:
            seed_list = [int(k) for k in seeds.replace(",", " ").split()]
        except ValueError:
            raise PrefpipeError(f"--seeds {seeds}: integers separated by commas (0,1,2)") from None
        if not seed_list:
            raise PrefpipeError("--seeds: no seed given")
        passed, lines = seeds_table(workdir, seed_list, scorer, control, reports, tuned)
    else:
        passed, lines = headline(workdir, scorer, control, reports, tuned, method)
    for line in lines:
        click.echo(line)
    if check and not passed:
        raise SystemExit(1)
