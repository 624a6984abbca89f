"""`prefpipe demo-compare` (`make compare`): every objective on pairs, side by side, on one budget.

    reward pairs ──train --objective dpo | mapo | kto | sft──▶ runs/<objective>-reward ──┐
    control pairs (the opposite reward) ──the same────────────▶ runs/<objective>-control ─┼─eval (held-out)──▶ table
    base model ──────────────────────────────────────────────────────────────────────────┘

What is held equal, and how:

- **the pairs, the seed, the optimizer**: every run trains on the same pairs with the same ``--seed``, LoRA
  (rank, targets), batch and learning rate; only the objective and its hyper-parameters differ.
- **the budget**: the same number of *denoiser sample-forwards* (one image through the UNet), ``--budget``.
  Per pair and step an objective costs ``(2 if it needs the loser else 1) x (2 if it needs the reference
  else 1)`` of them (read from its `trainer.losses.Objective` entry): DPO 4 (winner and loser, policy and
  reference), KTO 4 (2 per image: the pairs' per-image view), MaPO 2 (no reference), SFT 1 (winners only).
  So at the same batch MaPO runs twice DPO's steps and SFT four times. A reference forward has no backward,
  so equal forwards is not equal time: the table gives steps/s beside it.
- **the hyper-parameters**: each objective's published defaults, with the KL strengths scaled as the demo
  scales DPO's (beta 5000 -> 500, a tenth: the demo's tiny model's errors are not SD 1.5's): KTO's beta
  1000 -> 100. MaPO's beta (0.1) weighs its margin term against the denoising loss, its SNR constant (0.5)
  and scale (the scheduler's training timesteps) are part of the formula: unchanged. Nothing is tuned.

D3PO is not in the table: it trains on recorded sampling trajectories (`make d3po-demo`), not on these
pairs, so it cannot be held to the same data.

Each run is a `prefpipe train` child process; its peak resident memory is the child's own ``ru_maxrss``
(``os.wait4``) and its steps/s the one `train` prints. The win rates come from one `prefpipe eval` of all
runs against the base on the held-out prompts (Wilson 95% intervals, as `make demo`): the reward arm should
win, the control arm (trained on the opposite reward's pairs) should lose.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.files import write_atomic
from trainer.losses import get_objective

ORDER = ("dpo", "mapo", "kto", "sft")
# Published defaults, KL strengths scaled like the demo's DPO (module docstring).
DEFAULT_HYPER = {"dpo": {"beta": 500.0}, "mapo": {"beta": 0.1, "snr_value": 0.5}, "kto": {"beta": 100.0}, "sft": {}}
RECORD = "compare.json"


def forwards_per_pair(objective: str) -> int:
    """Denoiser sample-forwards one pair costs per step under `objective` (policy and reference)."""
    o = get_objective(objective)
    return (2 if o.needs_loser else 1) * (2 if o.needs_reference else 1)


def steps_for(objective: str, budget: int, batch_size: int) -> int:
    """Optimizer steps of `objective` within `budget` sample-forwards at `batch_size` pairs a step."""
    steps = budget // (forwards_per_pair(objective) * batch_size)
    if steps < 1:
        raise PrefpipeError(f"--budget {budget}: less than one step of {objective} at batch {batch_size}")
    return steps


@dataclass(frozen=True)
class Arm:
    objective: str
    arm: str  # "reward" | "control"
    pairs: str

    @property
    def name(self) -> str:
        return f"{self.objective}-{self.arm}"


def train_one(arm: Arm, *, model: str, out: Path, steps: int, batch_size: int, train_args: list[str],
              hyper: dict[str, float], threads: int, cache: Path, in_process: bool = False) -> dict:
    """Train one run in a child `prefpipe train` (skipped when its record exists); returns its record:
    steps, steps/s, wall seconds, peak RSS of the child. `in_process`: the same command run in this process
    (the reduced test: no start-up per run; no peak RSS of its own, recorded as 0)."""
    record_path = out / RECORD
    if record_path.exists():
        return json.loads(record_path.read_text())
    if out.exists():
        import shutil

        shutil.rmtree(out)  # a run killed before its record: start it again
    hyper_args = [a for k, v in hyper.items() for a in (f"--{k.replace('_', '-')}", repr(v))]
    args = ["train", "--model", model, "--pairs", arm.pairs, "--out", str(out),
           "--objective", arm.objective, "--max-steps", str(steps), "--batch-size", str(batch_size),
           "--cache-dir", str(cache), "--checkpoint-every", "0", "--no-progress", *hyper_args, *train_args]
    if in_process:
        from trainer.cli import train as train_command
        from trainer.config import TrainConfig
        from trainer.recipes import train

        summary = train(TrainConfig(**train_command.make_context("train", args[1:]).params))  # the CLI's parsing
        return _record(arm, out, summary["steps_run"], summary["wall_s"], summary["steps_per_s"], summary["wall_s"], 0,
                       batch_size, hyper)
    cmd = [sys.executable, "-m", "prefpipe", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = out.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if proc.returncode != 0:
        raise PrefpipeError(f"demo-compare: training {arm.name} failed ({proc.returncode}); its log {log}:\n{text[-2000:]}")
    m = re.search(r"train: (\d+) steps in ([\d.]+) s \(([\d.]+) steps/s\)", text)
    if not m:
        raise PrefpipeError(f"demo-compare: {log} has no 'train: N steps in S s' line")
    return _record(arm, out, int(m.group(1)), float(m.group(2)), float(m.group(3)), wall, usage.ru_maxrss * 1024,
                   batch_size, hyper)


def _record(arm: Arm, out: Path, steps: int, train_s: float, steps_per_s: float, process_s: float, rss: int,
            batch_size: int, hyper: dict[str, float]) -> dict:
    record = {"run": arm.name, "objective": arm.objective, "arm": arm.arm, "steps": steps, "train_s": train_s,
              "steps_per_s": steps_per_s, "process_s": process_s, "peak_rss_bytes": rss, "batch_size": batch_size,
              "forwards_per_step": forwards_per_pair(arm.objective) * batch_size, "hyper": hyper, "pairs": arm.pairs}
    write_atomic(out / RECORD, json.dumps(record, indent=2))
    return record


def train_arms(arms: list[Arm], *, model: str, workdir: Path, budget: int, batch_size: int, train_args: list[str],
               hyper: dict[str, dict[str, float]], jobs: int = 1, threads: int = 1,
               in_process: bool = False) -> dict[str, dict]:
    """Every arm's run (WORKDIR/runs/<objective>-<arm>), `jobs` at a time (`in_process`: one at a time, in
    this process); the records by run name."""
    cache = workdir / "cache"

    def one(arm: Arm) -> dict:
        return train_one(arm, model=model, out=workdir / "runs" / arm.name,
                         steps=steps_for(arm.objective, budget, batch_size), batch_size=batch_size,
                         train_args=train_args, hyper=hyper.get(arm.objective, {}), threads=threads, cache=cache,
                         in_process=in_process)

    if jobs == 1 or in_process:
        return {a.name: one(a) for a in arms}
    # the first run of each pairs dataset encodes its cache (runs on different pairs side by side); then the rest
    first: dict[str, Arm] = {}
    for a in arms:
        first.setdefault(a.pairs, a)
    rest = [a for a in arms if a not in first.values()]
    records: dict[str, dict] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for batch in (list(first.values()), rest):
            records.update(zip((a.name for a in batch), pool.map(one, batch)))
    return {a.name: records[a.name] for a in arms}


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def table(records: dict[str, dict], report: dict, scorer: str, objectives: list[str]) -> list[str]:
    """The markdown table: per objective, the reward and control arms' held-out win rates against the base on
    `scorer` (95% Wilson), steps, denoiser forwards per step and in all, steps/s, peak RSS."""
    results = {r["tuned"]: r for r in report["results"] if r["scorer"] == scorer}
    lines = [f"| objective | reward arm: wins vs base on {scorer} [95% CI] | control arm: wins [95% CI] | steps | "
             "denoiser forwards / step (in all) | steps/s (reward, control) | peak RSS (reward run) |",
             "|---|---|---|---|---|---|---|"]
    for objective in objectives:
        cells = []
        for arm in ("reward", "control"):
            r = results.get(f"{objective}-{arm}")
            if r is None:
                raise PrefpipeError(f"the eval report has no result for {objective}-{arm} on {scorer}")
            lo, hi = r["win_rate_ci"]
            cells.append(f"{100 * r['win_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={r['n']})")
        rec, ctl = records[f"{objective}-reward"], records[f"{objective}-control"]
        lines.append(f"| {objective} | {cells[0]} | {cells[1]} | {rec['steps']} | {rec['forwards_per_step']} "
                     f"({rec['forwards_per_step'] * rec['steps']:,}) | {rec['steps_per_s']:.2f}, {ctl['steps_per_s']:.2f} | "
                     f"{mib(rec['peak_rss_bytes'])} |")
    return lines


@click.command("demo-compare")
@click.option("--model", required=True, help="The base model (make demo's WORKDIR/models/base).")
@click.option("--pairs", "reward_pairs", required=True, type=click.Path(exists=True), help="The reward's pairs.")
@click.option("--control-pairs", required=True, type=click.Path(exists=True), help="The opposite reward's pairs (the control).")
@click.option("--prompts", required=True, type=click.Path(exists=True), help="Held-out prompts for the eval.")
@click.option("--workdir", required=True, type=click.Path(), help="Where the runs, their cache, the eval and the table go.")
@click.option("--scorer", default="compressibility", show_default=True, help="The reward (evaluated for both arms).")
@click.option("--objectives", default=",".join(ORDER), show_default=True, help="Comma list of objectives on pairs.")
@click.option("--budget", type=click.IntRange(min=1), default=200 * 32 * 4, show_default=True,
              help="Denoiser sample-forwards per run (DPO's 200 steps x 32 pairs x 4).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Pairs per step, every run.")
@click.option("--train-args", default="--learning-rate 1e-3 --lora-rank 8 --lora-targets attn,ff,conv", show_default=True,
              help="Options every run shares (prefpipe train).")
@click.option("--eval-args", default="--per-prompt 16 --steps 20 --guidance 2 --batch-size 64 --scheduler ddim --no-progress",
              show_default=True, help="Options of the one eval of all runs (prefpipe eval).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Runs trained at a time.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="Threads of each run.")
@click.option("--table", "table_path", type=click.Path(), default=None, help="Also write the table here [default: WORKDIR/table.md].")
def demo_compare(model, reward_pairs, control_pairs, prompts, workdir, scorer, objectives, budget, batch_size,
                 train_args, eval_args, jobs, threads, table_path):
    """Train DPO, MaPO, KTO and SFT on the same pairs, seed and budget of denoiser forwards, for the reward and
    for the control; evaluate all against the base on held-out prompts; print and write one markdown table."""
    import shlex

    names = [o.strip() for o in objectives.split(",") if o.strip()]
    for name in names:
        if name not in DEFAULT_HYPER:
            raise PrefpipeError(f"--objectives: {name!r} is not one of {', '.join(ORDER)} (d3po trains on trajectories)")
    work = Path(workdir)
    arms = [Arm(o, arm, p) for o in names for arm, p in (("reward", reward_pairs), ("control", control_pairs))]
    for o in names:
        click.echo(f"demo-compare: {o}: {steps_for(o, budget, batch_size)} steps x {batch_size} pairs x "
                   f"{forwards_per_pair(o)} forwards per pair = {budget} budget; {DEFAULT_HYPER[o] or 'no hyper-parameters'}",
                   err=True)
    records = train_arms(arms, model=model, workdir=work, budget=budget, batch_size=batch_size,
                         train_args=shlex.split(train_args), hyper=DEFAULT_HYPER, jobs=jobs, threads=threads)
    eval_dir = work / "eval"
    if not (eval_dir / "report.json").exists():
        cmd = [sys.executable, "-m", "prefpipe", "eval", "--base", model, "--prompts", prompts, "--scorer", scorer,
               "--holdout", reward_pairs, "--holdout", control_pairs, "--out", str(eval_dir),
               *(a for arm in arms for a in ("--tuned", f"{arm.name}={work / 'runs' / arm.name}")), *shlex.split(eval_args)]
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(max(threads, jobs))})
        if proc.returncode != 0:
            raise PrefpipeError(f"demo-compare: the eval failed ({proc.returncode})")
    report = json.loads((eval_dir / "report.json").read_text())
    lines = table(records, report, scorer, names)
    text = "\n".join(lines) + "\n"
    write_atomic(Path(table_path) if table_path else work / "table.md", text)
    click.echo(text)


def implicit_margin(model: str, run: str | Path, pairs: str | Path, out: str | Path, *, batch_size: int = 8,
                    draws: int = 4, seed: int = 0, train_args: dict | None = None) -> float:
    """The tuned run's held-out preference on `pairs` relative to the base, in the units of a denoising error:
    mean over pairs of ``(base_mse_w - mse_w) - (base_mse_l - mse_l)`` (positive: the run learnt to denoise
    the winners better than the losers, compared with the base).

    Measured by one `prefpipe train --objective dpo --beta 2` step at learning rate 0 starting from the run
    (``--init-from``: the policy is the run, the reference the base with the adapters off), whose logged
    ``reward_margin`` (``beta / 2`` times that difference) is averaged over `draws` micro-batches of
    `batch_size` pairs; the same seed gives every run the same pairs, timesteps and noise. `train_args`: the
    run's LoRA options (``lora_rank``, ``lora_targets``, ``resolution``, ...), which --init-from must match.
    """
    from trainer.config import TrainConfig
    from trainer.recipes import train

    out = Path(out)
    cfg = TrainConfig(model=str(model), out=str(out), pairs=(str(pairs),), objective="dpo", beta=2.0,
                      init_from=str(run), max_steps=1, learning_rate=0.0, batch_size=batch_size,
                      gradient_accumulation=draws, seed=seed, checkpoint_every=0, no_progress=True,
                      cache_dir=str(out.parent / "margin-cache"), **(train_args or {}))
    summary = train(cfg)
    return float(summary["last"]["reward_margin"])
