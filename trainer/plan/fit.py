"""`--max-memory`: the settings that fit an accelerator memory budget, chosen from planned steps.

The candidates keep what the run computes and change only how: the micro-batch (with gradient accumulation
keeping the effective batch), then gradient checkpointing, and last the optimizer (Adafactor's factored
second moment instead of AdamW's two moments, which does change the updates). In that order of preference:

1. the configured settings, then smaller micro-batches (`--batch-size B` becomes `b x B/b accumulation` for
   each divisor b of B, largest first): at 1024 px one pair already fills a GPU, so a smaller micro-batch
   costs little speed, where checkpointing recomputes the forward (about 30% slower);
2. the same with gradient checkpointing on (if it was off);
3. the same with `--optimizer adafactor` (if it was adamw);
4. for LoRA, all of the above with `--quantize nf4` (the frozen base in 4 bits, `trainer.quantize`): the model
   itself changes (its weights are rounded), so it comes last.

The first candidate whose plan fits (`Plan.fits`: peak plus headroom) wins. Tracing SDXL costs 20-45 s per
candidate, so candidates are first judged from those already traced, and only those that may fit are
traced: activations scale with the micro-batch (`static + (peak - static) x b / b_traced`, within 10%), and
the weights and optimizer states of any traced plan with the same optimizer are a lower bound whatever the
micro-batch and checkpointing. None fits: the message says what the leanest settings need and which part
alone is too big (a budget under the fixed headroom fails at once).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable
from importlib.util import find_spec

from prefpipe.core.errors import PrefpipeError
from trainer.config import TrainConfig
from trainer.plan.result import GIB, HEADROOM, Plan, describe, gib, plan_training

UNITS = {"": GIB, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "k": 2**10, "m": 2**20, "g": GIB,
         "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": GIB, "tib": 2**40}


def parse_memory(text: str) -> list[float]:
    """'12GiB' (or 12G, 12, all GiB; 12GB = 12e9 bytes), or a comma list of them -> bytes."""
    out = []
    for part in (p.strip() for p in str(text).split(",")):
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", part)
        if not m or m.group(2).lower() not in UNITS or float(m.group(1)) <= 0:
            raise PrefpipeError(f"--max-memory {text!r}: give sizes such as 12GiB, 24GB or 80 (GiB), comma-separated")
        out.append(float(m.group(1)) * UNITS[m.group(2).lower()])
    return out


def candidates(cfg: TrainConfig) -> list[TrainConfig]:
    """The settings to try, in order of preference (see the module docstring)."""
    b = cfg.batch_size
    micro = [d for d in range(b, 0, -1) if b % d == 0]
    quantizable = not cfg.full and not cfg.reference_copy and find_spec("bitsandbytes") is not None
    quantize = dict.fromkeys([cfg.quantize, *(["nf4"] if quantizable else [])])
    optimizers = dict.fromkeys([cfg.optimizer, "adafactor"])
    checkpointing = dict.fromkeys([cfg.gradient_checkpointing, True])
    return [dataclasses.replace(cfg, quantize=q, optimizer=o, gradient_checkpointing=c, batch_size=m,
                                gradient_accumulation=cfg.gradient_accumulation * (b // m))
            for q, o, c, m in itertools.product(quantize, optimizers, checkpointing, micro)]


def key(c: TrainConfig) -> tuple:
    return c.quantize, c.optimizer, c.gradient_checkpointing, c.batch_size


class Search:
    """Plans of candidate settings, traced once each and estimated from each other."""

    def __init__(self, cfg: TrainConfig, step_fn, log: Callable[[str], None] | None = None):
        self.cfg, self.step_fn, self.log = cfg, step_fn, log or (lambda s: None)
        self.options = candidates(cfg)
        self.plans: dict[tuple, Plan] = {}

    def plan(self, c: TrainConfig) -> Plan:
        if key(c) not in self.plans:
            self.log(f"plan: tracing {describe_change(self.cfg, c) or 'the configured settings'} ...")
            self.plans[key(c)] = plan_training(c, self.step_fn)
        return self.plans[key(c)]

    def estimate(self, c: TrainConfig) -> float | None:
        """Bytes needed (with headroom) estimated from a traced plan of the same optimizer and checkpointing."""
        same = [(k[3], p) for k, p in self.plans.items() if k[:3] == key(c)[:3]]
        if not same:
            return None
        b, p = min(same, key=lambda bp: abs(bp[0] - c.batch_size))
        static = sum(p.category(x) for x in ("weights", "gradients", "optimizer states"))
        peak = static + (p.peak - static) * c.batch_size / b
        return peak * (1 + HEADROOM[0]) + HEADROOM[1] * GIB

    def lower_bound(self, c: TrainConfig) -> float | None:
        """Bytes needed at least (with headroom), from any traced plan with the same base and optimizer: its
        weights and optimizer states do not depend on the micro-batch or on checkpointing."""
        same = [p for k, p in self.plans.items() if k[:2] == key(c)[:2]]
        if not same:
            return None
        static = min(p.category("weights") + p.category("optimizer states") for p in same)
        return static * (1 + HEADROOM[0]) + HEADROOM[1] * GIB

    def first_fit(self, budget: float) -> tuple[TrainConfig, Plan] | None:
        if budget <= HEADROOM[1] * GIB:
            return None
        for c in self.options:
            bound, guess = self.lower_bound(c), self.estimate(c)
            if (bound is not None and bound > budget) or (guess is not None and guess > budget * 1.10):
                continue  # too big: not worth a trace
            p = self.plan(c)
            if p.fits(budget):
                return c, p
        return None

    def why_not(self, budget: float) -> str:
        """What the leanest candidate needs, and what to change."""
        if budget <= HEADROOM[1] * GIB:
            return (f"nothing fits {gib(budget)}: the plan keeps {HEADROOM[1]:g} GiB for the CUDA context and "
                    f"workspaces, and {HEADROOM[0]:.0%} of the peak for fragmentation")
        lean = self.options[-1]
        p = self.plan(lean)
        static = {x: p.category(x) for x in ("weights", "gradients", "optimizer states")}
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in static.items() if v)
        msg = (f"nothing fits {gib(budget)}: the leanest settings ({describe_change(self.cfg, lean) or 'as configured'}) "
               f"need {gib(p.needed())} with headroom (peak {gib(p.peak)}: {parts} GiB before activations "
               f"{gib(p.category('activations'))})")
        if sum(static.values()) * (1 + HEADROOM[0]) + HEADROOM[1] * GIB > budget:
            msg += ("; weights, gradients and optimizer states alone exceed it: "
                    + ("train LoRA adapters instead of --full, or shard --full over several GPUs with FSDP2 "
                       "(accelerate launch --use_fsdp --fsdp_version 2 ...)" if self.cfg.full else
                       "a smaller --lora-rank or fewer --lora-targets, or a GPU with more memory"))
        else:
            hints = ["drop --no-cache (the VAE and text encoders would stay resident)"] if self.cfg.no_cache else []
            if self.cfg.mixed_precision == "no":
                hints.append("--mixed-precision bf16 (frozen weights in bf16, activations halved)")
            hints.append(f"a lower --resolution (now {p.settings['resolution']})")
            msg += "; activations do not fit: " + ", or ".join(hints)
        return msg


def describe_change(cfg: TrainConfig, c: TrainConfig) -> str:
    """What `c` changes of `cfg`, as options."""
    out = []
    if c.batch_size != cfg.batch_size:
        out.append(f"--batch-size {c.batch_size} --gradient-accumulation {c.gradient_accumulation}")
    if c.gradient_checkpointing != cfg.gradient_checkpointing:
        out.append("--gradient-checkpointing")
    if c.optimizer != cfg.optimizer:
        out.append(f"--optimizer {c.optimizer}")
    if c.quantize != cfg.quantize:
        out.append(f"--quantize {c.quantize}")
    return " ".join(out)


def fit(cfg: TrainConfig, step_fn, log: Callable[[str], None] | None = None,
        search: Search | None = None) -> tuple[TrainConfig, Plan]:
    """The settings that fit `cfg.max_memory` (one budget), and their plan; PrefpipeError if none does.
    `search`: one whose plans may be reused (same configured settings)."""
    budgets = parse_memory(cfg.max_memory)
    if len(budgets) != 1:
        raise PrefpipeError(f"--max-memory {cfg.max_memory}: a run needs one budget (several only with --plan)")
    search = search or Search(cfg, step_fn, log)
    found = search.first_fit(budgets[0])
    if found is None:
        raise PrefpipeError(f"--max-memory {cfg.max_memory}: {search.why_not(budgets[0])}")
    return found


def budget_rows(search: Search, budgets: list[float]) -> list[dict]:
    """For each budget (bytes): the settings chosen (`change`: the options added to the configured ones) and
    their plan, or why nothing fits (`fits` False, `why`)."""
    rows = []
    for budget in budgets:
        found = search.first_fit(budget)
        if found is None:
            rows.append({"budget": budget, "fits": False, "why": search.why_not(budget).split(": ", 1)[1]})
            continue
        c, p = found
        rows.append({"budget": budget, "fits": True, "change": describe_change(search.cfg, c),
                     "settings": p.settings, "peak": p.peak, "needed": p.needed(),
                     "at_peak": {x: p.category(x) for x in ("weights", "gradients", "optimizer states", "activations")},
                     "model_flops": p.model_flops, "total_flops": p.total_flops})
    return rows


def format_budget_rows(rows: list[dict]) -> str:
    """The markdown table of :func:`budget_rows`."""
    out = ["| budget | fits with | peak (tensors) | with headroom | weights / grads / optimizer / activations GiB |",
           "|---|---|---|---|---|"]
    for r in rows:
        if not r["fits"]:
            out.append(f"| {r['budget'] / GIB:g} GiB | does not fit: {r['why']} | | | |")
            continue
        split = " / ".join(f"{v / GIB:.2f}" for v in r["at_peak"].values())
        out.append(f"| {r['budget'] / GIB:g} GiB | {r['change'] or 'as configured'} | {gib(r['peak'])} | "
                   f"{gib(r['needed'])} | {split} |")
    return "\n".join(out)


def budget_table(cfg: TrainConfig, step_fn, log: Callable[[str], None] | None = None) -> str:
    """A markdown table: for each budget of `cfg.max_memory`, the settings chosen and their plan."""
    search = Search(cfg, step_fn, log)
    rows = budget_rows(search, parse_memory(cfg.max_memory))
    return f"{describe(search.plan(search.options[0]).settings)}\n\n" + format_budget_rows(rows)


def plan_command(cfg: TrainConfig, step_fn) -> dict:
    """`prefpipe train --plan`: print the plan of `cfg` (with --max-memory: of the settings that fit; with
    several budgets: the table) on stdout. Returns it as JSON-able data."""
    import click

    log = (lambda s: click.echo(s, err=True))  # noqa: E731 - progress of long traces, beside the plan on stdout
    if cfg.max_memory and len(parse_memory(cfg.max_memory)) > 1:
        table = budget_table(cfg, step_fn, log)
        click.echo(table)
        return {"table": table}
    if cfg.max_memory:
        chosen, plan = fit(cfg, step_fn, log)
        change = describe_change(cfg, chosen)
        click.echo(f"--max-memory {cfg.max_memory}: {'fits with ' + change if change else 'fits as configured'}")
    else:
        plan = plan_training(cfg, step_fn)
    click.echo(plan.format())
    return {"plan": plan.to_json()}
