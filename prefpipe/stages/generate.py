"""The generate stage: N seeded candidate images per prompt from a diffusers pipeline.

    prompts file ──▶ units of `prompts_per_shard` prompts ──▶ batches across prompts ──▶ PNG rows ──▶ shard

- The seed of image (prompt_id, candidate) is `image_seed(seed, prompt_id, candidate)`: any image can be
  regenerated alone, and a resumed run writes byte-identical images (same batches, same generators).
- Each image gets its own CPU `torch.Generator`, so results do not depend on the device's RNG.
- Units are fixed ranges of the de-duplicated prompt list; rank r of w takes units r, r+w, ...
- `trajectories=True` (D3PO): DDIM sampling with `eta` (default 1.0); the candidates of one prompt share
  the initial noise (seed `noise_seed(seed, prompt_id)`) and differ by the DDIM step noise (their image
  seed), and every step's latents are stored in the `trajectory` column (`prefpipe.core.trajectory`).
- Flow-matching models (SD3/SD3.5, FLUX.1) sample with their own FlowMatchEulerDiscreteScheduler; `guidance` is
  the pipeline's `guidance_scale` (FLUX.1-dev: the distilled guidance fed to its guidance embedding), and
  `max_sequence_length` the T5 prompt length. `--trajectories` refuses them (see `check_flow_options`).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import click
import pyarrow as pa

from prefpipe.core.background import Background
from prefpipe.core.dataset import ShardedDataset, barrier, rank_world
from prefpipe.core.errors import PrefpipeError
from prefpipe.core.identity import fingerprint
from prefpipe.core.options import click_options, option, validate_fields
from prefpipe.core.prompts import read_prompts
from prefpipe.core.schema import CANDIDATES
from prefpipe.core.trajectory import encode_trajectory


def image_seed(seed: int, prompt_id: str, candidate: int) -> int:
    """The seed of one image: a pure function of (run seed, prompt id, candidate index), < 2**63."""
    digest = hashlib.sha256(f"{seed}/{prompt_id}/{candidate}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def noise_seed(seed: int, prompt_id: str) -> int:
    """Seed of the initial noise that all candidates of a prompt share when sampling trajectories."""
    return image_seed(seed, prompt_id, -1)


def parse_size(size: str | None) -> tuple[int, int] | None:
    """`1024` or `1024x768` (width x height) -> (width, height); None keeps the model's default."""
    if size is None:
        return None
    try:
        parts = [int(p) for p in str(size).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0 or any(p % 8 for p in parts):
        raise PrefpipeError(f"--size {size}: give WIDTH or WIDTHxHEIGHT in pixels, multiples of 8 (e.g. 1024 or 768x512)")
    return parts[0], parts[1]


SchedulerName = Literal["ddim", "euler", "euler-a", "dpm++", "pndm", "ddpm"]  # prefpipe.models.SCHEDULERS
DtypeName = Literal["auto", "fp32", "fp16", "bf16"]


@dataclass(kw_only=True)
class SamplingOptions:
    """How each image is sampled: the options generate, eval and the D3PO rounds share (one definition)."""

    steps: int | None = option(None, "Denoising steps [default: the pipeline's].", min=1)
    guidance: float | None = option(
        None, "Guidance scale: classifier-free for SD/SDXL/SD3; FLUX.1-dev's distilled guidance (its guidance "
        "embedding; FLUX.1-schnell ignores it) [default: the pipeline's].")
    size: str | None = option(None, "WIDTH or WIDTHxHEIGHT in pixels [default: the model's native size].")
    seed: int = option(0, "Run seed; image seeds derive from (seed, prompt_id, candidate).")
    negative_prompt: str | None = option(None, "Negative prompt for every image.")
    dtype: DtypeName = option("auto", "auto: fp16 on GPU (bf16 for SD3/FLUX), fp32 on CPU.")
    scheduler: SchedulerName | None = option(None, "Sampler [default: the model's own; SD3/FLUX: only euler].")
    max_sequence_length: int | None = option(
        None, "T5 tokens per prompt, SD3 and FLUX only [default: the pipeline's: 256 SD3, 512 FLUX].", min=1)


# SamplingOptions' fields in the order commands list them
GENERATION_ORDER = ("steps", "guidance", "size", "seed", "negative_prompt", "dtype", "scheduler", "max_sequence_length")
FLUX_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline refuses longer T5 prompts


def check_flow_options(opts: GenerateOptions, family: str | None, model: str) -> None:
    """Refuse what a flow-matching model (family `sd3`/`flux`) cannot do, before any image is made.

    `--trajectories` (D3PO) records DDIM steps and replays their Gaussian log-probability
    N(x_{t-1}; mu_theta(x_t), sigma_t^2); the flow models' sampler is a deterministic ODE (Euler on the velocity),
    whose steps have no such density. Flow-GRPO's SDE counterpart of the flow ODE would give one; prefpipe does not
    implement it, so D3PO is refused and flow models train with Diffusion-DPO on pairs (Flow-DPO).
    """
    from prefpipe.models import FLOW_FAMILIES, check_flow_scheduler

    if family not in FLOW_FAMILIES:
        if opts.max_sequence_length is not None and family is not None:
            raise PrefpipeError(
                f"--max-sequence-length: {model} has no T5 text encoder (only SD3 and FLUX.1 do); drop the option")
        return
    if opts.trajectories:
        raise PrefpipeError(
            f"--trajectories: {model} is a flow-matching model ({family}); D3PO replays the Gaussian "
            "log-probability of DDIM's stochastic steps, and a flow model's FlowMatch Euler sampler is a "
            "deterministic ODE with no such probability. D3PO is not available for SD3/FLUX: generate without "
            "--trajectories, label, and train with Diffusion-DPO on the pairs."
        )
    check_flow_scheduler(opts.scheduler, model)
    if opts.eta is not None:
        raise PrefpipeError(f"--eta: {model} is a flow-matching model ({family}); its sampler has no eta")
    if family == "flux" and opts.negative_prompt is not None:
        raise PrefpipeError(
            f"--negative-prompt: {model} is FLUX.1, guidance-distilled: it runs without classifier-free guidance, "
            "so a negative prompt would be ignored; drop it (use --guidance for FLUX.1-dev's distilled guidance)"
        )
    if family == "flux" and (opts.max_sequence_length or 0) > FLUX_MAX_SEQUENCE_LENGTH:
        raise PrefpipeError(
            f"--max-sequence-length {opts.max_sequence_length}: FLUX.1 reads at most {FLUX_MAX_SEQUENCE_LENGTH} T5 tokens")
    check_flow_size(parse_size(opts.size), family, f"--size {opts.size}")


def check_flow_size(size: tuple[int, int] | None, family: str | None, what: str) -> None:
    """SD3 and FLUX.1 images are multiples of 16 pixels (the VAE's x8, then 2x2 latent patches)."""
    from prefpipe.models import FLOW_FAMILIES

    if family in FLOW_FAMILIES and size is not None and (size[0] % 16 or size[1] % 16):
        raise PrefpipeError(f"{what}: {family} models need width and height in multiples of 16 pixels "
                            "(VAE x8, then 2x2 latent patches); pass --size")


@dataclass(kw_only=True)
class GenerateOptions(SamplingOptions):
    """Options that decide the output (recorded in `_prefpipe.json`; a resume must match them)."""

    model: str = option(None, "Diffusers pipeline: hub id (stabilityai/stable-diffusion-xl-base-1.0) or local folder.",
                        required=True)
    per_prompt: int = option(4, "Candidate images per prompt.", min=1)
    lora: str | None = option(None, "A `prefpipe train` LoRA run folder to load into the pipeline.")
    unet: str | None = option(None, "A `prefpipe train` full run (UNet folder) replacing the base UNet.")
    prompts_per_shard: int = option(64, "Prompts per output shard (the unit of resume and of sharding).", min=1)
    limit: int | None = option(None, "Use only the first N distinct prompts.", min=1)
    trajectories: bool = option(
        False, "D3PO: DDIM sampling, candidates of a prompt share the initial noise, every step's latents stored."
    )
    eta: float | None = option(None, "DDIM eta [default: 1.0 with --trajectories, else the pipeline's].")


@dataclass(kw_only=True)
class PipelineOptions:
    """Where and how the pipeline runs; they do not change the images (not recorded as the output's options)."""

    batch_size: int = option(4, "Images per pipeline call (batched across prompts).", min=1)
    device: str = option("auto", "auto, cpu, cuda, cuda:1, mps.")
    offload: Literal["none", "model", "sequential"] = option("none", "CPU offload on a small GPU.")


def _call_defaults(pipe) -> dict:
    params = inspect.signature(pipe.__call__).parameters
    return {k: p.default for k, p in params.items()}


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _identity(opts: GenerateOptions) -> dict:
    ident = asdict(opts)
    for key in ("model", "lora", "unet"):  # local paths compare by location, not spelling
        if ident[key] and Path(ident[key]).exists():
            ident[key] = str(Path(ident[key]).resolve())
    return ident


def generate(
    opts: GenerateOptions,
    prompts: str | Path,
    out: str | Path,
    *,
    batch_size: int = 4,
    device: str = "auto",
    offload: str = "none",
    progress: bool = True,
    pipe=None,
) -> dict:
    """Run (or resume) the stage for this process's share of units. Returns the summary counters.

    `pipe`: an already loaded pipeline for `opts.model` (eval and benchmarks reuse one); by default
    the pipeline is loaded here, and only when there is work left.
    """
    if opts.per_prompt < 1:
        raise PrefpipeError(f"--per-prompt {opts.per_prompt}: must be at least 1")
    if batch_size < 1:
        raise PrefpipeError(f"--batch-size {batch_size}: must be at least 1")
    if opts.prompts_per_shard < 1:
        raise PrefpipeError(f"--prompts-per-shard {opts.prompts_per_shard}: must be at least 1")
    validate_fields(opts)
    size = parse_size(opts.size)
    if opts.trajectories and opts.scheduler not in (None, "ddim"):
        raise PrefpipeError(f"--trajectories samples with DDIM (D3PO's log-probabilities need it); drop --scheduler {opts.scheduler}")
    if opts.eta is not None and opts.eta < 0:
        raise PrefpipeError(f"--eta {opts.eta}: must be >= 0")
    ps = read_prompts(prompts, limit=opts.limit)
    from prefpipe.models import model_family, model_family_of, resolve_model

    resolve_model(opts.model)  # a wrong path stops here, before anything is written
    # what the model cannot do stops here too (from its model_index.json; again below on the loaded pipeline)
    check_flow_options(opts, model_family(pipe) if pipe is not None else model_family_of(opts.model), opts.model)
    n_units = -(-len(ps) // opts.prompts_per_shard)
    rank, world = rank_world()
    ds = ShardedDataset(
        out,
        stage="generate",
        options=_identity(opts),
        input_fingerprint=fingerprint(ps.prompts),
        n_units=n_units,
        schema=CANDIDATES,
        runtime={"batch_size": batch_size, "device": device, "offload": offload, "world": world},
    ).open()
    todo = ds.pending(rank, world)
    mine = ds.units_for(rank, world)
    if rank == 0:
        click.echo(f"generate: {ps.summary()}; {n_units} shards of up to {opts.prompts_per_shard} prompts", err=True)
    counters = {"units_written": 0, "units_skipped": len(mine) - len(todo), "images": 0}
    if not todo:
        _summary(ds, counters, 0.0, 0.0, rank, world)
        return counters

    if pipe is None:
        from prefpipe.models import load_pipeline

        pipe = load_pipeline(
            opts.model, dtype=opts.dtype, device=device, offload=offload,
            scheduler="ddim" if opts.trajectories else opts.scheduler, lora=opts.lora, unet=opts.unet,
        )
    check_flow_options(opts, model_family(pipe), opts.model)
    if opts.trajectories:
        from prefpipe.models import set_scheduler

        if type(pipe.scheduler).__name__ != "DDIMScheduler":
            set_scheduler(pipe, "ddim")
    defaults = _call_defaults(pipe)
    steps = opts.steps if opts.steps is not None else defaults.get("num_inference_steps", 50)
    guidance = opts.guidance if opts.guidance is not None else defaults.get("guidance_scale", 7.5)
    if opts.negative_prompt is not None and "negative_prompt" not in defaults:
        raise PrefpipeError(f"--negative-prompt: {type(pipe).__name__} takes no negative prompt")
    if size is None:
        from prefpipe.models import native_size

        size = native_size(pipe)
        check_flow_size(size, model_family(pipe), f"{opts.model}: native size {size}")
    call = {"num_inference_steps": steps, "output_type": "pil"}
    if opts.max_sequence_length is not None:
        if "max_sequence_length" not in defaults:
            raise PrefpipeError(f"--max-sequence-length: {type(pipe).__name__} has no T5 text encoder; drop the option")
        call["max_sequence_length"] = opts.max_sequence_length
    if "guidance_scale" in defaults:
        call["guidance_scale"] = guidance
    if size is not None and "height" in defaults:
        call.update(width=size[0], height=size[1])
    eta = opts.eta if opts.eta is not None else (1.0 if opts.trajectories else None)
    if eta is not None:
        if "eta" not in defaults:
            raise PrefpipeError(f"--eta: {type(pipe).__name__} takes no eta")
        call["eta"] = eta
    if opts.trajectories and not ({"latents", "callback_on_step_end"} <= set(defaults) and size is not None):
        raise PrefpipeError(f"--trajectories: {type(pipe).__name__} cannot record its latents (needs latents= and callback_on_step_end=)")
    model_name = opts.model
    scheduler_name = type(pipe.scheduler).__name__

    import torch

    from prefpipe.core.progress import progress as progress_of

    total_images = sum(
        len(ps.prompts[u * opts.prompts_per_shard : (u + 1) * opts.prompts_per_shard]) for u in todo
    ) * opts.per_prompt
    bar = progress_of(
        total=total_images, unit="img", desc=f"generate[{rank}/{world}]" if world > 1 else "generate",
        enabled=progress, position=rank if world > 1 else None,
    )
    t_start = time.perf_counter()
    t_pipe = 0.0
    for unit in ds.claim_each(todo):
        lo = unit * opts.prompts_per_shard
        unit_prompts = list(zip(ps.ids[lo : lo + opts.prompts_per_shard], ps.prompts[lo : lo + opts.prompts_per_shard]))
        jobs = [(pid, text, c) for pid, text in unit_prompts for c in range(opts.per_prompt)]
        with ds.write_unit(unit) as writer, Background(lambda item, w=writer: _write_batch(w, *item)) as bg:
            for b in range(0, len(jobs), batch_size):
                batch = jobs[b : b + batch_size]
                seeds = [image_seed(opts.seed, pid, c) for pid, _, c in batch]
                kwargs = dict(call, prompt=[text for _, text, _ in batch])
                kwargs["generator"] = [torch.Generator("cpu").manual_seed(s) for s in seeds]
                if opts.negative_prompt is not None:
                    kwargs["negative_prompt"] = [opts.negative_prompt] * len(batch)
                steps_seen: list = []
                if opts.trajectories:
                    kwargs["latents"] = _shared_noise(pipe, opts.seed, [pid for pid, _, _ in batch], size)
                    steps_seen.append(kwargs["latents"].float().cpu())

                    def record(_pipe, _i, _t, tensors, steps_seen=steps_seen):
                        steps_seen.append(tensors["latents"].float().cpu())
                        return tensors

                    kwargs.update(callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents"])
                t0 = time.perf_counter()
                images = pipe(**kwargs).images
                t_pipe += time.perf_counter() - t0
                trajectory = None
                if opts.trajectories:  # (B, T+1, C, h, w) latents and the timesteps, encoded in the background
                    trajectory = (torch.stack(steps_seen, dim=1).numpy(), pipe.scheduler.timesteps.cpu().numpy(), eta)
                rows = {
                    "prompt_id": [pid for pid, _, _ in batch],
                    "prompt": [text for _, text, _ in batch],
                    "candidate": [c for _, _, c in batch],
                    "seed": seeds,
                    "model": [model_name] * len(batch),
                    "scheduler": [scheduler_name] * len(batch),
                    "steps": [steps] * len(batch),
                    "guidance": [float(guidance)] * len(batch),
                    "negative_prompt": [opts.negative_prompt] * len(batch),
                }
                bg.put((rows, images, trajectory))  # PNG encoding and writing overlap the next batch's sampling
                bar.update(len(batch))
            writer.count("images", len(jobs))
        counters["units_written"] += 1
        counters["images"] += len(jobs)
    bar.close()
    _summary(ds, counters, time.perf_counter() - t_start, t_pipe, rank, world)
    return counters


def _write_batch(writer, rows: dict, images: list, trajectory) -> None:
    """One batch's rows into the shard (in the background thread): PNGs, trajectories, the Parquet write."""
    rows = dict(rows, image=[_png(im) for im in images], width=[im.width for im in images],
                height=[im.height for im in images], trajectory=[None] * len(images))
    if trajectory is not None:
        stacked, timesteps, eta = trajectory
        guidance = rows["guidance"][0]
        rows["trajectory"] = [encode_trajectory(stacked[i], timesteps, eta, guidance) for i in range(len(images))]
        writer.count("trajectory_bytes", sum(len(t) for t in rows["trajectory"]))
    writer.write(pa.table(rows, schema=CANDIDATES))


def _shared_noise(pipe, seed: int, prompt_ids: list[str], size: tuple[int, int]):
    """Initial latents (B, C, h, w): one draw per prompt, shared by its candidates (D3PO)."""
    import torch

    shape = (pipe.unet.config.in_channels, size[1] // pipe.vae_scale_factor, size[0] // pipe.vae_scale_factor)
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(noise_seed(seed, pid))) for pid in prompt_ids]
    return torch.stack(noise).to(pipe.prefpipe_device, pipe.unet.dtype)


def _summary(ds: ShardedDataset, counters: dict, wall: float, t_pipe: float, rank: int, world: int) -> None:
    """Each process's line, after every process has finished its share (so `done` is the whole dataset's)."""
    barrier()
    done = sum(ds.is_done(u) for u in range(ds.n_units))
    line = (
        f"generate: {counters['images']} images in {counters['units_written']} new shards "
        f"({counters['units_skipped']} already done) -> {ds.folder}; {done}/{ds.n_units} shards finished"
    )
    traj = ds.stats().get("trajectory_bytes")
    if traj:
        line += f"; trajectories {traj / max(1, ds.stats().get('images', 1)) / 1024:.1f} KiB per image"
    if wall > 0:
        line += f"; {counters['images'] / wall:.2f} img/s, {100 * (1 - t_pipe / wall):.1f}% of wall time outside the pipeline"
    if world > 1:
        line = f"[rank {rank}/{world}] " + line
    counters.update(wall_s=wall, pipeline_s=t_pipe, shards_finished=done)
    click.echo(line, err=True)


@click.command("generate")
@click.option("--prompts", "prompts", required=True, type=click.Path(),
              help="Prompt file: .txt, .jsonl/.parquet (prompt|caption), .tsv (PartiPrompts' Prompt).")
@click.option("--out", required=True, type=click.Path(), help="Output candidates dataset folder (re-run to resume).")
@click_options(GenerateOptions, only=["model", "per_prompt", *GENERATION_ORDER, "lora", "unet", "prompts_per_shard",
                                      "limit", "trajectories", "eta"])
@click_options(PipelineOptions)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def generate_command(prompts, out, batch_size, device, offload, no_progress, **options):
    """Generate N seeded candidate images per prompt into a candidates dataset."""
    generate(GenerateOptions(**options), prompts, out, batch_size=batch_size, device=device, offload=offload,
             progress=not no_progress)
