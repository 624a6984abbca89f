"""The `prefpipe` command: one subcommand per stage (generate, label, ingest, train, eval) plus tools."""

from __future__ import annotations

import click

from prefpipe.errors import PrefpipeError, PrefpipeGroup

# Stages that live in their own modules define their click command there; a command's module is imported
# only when that command runs (or `--help` lists them all), so `prefpipe generate` never imports torch
# through the trainer or the demo.
LAZY_COMMANDS = {
    "label": ("prefpipe.label", "label"),
    "pairs": ("prefpipe.label", "pairs_command"),
    "ingest": ("prefpipe.ingest", "ingest"),
    "eval": ("prefpipe.eval", "eval_command"),
    "show": ("prefpipe.show", "show"),
    "demo-headline": ("prefpipe.headline", "demo_headline"),
    "demo-model": ("prefpipe.demo", "demo_model"),
    "train": ("trainer.cli", "train"),
    "d3po-rounds": ("trainer.d3po", "d3po_rounds"),
}


class _StageGroup(PrefpipeGroup):
    def list_commands(self, ctx) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            import importlib

            module, attr = LAZY_COMMANDS[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=_StageGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="prefpipe")
def main() -> None:
    """Align text-to-image diffusion models with preferences (Diffusion-DPO, D3PO).

    Stages write Parquet datasets (folders of shards + _prefpipe.json); each can be re-run to resume,
    and sharded across processes with `accelerate launch`.
    """


@main.command()
@click.option("--model", required=True, help="Diffusers pipeline: hub id (stabilityai/stable-diffusion-xl-base-1.0) or local folder.")
@click.option("--prompts", "prompts", required=True, type=click.Path(), help="Prompt file: .txt, .jsonl/.parquet (prompt|caption), .tsv (PartiPrompts' Prompt).")
@click.option("--per-prompt", type=click.IntRange(min=1), default=4, show_default=True, help="Candidate images per prompt.")
@click.option("--out", required=True, type=click.Path(), help="Output candidates dataset folder (re-run to resume).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Denoising steps [default: the pipeline's].")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale [default: the pipeline's].")
@click.option("--size", default=None, help="WIDTH or WIDTHxHEIGHT in pixels [default: the model's native size].")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Images per pipeline call (batched across prompts).")
@click.option("--seed", type=int, default=0, show_default=True, help="Run seed; image seeds derive from (seed, prompt_id, candidate).")
@click.option("--negative-prompt", default=None, help="Negative prompt for every image.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True, help="auto: fp16 on GPU, fp32 on CPU.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps.")
@click.option("--offload", type=click.Choice(["none", "model", "sequential"]), default="none", show_default=True, help="CPU offload on a small GPU.")
@click.option("--scheduler", type=click.Choice(["ddim", "euler", "euler-a", "dpm++", "pndm", "ddpm"]), default=None, help="Sampler [default: the model's own].")
@click.option("--lora", type=click.Path(), default=None, help="A `prefpipe train` LoRA run folder to load into the pipeline.")
@click.option("--unet", type=click.Path(), default=None, help="A `prefpipe train` full run (UNet folder) replacing the base UNet.")
@click.option("--prompts-per-shard", type=click.IntRange(min=1), default=64, show_default=True, help="Prompts per output shard (the unit of resume and of sharding).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N distinct prompts.")
@click.option("--trajectories", is_flag=True, help="D3PO: DDIM sampling, candidates of a prompt share the initial noise, every step's latents stored.")
@click.option("--eta", type=float, default=None, help="DDIM eta [default: 1.0 with --trajectories, else the pipeline's].")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def generate(prompts, out, batch_size, device, offload, no_progress, **options):
    """Generate N seeded candidate images per prompt into a candidates dataset."""
    from prefpipe.generate import GenerateOptions
    from prefpipe.generate import generate as run

    run(GenerateOptions(**options), prompts, out, batch_size=batch_size, device=device, offload=offload, progress=not no_progress)


@main.command()
@click.argument("kind", type=click.Choice(["sd15", "sdxl", "pickscore", "hpsv2", "clip", "aesthetic"]))
@click.option("--out", required=True, type=click.Path(), help="Folder to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--size", type=click.IntRange(min=16), default=64, show_default=True, help="Native image side in pixels (multiple of 8).")
def tiny(kind, out, seed, size):
    """Write a tiny offline model of a real architecture (same classes, same on-disk format).

    sd15 / sdxl: a diffusers pipeline folder that `--model` accepts.
    pickscore / hpsv2 / clip / aesthetic: a scorer checkpoint in the real format; pass the printed path
    as `prefpipe label --weights KIND=PATH`.
    """
    if kind in ("sd15", "sdxl"):
        from prefpipe.tiny import write_tiny_pipeline

        if size % 8:
            raise PrefpipeError(f"--size {size}: must be a multiple of 8")
        path = write_tiny_pipeline(kind, out, seed=seed, size=size)
    else:
        from labelers.tiny import write_tiny_scorer

        path = write_tiny_scorer(kind, out, seed=seed)
    click.echo(f"tiny {kind}: wrote {path}")



if __name__ == "__main__":
    main()
