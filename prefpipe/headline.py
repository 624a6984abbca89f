"""`prefpipe demo-headline`: the demo's result in three lines, read from the two eval reports."""

from __future__ import annotations

import json
from pathlib import Path

import click

from prefpipe.errors import PrefpipeError


def read_result(workdir: Path, scorer: str) -> dict:
    """The (scorer, tuned run) result of `WORKDIR/eval-SCORER/report.json`, plus the report's path."""
    path = workdir / f"eval-{scorer}" / "report.json"
    if not path.exists():
        raise PrefpipeError(f"{path}: no eval report; run `make eval SCORER={scorer}` first")
    report = json.loads(path.read_text())
    results = [r for r in report["results"] if r["scorer"] == scorer]
    if not results:
        raise PrefpipeError(f"{path}: no result for scorer {scorer}")
    return results[0] | {"report": str(path.with_name("report.html"))}


def headline(workdir: str | Path, scorer: str, control: str) -> list[str]:
    workdir = Path(workdir)
    lines = []
    for role, name in (("reward", scorer), ("control", control)):
        r = read_result(workdir, name)
        lo, hi = r["win_rate_ci"]
        lines.append(
            f"demo {role}: DPO on {name} pairs -> tuned beats base on {name} in {100 * r['win_rate']:.1f}% "
            f"(95% CI {100 * lo:.1f}-{100 * hi:.1f}) of {r['n']} held-out (prompt, seed) comparisons; "
            f"mean {name} {r['base_mean']:.3f} -> {r['tuned_mean']:.3f}"
        )
    lines.append(f"demo: reports {read_result(workdir, scorer)['report']} and {read_result(workdir, control)['report']}")
    return lines


@click.command("demo-headline")
@click.option("--workdir", default="work/demo", show_default=True, type=click.Path())
@click.option("--scorer", default="compressibility", show_default=True, help="The reward the demo trained on.")
@click.option("--control", default="incompressibility", show_default=True, help="The opposite reward (the control run).")
def demo_headline(workdir, scorer, control):
    """Print the demo's headline: win rate of tuned over base on held-out prompts and seeds, for the
    reward and for the control trained on the opposite reward."""
    for line in headline(workdir, scorer, control):
        click.echo(line)
