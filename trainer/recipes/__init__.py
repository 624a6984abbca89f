"""Training recipes, one per family of objectives, chosen by `--objective`:

- `dpo.py`: the denoising objectives on pairs of images (Diffusion-DPO, hinge, IPO, SFT, MaPO, KTO), and KTO on
  per-image feedback (the same loop, one image per item);
- `d3po.py`: D3PO on recorded sampler trajectories.

`train(cfg)` is the entry point of `prefpipe train` and of the Python API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trainer.config import TrainConfig
from trainer.losses import get_objective


def train(cfg: TrainConfig, *, on_steps_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run (or resume) one training run with the recipe of `cfg.objective`. Returns its summary (steps, last
    metrics, data counters). `on_steps_start()`, if given, is called once before the first optimizer step
    (benchmarks measure the steps from there)."""
    cfg.validate()
    objective = get_objective(cfg.objective, per_image=bool(cfg.feedback))  # validate() allows --feedback for kto only
    if objective.kind == "log_prob":  # D3PO: recorded trajectories, its own data and micro-step
        from trainer.recipes.d3po import train_d3po

        return train_d3po(cfg, objective, on_steps_start=on_steps_start)
    from trainer.recipes.dpo import train_dpo

    return train_dpo(cfg, objective, on_steps_start=on_steps_start)
