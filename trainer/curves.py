"""The one plotter of training curves, reading the metric names the recipes write to `RUN/metrics.jsonl`.

Used by every training run (`RUN/curves.png`) and by `prefpipe eval` (`plots/curves.png`: the curves of
each evaluated run, with the evaluated checkpoints' steps marked).

metrics.jsonl: one JSON object per logged step, `step`, `epoch`, `lr`, `nonfinite_skipped`, `grad_norm`,
and the objective's metrics (`trainer/losses.py`): `loss`, `implicit_acc`, `reward_margin`, the denoising
errors `mse_w`, `mse_l`, `ref_mse_w`, `ref_mse_l` (Diffusion-DPO and its variants), the probability ratios
`ratio_w`, `ratio_l` and `clip_frac` (D3PO). A skipped step (`"skipped": true`) carries no metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

# (panel title, metric keys drawn in it), in the order shown; panels with no key in the data are left out.
PANELS = (
    ("loss", ("loss",)),
    ("implicit accuracy", ("implicit_acc",)),
    ("reward margin", ("reward_margin",)),
    ("denoising MSE", ("mse_w", "mse_l", "ref_mse_w", "ref_mse_l")),
    ("probability ratio (policy / reference)", ("ratio_w", "ratio_l")),
    ("ratio clip fraction", ("clip_frac",)),
    ("gradient norm", ("grad_norm",)),
    ("learning rate", ("lr",)),
)
SMOOTH_ABOVE = 50  # more points than this: a faint raw line and a moving average on top


def read_metrics(path: str | Path) -> list[dict]:
    """The logged steps of a metrics.jsonl (lines that are not JSON objects, such as a torn last line, are skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "loss" in obj:
            rows.append(obj)
    return rows


def plot_training_curves(runs: dict[str, list[dict]], png: str | Path, marks: dict[str, list[int]] | None = None) -> bool:
    """One panel per metric group of :data:`PANELS`, a line per run (and per key), against the step.

    runs: {label: logged steps}; a single run may have the label "". marks: {label: steps to mark with a
    dotted line} (evaluated checkpoints). Returns False, writing nothing, when there is nothing to plot.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    present = {k for rows in runs.values() for r in rows for k, v in r.items() if _is_number(v)}
    panels = [(title, [k for k in keys if k in present]) for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        return False
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.1 * nrows), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    cmap = colormaps["tab10"]
    several = len(runs) > 1
    for ax, (title, keys) in zip(axes, panels):
        n = 0
        for r_i, (label, rows) in enumerate(runs.items()):
            for k_i, key in enumerate(keys):
                pts = [(r["step"], r[key]) for r in rows if _is_number(r.get(key)) and _is_number(r.get("step"))]
                if not pts:
                    continue
                color = cmap((r_i if several else k_i) % 10)
                name = ", ".join(x for x in (label if several else "", key if len(keys) > 1 else "") if x) or None
                x, y = np.array(pts, float).T
                if len(y) > SMOOTH_ABOVE:
                    ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
                    w = max(2, len(y) // 25)
                    ax.plot(x[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid"), color=color, linewidth=1.6, label=name)
                else:
                    ax.plot(x, y, color=color, linewidth=1.6, marker="." if len(y) < 30 else None, label=name)
                n += name is not None
            for step in (marks or {}).get(label, []):
                ax.axvline(step, color=cmap(r_i % 10) if several else "gray", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if n:
            ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Training curves (metrics.jsonl)", fontsize=10)
    fig.savefig(png)
    return True


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
