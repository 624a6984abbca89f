"""`prefpipe train --plan`: the peak accelerator memory and the FLOPs of one training step, before any weight
is read and without a GPU.

The run's models are built from their configs (`trainer.plan.models`), one steady-state step of the recipe is
run on fake tensors (`trainer.plan.step`), and a dispatch-level tracer (`trainer.plan.trace`) counts every
tensor storage alive at each moment, by category (weights, gradients, optimizer states, activations,
temporaries) and component (UNet, LoRA, reference, VAE, text encoders), and the FLOPs of every matmul,
convolution and attention. The figure is what `torch.cuda.max_memory_allocated` would report for the step's
tensors on one CUDA process (sizes rounded up to the caching allocator's 512-byte blocks). Not in it: the
CUDA context, cuBLAS/cuDNN workspaces and the allocator's fragmentation; a budget check (:meth:`Plan.fits`)
adds :data:`HEADROOM` for them.

At the start of a run (`plan_at_start`) the step is traced only when that is quick: for a denoiser under
:data:`QUICK_PARAMS` parameters (the tiny test models, the demo's) it is computed for real on random CPU
tensors, which counts the same storages as the fake trace (tests/test_plan.py) without fake tensors' first-use
cost (2-10 s of warm-up per process, whatever the model: every tiny test run would pay it). For larger
models the run prints the exact static part (weights, gradients, optimizer states, from the loaded tensors)
and how to get the rest: tracing SDXL takes 20-45 s of one core, which every run would pay for a figure
`--plan` gives on demand.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from trainer.config import TrainConfig
from trainer.plan.trace import CATEGORIES
from trainer.quantize import parameter_count

GIB = 2**30
HEADROOM = (0.10, 1.0)  # fits a budget if peak x (1 + 0.10) + 1.0 GiB <= budget (fragmentation; context, workspaces)
QUICK_PARAMS = 20_000_000  # start-up plans trace denoisers below this size (computing the step for real)
PEAK_TFLOPS = 989.0  # H100 SXM dense bf16, for the "seconds at peak" line


@dataclass
class Plan:
    """One planned step. Bytes are exact counts of tensor storages (rounded to `granularity`)."""

    settings: dict[str, Any]
    peak: int
    peak_at: str
    at_peak: dict[str, dict[str, int]]  # category -> component -> bytes, at the peak
    flops: dict[str, int]  # phase -> FLOPs (multiply-add = 2)
    params: dict[str, int]  # unet, trainable
    seconds: float
    granularity: int = 512
    traced: bool = True  # False: the static part only (no step traced)
    real: bool = False  # True: computed on random CPU tensors (start-up plans of small models), not fake ones
    notes: list[str] = field(default_factory=list)

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    @property
    def model_flops(self) -> int:
        """FLOPs without gradient checkpointing's recomputation (what model FLOPs utilisation counts)."""
        return self.total_flops - self.flops.get("recompute", 0)

    def needed(self) -> float:
        """Bytes of accelerator memory the step needs with :data:`HEADROOM`."""
        return self.peak * (1 + HEADROOM[0]) + HEADROOM[1] * GIB

    def fits(self, budget: float) -> bool:
        return self.traced and self.needed() <= budget

    def category(self, name: str) -> int:
        return sum(self.at_peak.get(name, {}).values())

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(total_flops=self.total_flops, model_flops=self.model_flops, peak_gib=self.peak / GIB)
        return out

    def format(self, indent: str = "  ") -> str:
        """The plan as printed by `--plan` and at the start of a run."""
        s = self.settings
        lines = [f"plan: {describe(s)}"]
        if self.traced:
            lines.append(f"{indent}peak accelerator memory of one step: {gib(self.peak)} (tensors, at {self.peak_at}); "
                         f"with headroom {gib(self.needed())} (+{HEADROOM[0]:.0%} fragmentation, "
                         f"+{HEADROOM[1]:g} GiB CUDA context and workspaces)")
        else:
            lines.append(f"{indent}before activations: {gib(self.peak)} (weights, gradients, optimizer states; "
                         f"the step itself was not traced)")
        for cat in CATEGORIES:
            parts = self.at_peak.get(cat, {})
            if not parts and cat not in ("weights", "activations"):
                continue
            detail = ", ".join(f"{k} {gib(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
            lines.append(f"{indent}  {cat:<17}{gib(sum(parts.values())):>10}" + (f"  ({detail})" if detail else ""))
        if self.traced and self.flops:
            phases = ", ".join(f"{k} {v:.2e}" for k, v in self.flops.items() if v)
            lines.append(f"{indent}FLOPs per step: {self.total_flops:.3e} ({phases}); model FLOPs "
                         f"{self.model_flops:.3e} = {1e3 * self.model_flops / (PEAK_TFLOPS * 1e12):.3g} ms at "
                         f"{PEAK_TFLOPS:g} TFLOP/s (H100 bf16 dense peak)")
        lines += [f"{indent}{n}" for n in self.notes]
        if self.traced:
            how = "computed on random CPU tensors" if self.real else "traced on fake tensors"
            lines.append(f"{indent}({how} in {self.seconds:.1f} s: no weights read, no GPU used)")
        return "\n".join(lines)


def gib(n: float) -> str:
    """Bytes in GiB (MiB, KiB below 1 GiB, 1 MiB)."""
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


def describe(s: dict[str, Any]) -> str:
    """One line of the settings that decide memory and FLOPs."""
    mode = "full UNet" if s["full"] else f"LoRA rank {s['lora_rank']} on {s['lora_targets']}"
    if s.get("quantize", "none") != "none":
        mode += f" over an {s['quantize']} base"
    ref = {"copy": "frozen reference copy", "adapters off": "reference = adapters off", "none": "no reference"}[s["reference"]]
    return (f"{s['family']} at {s['resolution']} px, {s['objective']}, {mode} ({count(s['trainable'])} trainable), "
            f"{ref}, mixed precision {s['mixed_precision']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
            f"micro-batch {s['batch_size']} pair(s) x {s['gradient_accumulation']} accumulation, {s['optimizer']}, "
            + ("cached latents + text embeddings" if s["cache"] else "no cache (VAE and text encoders resident, run every step)"))


def settings_of(cfg: TrainConfig, family: str, resolution: int, trainable: int, needs_reference: bool) -> dict[str, Any]:
    reference = "none" if not needs_reference else ("copy" if cfg.full or cfg.reference_copy else "adapters off")
    return {"family": family, "model": cfg.model, "resolution": resolution, "objective": cfg.objective, "full": cfg.full,
            "lora_rank": cfg.lora_rank, "lora_targets": cfg.lora_targets, "trainable": trainable,
            "reference": reference, "mixed_precision": cfg.mixed_precision,
            "gradient_checkpointing": cfg.gradient_checkpointing, "batch_size": cfg.batch_size,
            "gradient_accumulation": cfg.gradient_accumulation, "optimizer": cfg.optimizer, "cache": not cfg.no_cache,
            "quantize": cfg.quantize}


def plan_training(cfg: TrainConfig, step_fn, *, real: bool = False, granularity: int = 512) -> Plan:
    """Trace one step of the run `cfg` describes (see the module docstring). `step_fn` is the recipe's step
    (`trainer.recipes.dpo.objective_step`; passed in: the recipe prints plans, so the planner cannot import
    it). `real=True` computes on random CPU tensors instead (to measure against)."""
    from trainer.plan.step import simulate

    tracer, m, seconds = simulate(cfg, step_fn, real=real, granularity=granularity)
    n_unet = parameter_count(m.unet)
    n_train = sum(p.numel() for p in m.params)
    settings = settings_of(cfg, m.family, m.shapes.resolution, n_train, m.objective.needs_reference)
    flops = {k: v for k, v in tracer.flops.items() if v}
    return Plan(settings, tracer.peak, tracer.peak_at, tracer.summary(), flops,
                {"unet": n_unet, "trainable": n_train}, seconds, granularity, real=real)


def optimizer_state_bytes(params, optimizer: str, granularity: int = 512) -> int:
    """Bytes of AdamW's two moments, or Adafactor's factored second moment (rows + columns of each matrix,
    the whole of a vector; no first moment: beta1 is off), for `params`."""
    def rounded(n: int) -> int:
        return -(-n // granularity) * granularity

    total = 0
    for p in params:
        size = p.element_size()
        if optimizer == "adamw":
            total += 2 * rounded(p.numel() * size)
        elif p.dim() >= 2:
            rows, cols = math.prod(p.shape[:-1]), math.prod(p.shape[:-2]) * p.shape[-1]
            total += rounded(rows * size) + rounded(cols * size) + granularity
        else:
            total += rounded(p.numel() * size) + granularity
    return total


def static_plan(cfg: TrainConfig, family: str, resolution: int, unet, params, ref_unet, encoders: list,
                needs_reference: bool, granularity: int = 512) -> Plan:
    """The part of the plan that needs no trace, from the run's loaded modules: weights by component,
    gradients, optimizer states (what is resident before the first activation)."""
    def nbytes(tensors) -> int:
        seen: dict[int, int] = {}
        for t in tensors:
            seen[t.data_ptr()] = -(-t.numel() * t.element_size() // granularity) * granularity
        return sum(seen.values())

    trainable = {id(p) for p in params}
    frozen = [t for t in [*unet.parameters(), *unet.buffers()] if id(t) not in trainable]
    weights = {"unet": nbytes([*params, *frozen])} if cfg.full else {"unet": nbytes(frozen), "lora": nbytes(params)}
    if ref_unet is not None:
        weights["reference unet"] = nbytes([*ref_unet.parameters(), *ref_unet.buffers()])
    for name, module in encoders:
        weights[name] = weights.get(name, 0) + nbytes([*module.parameters(), *module.buffers()])
    grads = {"unet" if cfg.full else "lora": nbytes(params)}
    states = {cfg.optimizer: optimizer_state_bytes(params, cfg.optimizer, granularity)}
    at_peak = {"weights": weights, "gradients": grads, "optimizer states": states}
    total = sum(sum(v.values()) for v in at_peak.values())
    n_train = sum(p.numel() for p in params)
    settings = settings_of(cfg, family, resolution, n_train, needs_reference)
    note = (f"activations and FLOPs: `prefpipe train --plan` with the same options traces the step "
            f"(about 20-45 s of one core for SDXL); runs trace it at start-up below {QUICK_PARAMS / 1e6:.0f} M UNet parameters")
    return Plan(settings, total, "start", at_peak, {}, {"unet": parameter_count(unet),
                "trainable": n_train}, 0.0, granularity, traced=False, notes=[note])


def plan_at_start(cfg: TrainConfig, step_fn, *, family: str, resolution: int, unet, params, ref_unet, encoders: list,
                  needs_reference: bool, plan: Plan | None = None) -> str:
    """The plan a run prints beside its memory description: `plan` if --max-memory already traced it, the
    full trace for a denoiser under :data:`QUICK_PARAMS` parameters, else the static part (module docstring)."""
    if plan is None and parameter_count(unet) < QUICK_PARAMS:
        import torch

        try:  # its random weights and inputs draw from a forked RNG: the run's own draws stay what they were
            with torch.random.fork_rng(devices=[]):
                plan = plan_training(cfg, step_fn, real=True)
        except Exception as e:  # noqa: BLE001 - the plan informs; it must never stop a run that would train
            return f"plan: not available ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if plan is None:
        plan = static_plan(cfg, family, resolution, unet, params, ref_unet, encoders, needs_reference)
    return plan.format()
