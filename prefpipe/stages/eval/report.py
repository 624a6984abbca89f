"""What eval shows: PNG plots (matplotlib, no display), the text table, report.md, and a self-contained report.html.

- `plots/scores_<scorer>.png`: the score distribution of base and each tuned run (same prompts and seeds),
  medians dashed.
- `plots/win_rate.png`: win rate of each tuned run over base per scorer, with 95% Wilson interval bars.
- `plots/curves.png`: the training curves of the runs' `metrics.jsonl` (when a run folder has one), drawn by
  the one training-curve plotter (`trainer.curves`), with each evaluated checkpoint's step marked.
- `report.html` (template `templates/report.html`): the tables, the plots and a gallery (one card per prompt:
  base and tuned images side by side, seed by seed, with every score); a few lines of inline JS sort the
  cards by score gain. Images are embedded as data URIs, so the page opens from disk with no server and no
  network.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from prefpipe.core.files import write_atomic
from prefpipe.core.images import BadImage
from prefpipe.stages.eval.pages import DISPLAY_PX, fmt, image_data_uri, pct, png_data_uri, render, signed

CHECKPOINT_STEP = re.compile(r"(?:checkpoint|step|ckpt)[-_]?(\d+)$")  # the step in a run's name, marked on the curves
STAT_HEADER = ["model", "win rate vs base [95% CI]", "per prompt [95% CI]", "W/T/L", "mean", "median", "Δ mean", "Δ median"]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _way(higher_is_better: bool) -> str:
    return "higher is better" if higher_is_better else "lower is better"


# -- plots --------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_score_distributions(scores, scorer: str, models: list[str], higher_is_better: bool, path: Path) -> None:
    """Histogram of each model's scores (same bins), dashed line at each median."""
    import polars as pl

    values = {m: scores.filter((pl.col("model") == m) & (pl.col("scorer") == scorer))["score"].to_numpy() for m in models}
    every = np.concatenate([v for v in values.values() if len(v)] or [np.zeros(1)])
    lo, hi = float(every.min()), float(every.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, int(np.clip(math.sqrt(len(every)) * 2, 10, 50)) + 1)
    fig = _figure(7.5, 4)
    ax = fig.add_subplot()
    for color, (m, v) in zip(_colors(len(models)), values.items()):
        if not len(v):
            continue
        med = float(np.median(v))
        ax.hist(v, bins=bins, histtype="step", linewidth=2 if m == "base" else 1.6, color=color,
                label=f"{m}: median {med:.4g}, mean {float(v.mean()):.4g}")
        ax.axvline(med, color=color, linestyle="--", linewidth=1)
    ax.set_xlabel(f"{scorer} score ({_way(higher_is_better)})")
    ax.set_ylabel("images")
    ax.set_title(f"{scorer}: base vs tuned on the same prompts and seeds")
    ax.legend(fontsize=8)
    fig.savefig(path)


def plot_win_rates(results: list[dict], scorers: list[str], path: Path) -> None:
    """Win rate of each tuned run over base, one panel per scorer, with 95% interval bars."""
    ncols = min(3, len(scorers))
    nrows = -(-len(scorers) // ncols)
    tuned = list(dict.fromkeys(r["tuned"] for r in results))
    fig = _figure(max(4.0, 1.2 + 0.9 * len(tuned)) * ncols, 3.6 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, scorer in zip(axes, scorers):
        rows = [r for r in results if r["scorer"] == scorer]
        x = np.arange(len(rows))
        rate = np.array([r["win_rate"] if r["win_rate"] is not None else np.nan for r in rows], float)
        low = np.array([r["win_rate_ci"][0] for r in rows], float)
        high = np.array([r["win_rate_ci"][1] for r in rows], float)
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.errorbar(x, rate, yerr=[np.clip(rate - low, 0, None), np.clip(high - rate, 0, None)], fmt="o",
                    capsize=5, color="#3b6fd8", markersize=7)
        for xi, r in zip(x, rate):
            if math.isfinite(r):
                ax.annotate(f"{100 * r:.0f}%", (xi, r), textcoords="offset points", xytext=(9, -3), fontsize=8)
        ax.set_xticks(x, [f"{r['tuned']}\nn={r['n']}" for r in rows], rotation=30 if len(rows) > 3 else 0,
                      ha="right" if len(rows) > 3 else "center")
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_ylim(0, 1)
        ax.set_ylabel("win rate over base")
        ax.set_title(scorer)
    for ax in axes[len(scorers):]:
        ax.set_visible(False)
    fig.suptitle("Tuned vs base, same prompt and seed (ties count half; 95% Wilson intervals)", fontsize=10)
    fig.savefig(path)


def plot_run_curves(tuned: list[dict], path: Path) -> bool:
    """The training curves of each distinct metrics.jsonl of the tuned runs (label: the runs sharing it), each
    run's checkpoint step marked; False (nothing written) when no run has curves to draw."""
    from trainer.curves import plot_training_curves, read_metrics

    names: dict[str, list[str]] = {}
    for run in tuned:
        if run.get("metrics"):
            names.setdefault(str(Path(run["metrics"]).resolve()), []).append(run["name"])
    runs = {", ".join(ns): read_metrics(f) for f, ns in names.items()}
    marks = {", ".join(ns): [int(m.group(1)) for m in map(CHECKPOINT_STEP.search, ns) if m] for ns in names.values()}
    return plot_training_curves(runs, path, marks)


def write_plots(report: dict, scores, out: Path) -> dict[str, str]:
    """Every plot of the report into `out/plots/`; returns {plot name: path relative to out}."""
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    models = [report["base"]["name"]] + [t["name"] for t in report["tuned"]]
    scorers = [s["name"] for s in report["scorers"]]
    made = {}
    for s in report["scorers"]:
        name = f"scores_{_safe(s['name'])}"
        plot_score_distributions(scores, s["name"], models, s["higher_is_better"], plots_dir / f"{name}.png")
        made[name] = f"plots/{name}.png"
    plot_win_rates(report["results"], scorers, plots_dir / "win_rate.png")
    made["win_rate"] = "plots/win_rate.png"
    curves = plots_dir / "curves.png"
    if plot_run_curves(report["tuned"], curves):
        made["curves"] = "plots/curves.png"
    else:
        curves.unlink(missing_ok=True)
    return made


# -- text, markdown -----------------------------------------------------------------------------
def _stat_rows(report: dict, scorer: str) -> list[list[str]]:
    rows = [r for r in report["results"] if r["scorer"] == scorer]
    if not rows:
        return []
    first = rows[0]
    table = [["base", "", "", "", fmt(first["base_mean"]), fmt(first["base_median"]), "", ""]]
    for r in rows:
        lo, hi = r["win_rate_ci"]
        plo, phi = r["prompt_win_rate_ci"]
        table.append([
            r["tuned"], f"{pct(r['win_rate'])} [{pct(lo)}, {pct(hi)}]",
            f"{pct(r['prompt_win_rate'])} [{pct(plo)}, {pct(phi)}]", f"{r['wins']}/{r['ties']}/{r['losses']}",
            fmt(r["tuned_mean"]), fmt(r["tuned_median"]), signed(r["mean_diff"]), signed(r["median_diff"]),
        ])
    return table


def text_table(report: dict) -> str:
    """The results as aligned plain text (printed at the end of eval)."""
    lines = []
    for s in report["scorers"]:
        lines.append(f"{s['name']} ({_way(s['higher_is_better'])}):")
        table = [STAT_HEADER] + _stat_rows(report, s["name"])
        widths = [max(len(row[i]) for row in table) for i in range(len(STAT_HEADER))]
        for row in table:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _describe(report: dict) -> list[str]:
    p, g = report["prompts"], report["generation"]
    held = ""
    if p["holdout"]:
        held = f"; {p['removed_by_holdout']} removed as training prompts ({p['training_prompts']} distinct in {', '.join(p['holdout'])})"
    gen = [f"{g['per_prompt']} images (seeds) per prompt", f"seed {g['seed']}"]
    for key in ("steps", "guidance", "size", "scheduler", "negative_prompt"):
        if g.get(key) is not None:
            gen.append(f"{key.replace('_', ' ')} {g[key]}")
    return [
        f"base: {report['base']['model']}",
        "tuned: " + ", ".join(f"{t['name']} ({t['kind']}, {t['path']})" for t in report["tuned"]),
        f"prompts: {p['count']} from {p['source']} ({p['read']} distinct in the file{held}; list in {p['file']})",
        "generation: " + ", ".join(gen),
        "scorers: " + ", ".join(
            f"{s['name']} ({s['version'] or 'unversioned'}{', weights ' + s['weights'] if s['weights'] else ''})"
            for s in report["scorers"]
        ),
    ]


def _selection_line(report: dict, scorer: str) -> str:
    sel = report["selection"].get(scorer)
    if not sel or sel["best"] is None:
        return ""
    verdict = "better than" if sel["best_beats_base"] else "not better than"
    return (f"Checkpoint selection (best median {scorer}, as in Diffusion-DPO): {sel['best']} "
            f"(median {fmt(sel['best_median'])}, {verdict} base's {fmt(sel['base_median'])})")


def write_markdown(report: dict, path: Path) -> None:
    md = ["# prefpipe eval: tuned vs base", "", f"**{report['headline']}**", ""]
    md += [f"- {line}" for line in _describe(report)] + [""]
    md.append("Win rate: share of (prompt, seed) pairs where the tuned image scores better than the base image "
              "(ties count half), with a 95% Wilson interval; per prompt: the same on each prompt's mean score.")
    for s in report["scorers"]:
        md += ["", f"## {s['name']} ({_way(s['higher_is_better'])})", "", "| " + " | ".join(STAT_HEADER) + " |",
               "|" + "---|" * len(STAT_HEADER)]
        md += ["| " + " | ".join(row) + " |" for row in _stat_rows(report, s["name"])]
        line = _selection_line(report, s["name"])
        if line:
            md += ["", line]
        plot = report["files"]["plots"].get(f"scores_{_safe(s['name'])}")
        if plot:
            md += ["", f"![{s['name']} score distributions]({plot})"]
    md += ["", "## Win rate per checkpoint", "", f"![win rate]({report['files']['plots']['win_rate']})"]
    if "curves" in report["files"]["plots"]:
        md += ["", "## Training curves", "", f"![training curves]({report['files']['plots']['curves']})"]
    md += ["", "## Files", ""]
    f = report["files"]
    md += [f"- gallery: [{f['report_html']}]({f['report_html']})", f"- numbers: `{f['report_json']}`",
           f"- scores (long table: model, prompt_id, candidate, seed, scorer, score): `{f['scores']}`",
           "- candidates: " + ", ".join(f"`{v}`" for v in f["candidates"].values()), ""]
    write_atomic(path, "\n".join(md))


# -- html ---------------------------------------------------------------------------------------
def _gallery_images(folders: dict, ids: set[str], thumb: int) -> dict[tuple[str, str, int], dict]:
    """(model, prompt_id, candidate) -> {"uri", "seed", "small"} for the gallery's prompts, streamed."""
    from prefpipe.core.tables import iter_batches

    out = {}
    for model, folder in folders.items():
        for batch in iter_batches(folder, columns=["prompt_id", "candidate", "seed", "image"], batch_size=64):
            for r in batch.to_pylist():
                if r["prompt_id"] not in ids:
                    continue
                try:
                    uri, size = image_data_uri(r["image"], thumb)
                except BadImage:  # shown as a placeholder; scoring already counted it
                    continue
                out[(model, r["prompt_id"], r["candidate"])] = {"uri": uri, "seed": r["seed"],
                                                                "small": max(size) < DISPLAY_PX}
    return out


def _cls(g) -> str:
    if g is None:
        return ""
    return "pos" if g > 0 else "neg" if g < 0 else "zero"


def _gallery(report: dict, scores, folders: dict, ids: list[str], texts: list[str], max_prompts: int,
             thumb: int) -> dict | None:
    """What templates/report.html's gallery shows: one card per prompt, one group per seed, one figure per model."""
    import polars as pl

    shown = list(zip(ids, texts))[:max_prompts]
    if not shown:
        return None
    scorers = [(s["name"], s["higher_is_better"]) for s in report["scorers"]]
    tuned = [t["name"] for t in report["tuned"]]
    base = report["base"]["name"]
    wanted = {pid for pid, _ in shown}
    table = scores.filter(pl.col("prompt_id").is_in(list(wanted)))
    value: dict[tuple[str, str, int, str], float] = {
        (m, p, c, s): v for m, p, c, s, v in table.select("model", "prompt_id", "candidate", "scorer", "score").iter_rows()
    }
    images = _gallery_images(folders, wanted, thumb)
    per_prompt = report["generation"]["per_prompt"]
    combos = [(t, s, hib) for t in tuned for s, hib in scorers]
    cards = []
    for pid, text in shown:
        gains = []
        for t, s, hib in combos:
            d = [(value[(t, pid, c, s)] - value[(base, pid, c, s)]) * (1 if hib else -1)
                 for c in range(per_prompt) if (t, pid, c, s) in value and (base, pid, c, s) in value]
            gains.append(float(np.mean(d)) if d else None)
        seeds = []
        for c in range(per_prompt):
            figures = []
            for model in [base, *tuned]:
                lines, outcome = [], ""
                for j, (s, hib) in enumerate(scorers):
                    v, b = value.get((model, pid, c, s)), value.get((base, pid, c, s))
                    line = {"scorer": s, "value": v, "diff": None, "cls": ""}
                    if model != base and v is not None and b is not None:
                        g = (v - b) * (1 if hib else -1)
                        line.update(diff=v - b, cls=_cls(g))
                        if j == 0:
                            outcome = "win" if g > 0 else "loss" if g < 0 else "tie"
                    lines.append(line)
                figures.append({"model": model, "outcome": outcome, "image": images.get((model, pid, c)),
                                "lines": lines})
            seed = images.get((base, pid, c), {"seed": "?"})["seed"]
            seeds.append({"candidate": c, "seed": seed, "figures": figures})
        cards.append({
            "text": text, "seeds": seeds,
            "sort_keys": [(f"g{k}", f"{g:.6g}") for k, g in enumerate(gains) if g is not None],
            "gains": [{"tuned": t, "scorer": s, "value": g, "cls": _cls(g)} for (t, s, _), g in zip(combos, gains)],
        })
    return {"combos": [(t, s) for t, s, _ in combos], "cards": cards, "prompts": len(ids),
            "first_scorer": scorers[0][0]}


def write_html(report: dict, scores, folders: dict, ids: list[str], texts: list[str], path: Path,
               max_prompts: int = 200, thumb: int = 256) -> None:
    """report.html: headline, setup, per-scorer tables, plots (embedded) and the sortable gallery."""
    out = path.parent
    sections = [{"name": s["name"], "way": _way(s["higher_is_better"]), "rows": _stat_rows(report, s["name"]),
                 "selection": _selection_line(report, s["name"])} for s in report["scorers"]]
    plots = [{"name": name, "rel": rel, "uri": png_data_uri(out / rel)} for name, rel in report["files"]["plots"].items()]
    page = render("report.html", title="prefpipe eval", headline=report["headline"], describe=_describe(report),
                  header=STAT_HEADER, sections=sections, plots=plots,
                  gallery=_gallery(report, scores, folders, ids, texts, max_prompts, thumb))
    write_atomic(path, page)


# -- the runs' model cards ------------------------------------------------------------------------
CARD_SAMPLES = 4  # images of each tuned run shown in its model card


def card_samples(folder: Path, ids: list[str], n: int = CARD_SAMPLES) -> list[tuple[str, bytes]]:
    """(prompt, image bytes) of candidate 0 of the first `n` evaluated prompts in `folder` (a candidates dataset)."""
    from prefpipe.core.tables import iter_batches

    wanted = {pid: k for k, pid in enumerate(ids[:n])}
    found: dict[str, tuple[str, bytes]] = {}
    for batch in iter_batches(folder, columns=["prompt_id", "prompt", "candidate", "image"], batch_size=64):
        for row in batch.to_pylist():
            if row["candidate"] == 0 and row["prompt_id"] in wanted:
                found[row["prompt_id"]] = (row["prompt"], row["image"])
        if len(found) == len(wanted):
            break
    return [found[pid] for pid in sorted(found, key=wanted.__getitem__)]


def update_run_cards(report: dict, runs: list, folders: dict, ids: list[str], out: Path) -> list[Path]:
    """Add each tuned run's results (its headline, win rates per scorer) and a few of its images to the model card
    of its run folder (`trainer.export.update_model_card`); folders without a prefpipe card are left alone."""
    from prefpipe.stages.eval.compare import headline
    from trainer.export import update_model_card

    scorers = [s["name"] for s in report["scorers"]]
    written = []
    for run in runs:
        results = [r for r in report["results"] if r["tuned"] == run.name]
        evaluation = {
            "headline": headline(results, scorers), "report": str(out / "report.json"), "created": report["created"],
            "prompts": report["prompts"]["count"], "per_prompt": report["generation"]["per_prompt"],
            "results": [{k: r[k] for k in ("scorer", "win_rate", "win_rate_ci", "n", "base_mean", "tuned_mean")}
                        for r in results],
        }
        path = update_model_card(run.path, evaluation, card_samples(folders[run.name], ids))
        if path is not None:
            written.append(path)
    return written
