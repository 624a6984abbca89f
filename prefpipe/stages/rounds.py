"""The D3PO online rounds (`prefpipe d3po-rounds`): generate with the current model -> label -> train from the
last round's weights, N times.

    round k (WORKDIR/round-k):  candidates ──label──▶ scores, pairs/ai ──train --objective d3po --init-from──▶ run
                                 ▲ sampled with trajectories by the base model (k = 1) or round k-1's LoRA

Each step is its stage (generate, label) or the trainer's recipe, called as a library; every one of them
resumes, so re-running the same command finishes an interrupted round and skips finished ones.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from labelers.registry import parse_weights
from prefpipe.core.dataset import is_main_process
from prefpipe.core.errors import PrefpipeError
from prefpipe.core.options import click_options, parse_assignments
from prefpipe.stages.generate import GenerateOptions, SamplingOptions, generate
from prefpipe.stages.label import build_pair_dataset, score_candidates
from prefpipe.stages.pairs import PairOptions
from trainer.config import TrainConfig
from trainer.export import LORA_FILE
from trainer.recipes import train

# Set by run_rounds itself, per round.
ROUND_OWNED = ("model", "out", "workdir", "source", "pairs", "candidates", "labels", "objective", "init_from")


def run_rounds(
    *,
    model: str,
    prompts: str | Path,
    workdir: str | Path,
    rounds: int,
    scorer: str = "compressibility",
    weights: dict[str, str] | None = None,
    per_prompt: int = 4,
    sampling: SamplingOptions | None = None,
    strategy: str = "all",
    generate_batch_size: int = 4,
    device: str = "auto",
    train_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[Path]:
    """N rounds of online D3PO with AI feedback; returns the run folders, round 1 first.

    Round k (folder ``WORKDIR/round-k``): ``candidates`` sampled with trajectories by the current model
    (the base for k = 1, the base with round k-1's LoRA after), generation seed ``seed + k - 1`` so each
    round sees fresh noise; ``scores`` and ``pairs/ai`` by `scorer` within each prompt (`strategy`: D3PO
    compares every pair of a prompt's images, ``all``); ``run`` trained with ``--init-from`` round k-1's
    run, the reference staying the base `model`. `train_options`: other TrainConfig fields (max_steps,
    learning_rate, lora_targets, ...), the same every round. `sampling`: how each round samples (default:
    20 DDIM steps, the pipeline's guidance and size, seed 0). Every stage resumes: re-running the same call
    finishes an interrupted round and skips finished ones.
    """
    sampling = sampling or SamplingOptions(steps=20)
    seed = sampling.seed
    if rounds < 1:
        raise PrefpipeError(f"--rounds {rounds}: must be at least 1")
    options = dict(train_options or {})
    owned = sorted(set(options) & set(ROUND_OWNED))
    if owned:
        raise PrefpipeError(f"train options {', '.join(owned)} are set by the rounds themselves")
    workdir = Path(workdir)
    runs: list[Path] = []
    previous: str | None = None
    for k in range(1, rounds + 1):
        t0 = time.perf_counter()
        folder = workdir / f"round-{k}"
        candidates = folder / "candidates"
        generate(GenerateOptions(**{**asdict(sampling), "seed": seed + k - 1}, model=model, per_prompt=per_prompt,
                                 lora=previous, trajectories=True),
                 prompts, candidates, batch_size=generate_batch_size, device=device, progress=progress)
        scores = score_candidates(candidates, folder / "scores", [scorer], dict(weights or {}), device=device,
                                  progress=progress)
        build_pair_dataset(scores.folder, candidates, folder / "pairs" / "ai", PairOptions(strategy=strategy, seed=seed))
        run = folder / "run"
        if not (run / LORA_FILE).exists():
            cfg = TrainConfig(model=model, out=str(run), workdir=str(folder), source=("ai",), candidates=str(candidates),
                              objective="d3po", init_from=previous, **{"no_progress": not progress, **options})
            if (run / "train_config.json").exists():
                cfg.resume = "latest"  # an interrupted round continues from its last checkpoint
            train(cfg)
        if is_main_process():
            click.echo(f"d3po-rounds: round {k}/{rounds} done in {time.perf_counter() - t0:.1f} s -> {run} "
                       f"(sampler: {previous or 'the base model'})", err=True)
        previous = str(run)
        runs.append(run)
    return runs


@click.command("d3po-rounds")
@click.option("--model", required=True, help="Base diffusers pipeline (hub id or folder); every round's reference.")
@click.option("--prompts", required=True, type=click.Path(), help="Prompt file (as `prefpipe generate --prompts`).")
@click.option("--workdir", required=True, type=click.Path(), help="Writes WORKDIR/round-K/{candidates,scores,pairs/ai,run}.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Rounds of generate -> label -> train.")
@click.option("--scorer", default="compressibility", show_default=True, help="AI feedback: a `prefpipe label` scorer name.")
@click.option("--weights", multiple=True, help="NAME=PATH_OR_HUB_ID: the scorer's weights (as `prefpipe label --weights`).")
@click.option("--per-prompt", type=click.IntRange(min=2), default=4, show_default=True, help="Candidates per prompt per round.")
@click_options(SamplingOptions, only=["steps", "guidance", "size", "seed"], defaults={"steps": 20}, help={
    "steps": "DDIM steps (D3PO samples with 20).", "seed": "Round k generates with seed + k - 1; also the training seed."})
@click.option("--strategy", type=click.Choice(["all", "best-worst", "random-k"]), default="all", show_default=True,
              help="Which candidates of a prompt to pair (D3PO: all).")
@click.option("--batch-size", "generate_batch_size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images per pipeline call when generating.")
@click.option("--device", default="auto", show_default=True, help="Generation and scoring device.")
@click.option("--train", "train_items", multiple=True,
              help="OPTION=VALUE for every round's `prefpipe train` (repeatable), e.g. --train max-steps=50 --train learning-rate=3e-4.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def d3po_rounds(weights, train_items, scorer, no_progress, steps, guidance, size, seed, **options):
    """Online D3PO: N rounds of generate (the last round's LoRA samples) -> label -> train --init-from.

    \b
    Round k writes WORKDIR/round-k/{candidates, scores, pairs/ai, run}; the last run is the tuned model
    (`prefpipe eval --tuned WORKDIR/round-N/run`). Re-run the same command to resume.
    """
    runs = run_rounds(scorer=scorer, weights=parse_weights(weights, [scorer]), progress=not no_progress,
                      sampling=SamplingOptions(steps=steps, guidance=guidance, size=size, seed=seed),
                      train_options=parse_assignments(train_items, TrainConfig, "--train", "a `prefpipe train` option"),
                      **options)
    if is_main_process():
        click.echo(f"d3po-rounds: {len(runs)} rounds; the model of the last: {runs[-1]}", err=True)
