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


@click.command("demo-headline")
@click.option("--workdir", default="work/demo", show_default=True, type=click.Path())
@click.option("--scorer", default="compressibility", show_default=True, help="The reward the demo trained on.")
@click.option("--control", default="incompressibility", show_default=True, help="The opposite reward (the control run).")
@click.option("--reports", default=REPORTS, show_default=True,
              help="Each arm's eval folder under WORKDIR, {run} standing for the reward it trained on.")
@click.option("--tuned", default=None, help="The tuned model's name in the reports [default: the first].")
@click.option("--method", default="DPO", show_default=True, help="How the arms trained (printed).")
@click.option("--check", is_flag=True, help="Exit with status 1 unless the verdict holds.")
def demo_headline(workdir, scorer, control, reports, tuned, method, check):
    """Print the demo's headline: win rate on the reward of the run tuned on it and of the control run
    tuned on the opposite reward, over held-out prompts and seeds, and the verdict."""
    passed, lines = headline(workdir, scorer, control, reports, tuned, method)
    for line in lines:
        click.echo(line)
    if check and not passed:
        raise SystemExit(1)
