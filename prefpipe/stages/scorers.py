"""`prefpipe scorers`: every scorer `prefpipe label --scorer` accepts, where it comes from and its version.

Built-ins come with prefpipe; plugins are entry points of the group `prefpipe.scorers` (see
`labelers.base.BaseScorer`). A plugin that fails to import is listed with the reason, not a traceback.
"""

from __future__ import annotations

import json

import click

from labelers.registry import available_scorers, scorer_class
from prefpipe.core.errors import PrefpipeError


def scorer_rows() -> list[dict]:
    """One dict per registered scorer: name, source, version, target, higher_is_better, default_weights, status."""
    rows = []
    for entry in available_scorers():
        row = {"name": entry.name, "source": entry.source, "version": entry.version, "target": entry.target,
               "higher_is_better": None, "default_weights": None, "status": "ok"}
        if entry.shadowed_by is not None:
            row["status"] = f"not used: the name is taken by {entry.shadowed_by}"
        else:
            try:
                cls = scorer_class(entry.name)
                row["higher_is_better"] = bool(getattr(cls, "higher_is_better", True))
                row["default_weights"] = getattr(cls, "default_weights", None)
            except PrefpipeError as err:
                row["status"] = str(err)
        rows.append(row)
    return rows


@click.command("scorers")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def scorers_command(as_json: bool) -> None:
    """List every available scorer: built-in or the plugin distribution that registered it, and its version."""
    rows = scorer_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("name", "source", "version", "higher is better", "default weights")
    table = [header] + [
        (r["name"], r["source"], r["version"],
         "-" if r["higher_is_better"] is None else ("yes" if r["higher_is_better"] else "no"),
         r["default_weights"] or "-")
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    for line in table:
        click.echo("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip())
    for r in rows:
        if r["status"] != "ok":
            click.echo(f"note: {r['name']} ({r['source']}): {r['status']}")
