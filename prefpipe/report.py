"""What eval shows: PNG plots (matplotlib, no display), report.md, and a self-contained report.html.

- `plots/scores_<scorer>.png`: the score distribution of base and each tuned run (same prompts and seeds),
  medians dashed.
- `plots/win_rate.png`: win rate of each tuned run over base per scorer, with 95% Wilson interval bars.
- `plots/curves.png`: the training curves of the runs' `metrics.jsonl` (when a run folder has one), with
  each evaluated checkpoint's step marked.
- `report.html`: the tables, the plots and a gallery (one card per prompt: base and tuned images side by side,
  seed by seed, with every score); a few lines of inline JS sort the cards by score gain. Images are embedded
  as data URIs, so the page opens from disk with no server and no network.

The HTML helpers (`page`, `image_data_uri`, `esc`) are shared with `prefpipe show`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path

import numpy as np

BROWSER_MIMES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
PREFERRED_METRICS = ("loss", "implicit_acc", "reward_margin", "model_mse", "ref_mse", "mse_model", "mse_ref")
_NOT_METRICS = {"step", "epoch", "time", "wall", "wall_s", "elapsed", "elapsed_s", "global_step"}
_CHECKPOINT_STEP = re.compile(r"(?:checkpoint|step|ckpt)[-_]?(\d+)$")
DISPLAY_PX = 160  # gallery image width on the page

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:1.5em;margin:0 0 .3em}h2{font-size:1.2em;margin:1.4em 0 .4em}h3{font-size:1em;margin:0 0 .4em;font-weight:600}
.headline{font-size:1.05em;background:#eef4ff;border-left:4px solid #3b6fd8;padding:8px 12px;margin:8px 0 16px}
table.stats{border-collapse:collapse;margin:6px 0 10px;background:#fff}
table.stats th,table.stats td{border:1px solid #ddd;padding:4px 8px;text-align:right;font-variant-numeric:tabular-nums}
table.stats th:first-child,table.stats td:first-child{text-align:left}
.meta{color:#555;font-size:.9em;line-height:1.5}.meta code{background:#eee;padding:0 3px}
.plots{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}.plots img{max-width:100%;border:1px solid #ddd;background:#fff}
.controls{position:sticky;top:0;background:#fafafa;padding:8px 0;z-index:2;border-bottom:1px solid #ddd}
button.sort{margin:2px;padding:4px 10px;border:1px solid #bbb;border-radius:4px;background:#fff;cursor:pointer}
button.sort.on{background:#3b6fd8;color:#fff;border-color:#3b6fd8}
#gallery{display:flex;flex-direction:column;gap:14px;margin-top:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 12px}
.seeds{display:flex;flex-wrap:wrap;gap:8px 18px}.seed{border-left:2px solid #e4e4e4;padding-left:8px}
.seedhead{font-size:.8em;color:#555;margin-bottom:2px}.models{display:flex;gap:6px}
.models figure{margin:0;text-align:center;font-size:.8em}.models figcaption.model{font-weight:600}
.models img{width:__PX__px;height:auto;display:block;border:3px solid transparent;border-radius:3px;margin:0 auto}
img.px{image-rendering:pixelated}
figure.win img{border-color:#2e9d4c}figure.loss img{border-color:#d2453b}figure.tie img{border-color:#c9a227}
.sc{font-variant-numeric:tabular-nums;white-space:nowrap}.pos{color:#1f7a3a}.neg{color:#b3261e}.zero{color:#8a6d00}
.gains{font-size:.85em;color:#444;margin-bottom:4px}
.pair{display:flex;gap:10px;align-items:flex-start}.pair figure{margin:0;text-align:center;font-size:.85em}
.pair img{width:256px;height:auto;border:4px solid #ddd;border-radius:4px;display:block}
.pair figure.winner img{border-color:#2e9d4c}.pair figure.tie img{border-color:#c9a227}
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-size:.8em;margin-right:4px;background:#eee}
.badge.human{background:#e3ecff}.badge.ai{background:#f3e5ff}.badge.agree{background:#d8f3df}.badge.disagree{background:#fbd9d6}
.badge.win{background:#2e9d4c;color:#fff}.bad{width:256px;height:120px;border:2px dashed #d2453b;color:#b3261e;display:flex;align-items:center;justify-content:center}
""".replace("__PX__", str(DISPLAY_PX))


# -- small helpers shared with show.py ----------------------------------------------------------
def esc(x) -> str:
    return html.escape(str(x), quote=True)


def fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.1f}%"


def signed(x) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:+.4g}"


def image_data_uri(data: bytes, max_side: int) -> tuple[str, tuple[int, int]]:
    """A data URI the browser shows, and the image's (width, height).

    Images a browser decodes and no larger than `max_side` are embedded as they are (exact pixels);
    larger ones, or other formats, are shrunk to fit `max_side` and re-encoded as JPEG (quality 88).
    Raises on undecodable bytes.
    """
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    size = im.size
    mime = BROWSER_MIMES.get(im.format or "")
    if mime and max(size) <= max_side:
        return f"data:{mime};base64,{base64.b64encode(data).decode()}", size
    im = im.convert("RGB")
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=88)
    return f"data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}", size


def png_data_uri(path: Path) -> str:
    return f"data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def page(title: str, body: str, script: str = "") -> str:
    """A complete, self-contained HTML document (inline CSS and JS, nothing fetched)."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
        + (f"<script>\n{script}\n</script>\n" if script else "")
        + "</body></html>\n"
    )


def write_text(path: Path, text: str) -> None:
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


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
    way = "higher is better" if higher_is_better else "lower is better"
    ax.set_xlabel(f"{scorer} score ({way})")
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


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl (lines that are not objects are skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


def _metric_keys(tables: list[list[dict]], limit: int = 6) -> list[str]:
    keys: dict[str, None] = {}
    for rows in tables:
        for r in rows:
            for k, v in r.items():
                if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool):
                    keys.setdefault(k, None)
    ordered = [k for k in PREFERRED_METRICS if k in keys] + [k for k in keys if k not in PREFERRED_METRICS]
    return ordered[:limit]


def plot_training_curves(tuned: list[dict], path: Path) -> bool:
    """Training curves of each distinct metrics.jsonl; checkpoints evaluated are marked. False: nothing to plot."""
    files: dict[str, list[str]] = {}
    for run in tuned:
        if run.get("metrics"):
            files.setdefault(str(Path(run["metrics"]).resolve()), []).append(run["name"])
    tables = {f: read_metrics(f) for f in files}
    keys = _metric_keys(list(tables.values()))
    if not keys:
        return False
    ncols = min(3, len(keys))
    nrows = -(-len(keys) // ncols)
    fig = _figure(4.2 * ncols, 3.0 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = _colors(len(files))
    for ax, key in zip(axes, keys):
        for color, (f, names) in zip(colors, files.items()):
            pts = [(r.get("step", i), r[key]) for i, r in enumerate(tables[f])
                   if isinstance(r.get(key), (int, float)) and isinstance(r.get("step", i), (int, float))]
            if not pts:
                continue
            x, y = np.array(pts, float).T
            label = ", ".join(names) if len(files) > 1 else None
            if len(y) > 50:  # noisy per-step values: faint raw line, moving average on top
                ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
                w = max(2, len(y) // 25)
                ax.plot(x[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid"), color=color, linewidth=1.6, label=label)
            else:
                ax.plot(x, y, color=color, linewidth=1.6, marker="." if len(y) < 30 else None, label=label)
            for name in names:
                m = _CHECKPOINT_STEP.search(name)
                if m:
                    ax.axvline(int(m.group(1)), color=color, linestyle=":", linewidth=1)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        if len(files) > 1:
            ax.legend(fontsize=7)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.suptitle("Training curves (metrics.jsonl)", fontsize=10)
    fig.savefig(path)
    return True


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
    if plot_training_curves(report["tuned"], curves):
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


STAT_HEADER = ["model", "win rate vs base [95% CI]", "per prompt [95% CI]", "W/T/L", "mean", "median", "Δ mean", "Δ median"]


def text_table(report: dict) -> str:
    """The results as aligned plain text (printed at the end of eval)."""
    lines = []
    for s in report["scorers"]:
        way = "higher is better" if s["higher_is_better"] else "lower is better"
        lines.append(f"{s['name']} ({way}):")
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
        way = "higher is better" if s["higher_is_better"] else "lower is better"
        md += ["", f"## {s['name']} ({way})", "", "| " + " | ".join(STAT_HEADER) + " |",
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
    write_text(path, "\n".join(md))


# -- html ---------------------------------------------------------------------------------------
SORT_JS = """
function sortBy(key, btn) {
  const box = document.getElementById('gallery');
  const desc = key !== 'order' && btn.dataset.dir !== 'desc';
  document.querySelectorAll('button.sort').forEach(b => { b.dataset.dir = ''; b.classList.remove('on'); });
  btn.dataset.dir = desc ? 'desc' : 'asc';
  btn.classList.add('on');
  const val = c => { const v = parseFloat(c.dataset[key]); return isNaN(v) ? (desc ? -Infinity : Infinity) : v; };
  const cmp = (a, b) => { const x = val(a), y = val(b); return x === y ? 0 : (x < y ? -1 : 1); };
  [...box.children].sort((a, b) => desc ? cmp(b, a) : cmp(a, b)).forEach(c => box.appendChild(c));
}
"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="stats"><tr>{head}</tr>{body}</table>'


def _gallery_images(folders: dict, ids: set[str], thumb: int) -> dict[tuple[str, str, int], tuple[str, int, bool]]:
    """(model, prompt_id, candidate) -> (data URI, seed, small) for the gallery's prompts, streamed."""
    from prefpipe.dataset import iter_batches

    out = {}
    for model, folder in folders.items():
        for batch in iter_batches(folder, columns=["prompt_id", "candidate", "seed", "image"], batch_size=64):
            for r in batch.to_pylist():
                if r["prompt_id"] not in ids:
                    continue
                try:
                    uri, size = image_data_uri(r["image"], thumb)
                except Exception:  # shown as a placeholder; scoring already counted it
                    continue
                out[(model, r["prompt_id"], r["candidate"])] = (uri, r["seed"], max(size) < DISPLAY_PX)
    return out


def _gallery(report: dict, scores, folders: dict, ids: list[str], texts: list[str], max_prompts: int, thumb: int) -> str:
    import polars as pl

    shown = list(zip(ids, texts))[:max_prompts]
    if not shown:
        return "<p>No gallery (--gallery-prompts 0).</p>"
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
    buttons = "".join(
        f'<button class="sort" onclick="sortBy(\'g{k}\', this)">gain of {esc(t)} · {esc(s)}</button>'
        for k, (t, s, _) in enumerate(combos)
    )
    controls = (f'<div class="controls">Sort prompts by mean score gain over base (click again to reverse): {buttons}'
                '<button class="sort" onclick="sortBy(\'order\', this)">prompt order</button></div>')
    cards = []
    for i, (pid, text) in enumerate(shown):
        gains = []
        for t, s, hib in combos:
            d = [(value[(t, pid, c, s)] - value[(base, pid, c, s)]) * (1 if hib else -1)
                 for c in range(per_prompt) if (t, pid, c, s) in value and (base, pid, c, s) in value]
            gains.append(float(np.mean(d)) if d else None)
        attrs = "".join(f' data-g{k}="{g:.6g}"' for k, g in enumerate(gains) if g is not None)
        gain_text = " · ".join(
            f'{esc(t)} {esc(s)} <span class="{_cls(g)}">{signed(g)}</span>' for (t, s, _), g in zip(combos, gains)
        )
        groups = []
        for c in range(per_prompt):
            figures = []
            for model in [base, *tuned]:
                img = images.get((model, pid, c))
                px = ' class="px"' if img and img[2] else ""
                pic = (f'<img src="{img[0]}" alt="{esc(model)} seed #{c}" title="{esc(model)} · seed {img[1]}"{px}>'
                       if img else '<div class="bad">no image</div>')
                lines, outcome = [], ""
                for j, (s, hib) in enumerate(scorers):
                    v = value.get((model, pid, c, s))
                    b = value.get((base, pid, c, s))
                    line = f"{esc(s)} {fmt(v)}"
                    if model != base and v is not None and b is not None:
                        g = (v - b) * (1 if hib else -1)
                        line += f' <span class="{_cls(g)}">{signed(v - b)}</span>'
                        if j == 0:
                            outcome = "win" if g > 0 else "loss" if g < 0 else "tie"
                    lines.append(f'<div class="sc">{line}</div>')
                figures.append(f'<figure class="{outcome}"><figcaption class="model">{esc(model)}</figcaption>'
                               f'{pic}{"".join(lines)}</figure>')
            seed = images.get((base, pid, c), ("", "?", False))[1]
            groups.append(f'<div class="seed"><div class="seedhead">seed #{c} <small>({seed})</small></div>'
                          f'<div class="models">{"".join(figures)}</div></div>')
        cards.append(
            f'<section class="card" data-order="{i}"{attrs}><h3>#{i + 1} · {esc(text)}</h3>'
            f'<div class="gains">mean gain over base: {gain_text}</div>'
            f'<div class="seeds">{"".join(groups)}</div></section>'
        )
    note = ""
    if len(shown) < len(ids):
        note = f"<p class=\"meta\">Showing the first {len(shown)} of {len(ids)} prompts (--gallery-prompts).</p>"
    legend = ("<p class=\"meta\">Each card: one prompt; each group one seed (the same noise for every model), base and tuned side by side. "
              f"Tuned images are framed green when they beat the base image of the same seed on {esc(scorers[0][0])}, "
              "red when they lose, yellow on a tie; differences are tuned − base.</p>")
    return f'{controls}{legend}{note}<div id="gallery">{"".join(cards)}</div>'


def _cls(g) -> str:
    if g is None:
        return ""
    return "pos" if g > 0 else "neg" if g < 0 else "zero"


def write_html(report: dict, scores, folders: dict, ids: list[str], texts: list[str], path: Path,
               max_prompts: int = 200, thumb: int = 256) -> None:
    """report.html: headline, setup, per-scorer tables, plots (embedded) and the sortable gallery."""
    out = path.parent
    parts = ["<h1>prefpipe eval: tuned vs base</h1>", f'<div class="headline">{esc(report["headline"])}</div>',
             '<div class="meta">' + "<br>".join(esc(line) for line in _describe(report)) + "</div>"]
    for s in report["scorers"]:
        way = "higher is better" if s["higher_is_better"] else "lower is better"
        parts.append(f"<h2>{esc(s['name'])} <small>({way})</small></h2>")
        parts.append(_html_table(STAT_HEADER, _stat_rows(report, s["name"])))
        line = _selection_line(report, s["name"])
        if line:
            parts.append(f'<div class="meta">{esc(line)}</div>')
    plots = report["files"]["plots"]
    if plots:
        parts.append("<h2>Plots</h2><div class=\"plots\">" + "".join(
            f'<img src="{png_data_uri(out / rel)}" alt="{esc(name)}" title="{esc(rel)}">' for name, rel in plots.items()
        ) + "</div>")
    parts.append("<h2>Gallery</h2>")
    parts.append(_gallery(report, scores, folders, ids, texts, max_prompts, thumb))
    write_text(path, page("prefpipe eval", "\n".join(parts), SORT_JS))
