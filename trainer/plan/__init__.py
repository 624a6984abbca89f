"""The memory and FLOP planner of a training step (`prefpipe train --plan`, `--max-memory`).

One concept in six modules, bottom up:

- `configs.py`: the published configs of SD 1.5 and SDXL, written as a config-only pipeline folder (no weights);
- `models.py`: a run's models built from config files on the meta device, then given fake (or random) CPU tensors;
- `trace.py`: `StepTracer`, the dispatch-level counter of live tensor storages and FLOPs, and CUDA's autocast
  op lists imitated on CPU;
- `step.py`: one steady-state optimizer step of the Diffusion-DPO recipe, simulated on those models;
- `result.py`: `Plan` (the figures and their table), `plan_training`, and the plan a run prints at start-up;
- `fit.py`: `--max-memory`: the settings that fit a budget, the budget table, and the `--plan` command.

Nothing is imported here: `torch` and the libraries load only when a plan is made.
"""
