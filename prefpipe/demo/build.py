"""Build (or reuse) the demo's base model, and measure it: `prefpipe demo-model`.

**The cache.** `OUT/prefpipe_demo.json` records the config, the losses, the timings and the measured
quality (JPEG-size correlation between drawn images and their VAE reconstructions; colour accuracy of
generated images on held-out prompts). A run whose `OUT/model_index.json` exists and whose recorded config
matches does nothing; any other config retrains. The folder is written under a temporary name and renamed
when complete, so a killed run leaves no half model behind.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import click
import numpy as np
import torch

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.files import atomic_output
from prefpipe.demo.cache import ConfigCache
from prefpipe.demo.model import (
    QUICK,
    DemoConfig,
    assemble_pipeline,
    build_text_encoder,
    build_unet,
    build_vae,
    encode_moments,
    reconstruct,
    reproducible,
    to_tensor,
    to_uint8,
    tokenize,
    train_unet,
    train_vae,
)
from prefpipe.demo.world import (
    caption,
    colour_accuracy,
    combinations,
    demo_prompts,
    draw_dataset,
    jpeg_sizes,
    write_demo_prompts,
)

# Bump when drawing, training or measuring changes what a config produces: caches of older formats retrain.
# 2: trained on one thread with deterministic kernels (format 1 used every core: other weights).
DEMO_FORMAT = 2
CACHE = ConfigCache("demo-model", record="prefpipe_demo.json", marker="model_index.json", version=DEMO_FORMAT)


# ------------------------------------------------------------------------------------------------------
# Measuring the trained model
# ------------------------------------------------------------------------------------------------------


def sample_grid(images: list, columns: int, scale: int = 4):
    """A PIL grid of equally sized images, `columns` wide, upscaled (nearest) `scale` times."""
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


@torch.no_grad()
def generate_samples(pipe, prompts: list[str], per_prompt: int, steps: int, guidance: float, seed: int,
                     batch: int = 64) -> tuple[list, list[str]]:
    """`per_prompt` images of each prompt (prompt-major order), with seeded CPU generators."""
    jobs = [(p, seed + k) for p in prompts for k in range(per_prompt)]
    images = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        images += pipe(
            prompt=[p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(s) for _, s in chunk], output_type="pil",
        ).images
    return images, [p for p, _ in jobs]


def measure(pipe, cfg: DemoConfig, out: Path | None = None) -> dict:
    """Quality numbers of a trained pipeline; with `out`, also writes `samples.png` there.

    - reconstruction: Pearson correlation of JPEG sizes, drawn images vs their VAE reconstructions
      (fresh images, not the training ones), and the mean sizes of both.
    - colour accuracy: generated images of every held-out prompt, read by `read_colours`.
    - the spread of the generated images' JPEG sizes within a prompt (what the reward ranks).
    """
    drawn = draw_dataset(cfg.eval_reconstructions, cfg.seed + 1_000_003)
    recon = to_uint8(reconstruct(pipe.vae, to_tensor(drawn.pixels)))
    orig_kb, recon_kb = jpeg_sizes(drawn.pixels), jpeg_sizes(recon)
    mse = float(np.mean((drawn.pixels.astype(np.float32) - recon.astype(np.float32)) ** 2))
    metrics: dict = {
        "reconstruction": {
            "images": len(drawn.pixels),
            "jpeg_kb_correlation": float(np.corrcoef(orig_kb, recon_kb)[0, 1]),
            "jpeg_kb_original_mean": float(orig_kb.mean()),
            "jpeg_kb_reconstruction_mean": float(recon_kb.mean()),
            "psnr_db": float(10 * np.log10(255**2 / max(mse, 1e-9))),
        }
    }
    _, held_out = demo_prompts()
    images, prompts = generate_samples(pipe, held_out, cfg.eval_images_per_prompt, cfg.eval_steps,
                                       cfg.eval_guidance, cfg.seed)
    kb = jpeg_sizes(np.stack([np.asarray(im.convert("RGB")) for im in images])).reshape(len(held_out), -1)
    metrics["generation"] = {
        "prompts": "held_out",
        "images": len(images),
        "steps": cfg.eval_steps,
        "guidance": cfg.eval_guidance,
        "colour_accuracy": colour_accuracy(images, prompts),
        "jpeg_kb_mean": float(kb.mean()),
        "jpeg_kb_std_within_prompt": float(kb.std(axis=1).mean()),
    }
    if out is not None:
        columns = cfg.eval_images_per_prompt if cfg.eval_images_per_prompt > 1 else 7
        sample_grid(images, columns).save(out / "samples.png")
    return metrics


# ------------------------------------------------------------------------------------------------------
# Build (or reuse) the demo model
# ------------------------------------------------------------------------------------------------------


def build_demo_model(cfg: DemoConfig, out: str | Path, *, progress: bool = True, force: bool = False) -> dict:
    """Train the demo's base model into `out` unless it is already there with this config.

    Returns the record (what `prefpipe_demo.json` holds) plus `cached`: whether nothing had to be done.
    """
    out = Path(out)
    if (cached := CACHE.reuse(out, cfg, force)) is not None:
        return cached
    with reproducible():  # one thread, deterministic kernels: a config gives the same weights every time
        record = _train_and_save(cfg, out, progress)
    return {**record, "cached": False}


def _train_and_save(cfg: DemoConfig, out: Path, progress: bool) -> dict:
    from prefpipe.models import quiet_libraries
    from prefpipe.testing.tiny import save_pipeline

    quiet_libraries()
    times: dict[str, float] = {}
    t_all = t = time.perf_counter()
    cpu_all = time.process_time()
    torch.manual_seed(cfg.seed)

    drawn = draw_dataset(cfg.images, cfg.seed)
    pixels = to_tensor(drawn.pixels)
    times["draw"] = time.perf_counter() - t

    t = time.perf_counter()
    vae = build_vae(cfg)
    vae_curve = train_vae(vae, pixels, cfg, progress)
    times["vae"] = time.perf_counter() - t

    t = time.perf_counter()
    mean, std = encode_moments(vae, pixels)
    scaling = float(1 / mean.std())  # unit-variance latents, as SD's 0.18215 was chosen
    vae.register_to_config(scaling_factor=scaling)
    text_encoder = build_text_encoder(cfg)
    pipe = assemble_pipeline(vae, text_encoder, build_unet(cfg), cfg)
    prompt_ids = tokenize(pipe.tokenizer, [caption(*c) for c in combinations()] + [""])
    times["encode"] = time.perf_counter() - t

    t = time.perf_counter()
    pipe.unet, pipe.text_encoder, unet_curve = train_unet(
        pipe.unet, text_encoder, (mean * scaling, std * scaling), torch.from_numpy(drawn.combos), prompt_ids, cfg, progress
    )
    times["unet"] = time.perf_counter() - t

    import diffusers
    import transformers

    with atomic_output(out) as tmp:  # a killed run leaves no half model at `out`
        t = time.perf_counter()
        save_pipeline(pipe, tmp)
        times["save"] = time.perf_counter() - t

        t = time.perf_counter()
        metrics = measure(pipe, cfg, tmp)
        times["measure"] = time.perf_counter() - t
        times["total"] = time.perf_counter() - t_all
        times["total_cpu"] = time.process_time() - cpu_all  # CPU seconds of all threads: less noisy than wall time

        record = {
            "config": CACHE.identity(cfg),
            "losses": {"vae": vae_curve, "unet": unet_curve},
            "latent_scaling_factor": scaling,
            "parameters": {"vae": sum(p.numel() for p in vae.parameters()),
                           "unet": sum(p.numel() for p in pipe.unet.parameters()),
                           "text_encoder": sum(p.numel() for p in text_encoder.parameters())},
            "metrics": metrics,
            "timings_s": {k: round(v, 2) for k, v in times.items()},
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
                         "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                         "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        }
        CACHE.write(tmp, record)
    acc = metrics["generation"]["colour_accuracy"]
    click.echo(
        f"demo-model: VAE {cfg.steps_vae} steps (loss {vae_curve[0]:.4f} -> {vae_curve[-1]:.4f}), "
        f"UNet {cfg.steps_unet} steps (loss {unet_curve[0]:.4f} -> {unet_curve[-1]:.4f}) at batch {cfg.batch_size} "
        f"in {times['total']:.0f} s; JPEG-size correlation original/reconstruction "
        f"{metrics['reconstruction']['jpeg_kb_correlation']:.2f}; held-out colour accuracy "
        f"{acc['both']:.0%} (background {acc['background']:.0%}, shape {acc['shape']:.0%}) -> {out}",
        err=True,
    )
    return record


@click.command("demo-model")
@click.option("--out", default="work/demo/models/base", show_default=True, type=click.Path(),
              help="Pipeline folder to write (reused when it already holds this config).")
@click.option("--quick", is_flag=True, help="A reduced config (seconds, for tests): a model that barely draws.")
@click.option("--steps-vae", type=click.IntRange(min=1), default=None, help="VAE training steps [default: 350; quick 40].")
@click.option("--steps-unet", type=click.IntRange(min=1), default=None, help="UNet training steps [default: 400; quick 40].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per step [default: 64; quick 16].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the drawn images, the weights and the training.")
@click.option("--prompts-out", type=click.Path(), default=None,
              help="Also write the demo's prompt files here: train.txt and held_out.txt (combinations never in train.txt).")
@click.option("--force", is_flag=True, help="Retrain even if OUT already holds this config.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo_model(out, quick, steps_vae, steps_unet, batch_size, seed, prompts_out, force, no_progress):
    """Train the demo's base model: a tiny SD 1.5 learnt from scratch on drawn 32 px shapes (a few minutes on CPU).

    The captions name the shape, its colour and the background colour; the background's texture is never
    named, so JPEG size varies at a fixed caption. Writes a diffusers pipeline folder that `--model`
    accepts, with `prefpipe_demo.json` (config, losses, timings, measured quality) and `samples.png`.
    """
    cfg = QUICK if quick else DemoConfig()
    overrides = {"steps_vae": steps_vae, "steps_unet": steps_unet, "batch_size": batch_size}
    cfg = replace(cfg, seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    if prompts_out is not None:
        train, held_out = write_demo_prompts(prompts_out)
        click.echo(f"demo-model: prompts -> {train} and {held_out}", err=True)
    try:
        build_demo_model(cfg, out, progress=not no_progress, force=force)
    except OSError as e:
        raise PrefpipeError(f"--out {out}: {e}") from e
