"""The `prefpipe` command: the top layer, the only one that imports the stages.

Each stage defines its click command beside its code; a command's module is imported only when that command
runs (or `--help` lists them all), so `prefpipe generate` never imports the trainer, the scorers or the demo.
"""

from __future__ import annotations

import importlib
import os

import click

from prefpipe.core.errors import PrefpipeError, PrefpipeGroup

# command name -> (module, attribute)
LAZY_COMMANDS = {
    "generate": ("prefpipe.stages.generate", "generate_command"),
    "label": ("prefpipe.stages.label", "label"),
    "feedback": ("prefpipe.stages.feedback", "feedback_command"),
    "pairs": ("prefpipe.stages.label", "pairs_command"),
    "ingest": ("prefpipe.stages.ingest", "ingest"),
    "annotate": ("prefpipe.stages.annotate", "annotate"),
    "train": ("trainer.cli", "train"),
    "d3po-rounds": ("prefpipe.stages.rounds", "d3po_rounds"),
    "eval": ("prefpipe.stages.eval", "eval_command"),
    "show": ("prefpipe.stages.eval.show", "show"),
    "scorers": ("prefpipe.stages.scorers", "scorers_command"),
    "demo-model": ("prefpipe.demo.build", "demo_model"),
    "demo-headline": ("prefpipe.demo.headline", "demo_headline"),
    "demo-clip": ("prefpipe.demo.clip", "demo_clip"),
    "demo-annotate": ("prefpipe.demo.annotators", "demo_annotate"),
    "demo-reverse": ("prefpipe.demo.feedback", "demo_reverse"),
    "demo-compare": ("prefpipe.demo.compare", "demo_compare"),
    "demo-feedback-headline": ("prefpipe.demo.feedback", "demo_feedback_headline"),
}


class _StageGroup(PrefpipeGroup):
    def list_commands(self, ctx) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=_StageGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="prefpipe")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line messages for bad input.")
def main(debug: bool) -> None:
    """Align text-to-image diffusion models with preferences (Diffusion-DPO, D3PO).

    Stages write Parquet datasets (folders of shards + _prefpipe.json); each can be re-run to resume,
    and sharded across processes with `accelerate launch`.
    """
    if debug:
        os.environ["PREFPIPE_DEBUG"] = "1"


@main.command()
@click.argument("kind", type=click.Choice(["sd15", "sdxl", "sd3", "flux", "pickscore", "hpsv2", "clip", "aesthetic",
                                                  "imagereward", "hpsv3"]))
@click.option("--out", required=True, type=click.Path(), help="Folder to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--size", type=click.IntRange(min=16), default=64, show_default=True, help="Native image side in pixels (multiple of 8).")
def tiny(kind, out, seed, size):
    """Write a tiny offline model of a real architecture (same classes, same on-disk format).

    sd15 / sdxl / sd3 / flux: a diffusers pipeline folder that `--model` accepts (sd3: SD3.5's
    StableDiffusion3Pipeline; flux: FLUX.1-dev's FluxPipeline; both with a T5 tokenizer trained offline).
    pickscore / hpsv2 / clip / aesthetic / imagereward / hpsv3: a scorer checkpoint in the real format; pass the printed path
    as `prefpipe label --weights KIND=PATH`.
    """
    if kind in ("sd15", "sdxl", "sd3", "flux"):
        from prefpipe.testing.tiny import write_tiny_pipeline

        step = 16 if kind in ("sd3", "flux") else 8  # flow models: 2x2 latent patches after the VAE's x8
        if size % step:
            raise PrefpipeError(f"--size {size}: must be a multiple of {step} for {kind}")
        path = write_tiny_pipeline(kind, out, seed=seed, size=size)
    else:
        from prefpipe.testing.scorers import write_tiny_scorer

        path = write_tiny_scorer(kind, out, seed=seed)
    click.echo(f"tiny {kind}: wrote {path}")


if __name__ == "__main__":
    main()
