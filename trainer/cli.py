"""`prefpipe train`: its options are generated from `trainer.config.TrainConfig` (the single source of truth).

Heavy imports (torch, diffusers) happen inside the command, so `prefpipe --help` stays fast.
"""

from __future__ import annotations

import click

from prefpipe.core.options import click_options
from trainer.config import TrainConfig


@click.command(context_settings={"max_content_width": 120})
@click_options(TrainConfig)
def train(**options) -> None:
    """Train a LoRA (or the whole UNet) on preferences: Diffusion-DPO (default), SFT, hinge, IPO, MaPO, KTO or D3PO.

    \b
    Data: --source ai|human (WORKDIR/pairs/...) and/or --pairs PATH (ours or Pick-a-Pic shards);
    D3PO: --objective d3po --candidates TRAJECTORIES with --source/--pairs or --labels (D3PO's JSON files).
    Writes RUN/pytorch_lora_weights.safetensors (or RUN/unet with --full), checkpoints, metrics.jsonl,
    curves.png and train_config.json. Several processes: accelerate launch -m prefpipe train ...
    --plan: the step's planned peak accelerator memory and FLOPs, from the model's configs only (no weights,
    no data, no GPU); --max-memory 12GiB picks settings that fit (with --plan, 12GiB,24GiB,... prints a table).
    """
    from accelerate import PartialState

    from trainer.recipes import train as run

    run(TrainConfig(**options))
    PartialState().destroy_process_group()  # the command is done (a no-op in one process)
