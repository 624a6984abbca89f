"""The models of an eval: the `--tuned` runs, and the one base pipeline they share to generate their candidates.

- A `--tuned` RUN is a folder holding `pytorch_lora_weights.safetensors` (`trainer.export.LORA_FILE`, loaded
  as a LoRA by the pipeline's own `load_lora_weights`, SD3/FLUX.1 included) or a full run's denoiser
  (`prefpipe.models.denoiser_folder`: a UNet2DConditionModel in `RUN/unet/`, an SD3/FLUX transformer in
  `RUN/transformer/`, or RUN itself, replacing the base's). `NAME=RUN` names it; by default it is named after its folder.
- The base pipeline is loaded once and shared: LoRA adapters are loaded and unloaded, UNets swapped in and
  back. Generation is the generate stage itself, so it resumes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import click

from prefpipe.core.errors import PrefpipeError
from prefpipe.models import denoiser_folder
from trainer.export import LORA_FILE

if TYPE_CHECKING:
    from prefpipe.stages.eval import EvalOptions

BASE = "base"  # the base model's name in the comparison (no tuned run may take it)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class TunedRun:
    """A --tuned run: its name in the report, its folder, how it plugs into the base, and its training curves."""

    name: str
    path: str
    kind: str  # "lora" | "unet"
    metrics: str | None = None  # the training run's metrics.jsonl, when there is one

    @property
    def lora(self) -> str | None:
        return self.path if self.kind == "lora" else None

    @property
    def unet(self) -> str | None:
        return self.path if self.kind == "unet" else None


def detect_run(path: str | Path) -> str:
    """`lora` or `unet`: how a `--tuned` folder plugs into the base pipeline; an error says what is missing."""
    p = Path(path)
    if not p.exists():
        raise PrefpipeError(f"--tuned {path}: no such folder")
    if not p.is_dir():
        raise PrefpipeError(f"--tuned {path}: give the run folder (holding {LORA_FILE} or unet/), not a file")
    has_lora = (p / LORA_FILE).is_file()
    has_unet = denoiser_folder(p) is not None
    if has_lora and has_unet:
        raise PrefpipeError(f"--tuned {path}: holds both {LORA_FILE} and a UNet; point at one of them")
    if has_lora:
        return "lora"
    if has_unet:
        return "unet"
    checkpoints = sorted(c.name for c in p.glob("checkpoint-*") if c.is_dir())
    hint = f" (it has {', '.join(checkpoints[:5])}: pass one of those)" if checkpoints else ""
    raise PrefpipeError(
        f"--tuned {path}: neither {LORA_FILE} (a LoRA run) nor a UNet or transformer folder "
        f"(unet/config.json, transformer/config.json) is there{hint}"
    )


def _metrics_file(run: Path) -> str | None:
    for folder in (run, run.parent):  # a checkpoint folder inside its run folder shares the run's curves
        if (folder / "metrics.jsonl").is_file():
            return str(folder / "metrics.jsonl")
    return None


def parse_tuned(specs: list[str] | tuple[str, ...]) -> list[TunedRun]:
    """`RUN` or `NAME=RUN` for each --tuned; names default to the folder name, made unique with its parent."""
    if not specs:
        raise PrefpipeError("--tuned: give at least one run folder to compare with the base")
    parsed: list[tuple[str | None, Path]] = []
    for spec in specs:
        name, path = None, spec
        head, sep, tail = spec.partition("=")
        if sep and _NAME.match(head) and not Path(spec).exists():
            name, path = head, tail
        parsed.append((name, Path(path)))
    runs: list[TunedRun] = []
    for name, path in parsed:
        kind = detect_run(path)
        if name is None:
            name = _safe_name(path.resolve().name)
            if sum(_safe_name(q.resolve().name) == name for n, q in parsed if n is None) > 1:
                name = _safe_name(f"{path.resolve().parent.name}-{path.resolve().name}")
        runs.append(TunedRun(name, str(path), kind, _metrics_file(path)))
    names = [r.name for r in runs]
    for r in runs:
        if r.name == BASE:
            raise PrefpipeError(f"--tuned {r.path}: the name '{BASE}' is the base model's; name it with NAME={r.path}")
        if names.count(r.name) > 1:
            raise PrefpipeError(f"--tuned: two runs are named '{r.name}'; name them with NAME=RUN")
    return runs


def _safe_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "tuned"
    return name if _NAME.match(name) else f"run_{name}"


class SharedPipeline:
    """One base pipeline for every model of the comparison, loaded on first use.

    `use(run)` returns it with the run plugged in (LoRA adapters loaded, or the UNet swapped in);
    `restore()` puts the base back (adapters unloaded, base UNet back), so the next run starts clean.
    """

    def __init__(self, model: str, *, dtype: str, device: str, scheduler: str | None):
        self.model, self.dtype, self.device, self.scheduler = model, dtype, device, scheduler
        self.pipe = None
        self._lora = False
        self._base_unet = None  # the base's denoiser while a full run's is swapped in
        self._component = "unet"  # ... and which component that is ("transformer" for SD3/FLUX.1)

    def use(self, run: TunedRun | None):
        if self.pipe is None:
            from prefpipe.models import load_pipeline

            self.pipe = load_pipeline(self.model, dtype=self.dtype, device=self.device, scheduler=self.scheduler)
        if run is None:
            return self.pipe
        if run.kind == "lora":
            try:
                self.pipe.load_lora_weights(run.path, adapter_name="prefpipe_eval")
            except (OSError, ValueError, RuntimeError) as e:
                raise PrefpipeError(f"--tuned {run.path}: could not load its LoRA into {self.model}: {e}") from e
            self._lora = True
        else:
            from prefpipe.models import load_denoiser

            folder, self._component = denoiser_folder(run.path) or (Path(run.path), "unet")
            base = getattr(self.pipe, self._component, None)
            if base is None:
                raise PrefpipeError(f"--tuned {run.path}: holds a {self._component}, which {self.model} does not have")
            denoiser = load_denoiser(folder, base.dtype).to(self.pipe.prefpipe_device)
            self._base_unet = base
            setattr(self.pipe, self._component, denoiser)
        return self.pipe

    def restore(self) -> None:
        if self.pipe is None:
            return
        if self._lora:
            self.pipe.unload_lora_weights()
            self._lora = False
        if self._base_unet is not None:
            setattr(self.pipe, self._component, self._base_unet)
            self._base_unet = None


def generate_all(
    opts: EvalOptions, runs: list[TunedRun], prompts_file: Path, out: Path, *,
    batch_size: int, device: str, offload: str, progress: bool,
) -> dict[str, int]:
    """Generate (or resume) base and every tuned run into `out/candidates/<name>`; images generated per model."""
    from prefpipe.core.tables import read_manifest
    from prefpipe.stages.generate import GenerateOptions, SamplingOptions, generate

    shared = SharedPipeline(opts.base, dtype=opts.dtype, device=device, scheduler=opts.scheduler)
    sampling = {f.name: getattr(opts, f.name) for f in fields(SamplingOptions)}
    made = {}
    for run in [None, *runs]:
        name = BASE if run is None else run.name
        gopts = GenerateOptions(model=opts.base, per_prompt=opts.per_prompt, **sampling,
                                lora=run.lora if run else None, unet=run.unet if run else None)
        folder = out / "candidates" / name
        click.echo(f"eval: {name}: {'base model' if run is None else f'{run.kind} {run.path}'} -> {folder}", err=True)
        # a finished dataset loads nothing; with offload, generate loads its own (hooks and swaps do not mix)
        pipe = None
        if offload == "none" and not read_manifest(folder).get("complete"):
            pipe = shared.use(run)
        try:
            counters = generate(gopts, prompts_file, folder, batch_size=batch_size, device=device,
                                offload=offload, progress=progress, pipe=pipe)
        finally:
            shared.restore()
        made[name] = counters["images"]
    return made
