"""Outputs diffusers loads directly; nothing here is a prefpipe format.

- **LoRA runs**: `RUN/pytorch_lora_weights.safetensors`, written by the pipeline class's own
  `save_lora_weights` (the diffusers keys of `get_peft_model_state_dict` after
  `convert_state_dict_to_diffusers`, as diffusers' `train_dreambooth_lora*.py` scripts write them), with the
  adapter's `LoraConfig` as metadata so a `lora_alpha` other than the rank keeps its scale. Load with
  `pipe.load_lora_weights(RUN)` or `prefpipe generate --model BASE --lora RUN`.
- **Full runs**: `RUN/unet`, a `UNet2DConditionModel` folder that replaces the base pipeline's UNet
  (`UNet2DConditionModel.from_pretrained(RUN / "unet")`, or `prefpipe generate --unet RUN`). A run sharded
  with FSDP writes the same folder, from the full state dict gathered into the main process. SD3/FLUX runs write
  `RUN/transformer` (`SD3Transformer2DModel` / `FluxTransformer2DModel.from_pretrained(RUN / "transformer")`).
- **SD3/FLUX LoRA runs**: the transformer's adapters in peft's keys through `StableDiffusion3Pipeline` /
  `FluxPipeline.save_lora_weights(transformer_lora_layers=)`, the same file name; those pipelines'
  `load_lora_weights` load it.

Checkpoints (`RUN/checkpoint-STEP`, trainer/checkpoints.py) hold LoRA weights in the same format, so any
checkpoint of a LoRA run also loads into a pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"


def _pipeline_class(family: str):
    import diffusers

    return getattr(diffusers, {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
                               "flux": "FluxPipeline"}.get(family, "StableDiffusionPipeline"))


def _is_transformer(family: str) -> bool:
    return family in ("sd3", "flux")


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter weights of a peft-adapted UNet as float32 CPU tensors, in diffusers' key format.

    `convert_state_dict_to_diffusers` renames attention adapters only (`to_q.lora_A` -> `to_q.lora.down`);
    with feed-forward or conv targets it would leave a mixed file that `load_lora_weights` (0.42) loads
    only partly (it decides the format from the first key), so such adapters keep peft's own keys,
    which diffusers loads as they are.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    peft_state = get_peft_model_state_dict(unet)
    state = convert_state_dict_to_diffusers(dict(peft_state))
    if any(".lora_A." in k or ".lora_B." in k for k in state):
        state = peft_state
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def save_lora(unet, folder: str | Path, family: str) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` for `pipe.load_lora_weights(folder)`. SD3/FLUX: the
    transformer's adapters in peft's keys (``transformer.<module>.lora_A.weight``), as diffusers'
    `train_dreambooth_lora_sd3.py` / `_flux.py` save them with `save_lora_weights(transformer_lora_layers=)`."""
    metadata = unet.peft_config["default"].to_dict()
    if _is_transformer(family):
        from peft.utils import get_peft_model_state_dict

        layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(unet).items()}
        _pipeline_class(family).save_lora_weights(
            save_directory=str(folder), transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata,
            weight_name=LORA_FILE,
        )
        return Path(folder) / LORA_FILE
    _pipeline_class(family).save_lora_weights(
        save_directory=str(folder), unet_lora_layers=lora_state_dict(unet), unet_lora_adapter_metadata=metadata,
        weight_name=LORA_FILE,
    )
    return Path(folder) / LORA_FILE


def load_lora(unet, folder: str | Path, family: str) -> None:
    """Load weights written by :func:`save_lora` into a UNet that already carries the same adapter (from the
    safetensors file only: diffusers would otherwise fall back to a pickled `.bin` when it fails to read)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    if _is_transformer(family):  # our own file, in peft's keys: read as it is (safetensors, never a pickle)
        from safetensors.torch import load_file

        state = {k.removeprefix("transformer."): v for k, v in load_file(str(Path(folder) / LORA_FILE)).items()
                 if k.startswith("transformer.")}
        result = set_peft_model_state_dict(unet, state, adapter_name="default")
    else:
        state, _ = _pipeline_class(family).lora_state_dict(str(folder), weight_name=LORA_FILE, use_safetensors=True)
        state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
        result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"{folder}: LoRA weights do not match the adapter (unexpected keys {unexpected[:3]})")


def save_full_unet(unet, run: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `run/unet` (config.json + safetensors) in float32; for a flow transformer `run/transformer`
    (`SD3Transformer2DModel` / `FluxTransformer2DModel.from_pretrained(RUN / "transformer")`).

    `state_dict`: the full weights of a sharded `unet` (FSDP2's `accelerator.get_state_dict`, gathered into
    this process); they are loaded into a fresh, unsharded model of the same class and config (built on the
    meta device, so no second set of weights is allocated), which is what gets saved.
    """
    folder = Path(run) / ("unet" if "UNet" in unsharded_class(unet).__name__ else "transformer")
    if state_dict is not None:
        from accelerate import init_empty_weights

        with init_empty_weights():
            plain = unsharded_class(unet).from_config(unet.config)
        plain.load_state_dict(state_dict, strict=True, assign=True)
        unet = plain
    unet.save_pretrained(folder, safe_serialization=True)
    return folder


def unsharded_class(module) -> type:
    """The model's own class: FSDP2's `fully_shard` swaps a module's class for a subclass of (FSDPModule, it)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


# -- the model card ----------------------------------------------------------------------------------------
CARD = "README.md"
SAMPLES = "samples"  # RUN/samples/eval-K.png: the images of the last eval shown in the card
# the hub tag of each objective (diffusers' and the papers' names)
OBJECTIVE_TAGS = {"dpo": "diffusion-dpo", "hinge": "diffusion-dpo-hinge", "ipo": "diffusion-ipo", "sft": "sft",
                  "d3po": "d3po", "mapo": "mapo", "kto": "diffusion-kto"}
OBJECTIVE_NAMES = {"dpo": "Diffusion-DPO", "hinge": "Diffusion-DPO (hinge)", "ipo": "Diffusion-IPO",
                   "sft": "supervised fine-tuning on the preferred images", "d3po": "D3PO",
                   "mapo": "MaPO (margin-aware preference optimization)", "kto": "Diffusion-KTO"}
CARD_METRICS = ("loss", "implicit_acc", "reward_margin", "clip_frac")  # the last logged values a card shows
# the options a card lists as the run's hyper-parameters (the rest are in train_config.json)
CARD_OPTIONS = ("learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps", "optimizer", "batch_size",
                "gradient_accumulation", "max_steps", "epochs", "mixed_precision", "lora_rank", "lora_alpha",
                "lora_targets", "quantize", "full", "init_from", "keep_ties", "caption_dropout", "random_crop", "random_flip", "seed")

MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ what }} of [{{ base }}]({{ base_link }}), trained with [prefpipe](#how-it-was-trained) on {% if data.images %}{{ data.images }}
images labelled desirable or undesirable (per-image feedback).{% else %}{{ pairs }} preference
pairs.{% endif %}
{% if evaluation %}
**Eval:** {{ evaluation.headline }}
{% endif %}
## Use it

```python
{{ usage }}
```
{% if samples %}
## Samples

From the last `prefpipe eval` (the same seeds as the base model's images in its report):

{% for s in samples -%}
![{{ s.prompt }}]({{ s.file }})
{% endfor %}
{% endif %}
## How it was trained

- objective: `{{ objective }}` ({{ objective_name }}){% for k, v in hyper.items() %}, {{ k }} {{ v }}{% endfor %}
- steps: {{ training.steps }}{% if training.last %}; last logged {% for k, v in training.last.items() %}{{ k }} {{ v }}{{ ", " if not loop.last else "" }}{% endfor %}{% endif %}
- data digest (the training data by content): `{{ data.digest }}`

| option | value |
| --- | --- |
{% for k, v in options.items() -%}
| {{ k }} | {{ v }} |
{% endfor %}
### Where the training data came from

| dataset | stage | source | scorer | rows | content digest |
| --- | --- | --- | --- | --- | --- |
{% for d in data.sources -%}
| `{{ d.path }}` | {{ d.stage }} | {{ d.source }} | {{ d.scorer }} | {{ d.rows }} | `{{ d.digest }}` |
{% endfor %}
{% if data.counts %}
Read and kept: {% for k, v in data.counts.items() %}{{ k }} {{ v }}{{ ", " if not loop.last else "" }}{% endfor %}.
{% endif %}
{% if curves %}
![training curves]({{ curves }})
{% endif %}
{% if evaluation %}
## Evaluation

`prefpipe eval` on {{ evaluation.prompts }} held-out prompts x {{ evaluation.per_prompt }} seeds, each image of this
model against the base model's image of the same prompt and seed:

| scorer | win rate vs base | 95% interval | pairs | mean (base -> tuned) |
| --- | --- | --- | --- | --- |
{% for r in evaluation.results -%}
| {{ r.scorer }} | {{ r.win_rate }} | {{ r.win_rate_ci }} | {{ r.n }} | {{ r.base_mean }} -> {{ r.tuned_mean }} |
{% endfor %}
Report: `{{ evaluation.report }}`.
{% endif %}
Files: `train_config.json` (every option and the numbers derived from them), `metrics.jsonl` (one line per logged
step){% if curves %}, `curves.png`{% endif %}.
"""


def is_hub_id(model: str) -> bool:
    """A hub repo id (`org/name`) rather than a local folder: only such a base goes into the card's `base_model`."""
    import re

    return not Path(model).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", model) is not None


def pairs_provenance(paths: list[str | Path]) -> list[dict]:
    """Where the training pairs came from, per dataset: the stage that wrote it (its `_prefpipe.json`), the sources
    and scorers in its `source` / `scorer` columns, its rows and content digest."""
    from collections import Counter

    from prefpipe.core.identity import input_fingerprint
    from prefpipe.core.tables import count_rows, dataset_schema, iter_batches, read_manifest

    out = []
    for path in paths:
        p = Path(path)
        manifest = read_manifest(p) if p.is_dir() else {}
        names = dataset_schema(p).names
        columns = [c for c in ("source", "scorer") if c in names]
        seen: Counter = Counter()
        if columns:
            for batch in iter_batches(p, columns=columns, batch_size=65536):
                cols = [batch.column(c).to_pylist() for c in columns]
                seen.update(zip(*cols))
        sources = sorted({str(v[0]) for v in seen if v and v[0] is not None}) if "source" in columns else []
        scorers = sorted({str(v[-1]) for v in seen if v and v[-1] is not None}) if "scorer" in columns else []
        out.append({
            "path": str(p), "stage": manifest.get("stage", "unknown"), "source": ", ".join(sources) or "unknown",
            "scorer": ", ".join(scorers) or "none", "rows": count_rows(p),
            "digest": manifest.get("digest") or input_fingerprint(p),
        })
    return out


def model_card_facts(cfg, summary: dict, resolved: dict, data_paths: list[str | Path]) -> dict:
    """What a run's card says, as data (kept in the card's YAML under `prefpipe`, so `prefpipe eval` can add its
    results and re-render): base model, objective and hyper-parameters, data provenance, last metrics."""
    hyper = {k: resolved[k] for k in ("beta", "eps") if resolved.get(k) is not None}
    hyper.update(lr=resolved.get("lr"), effective_batch=resolved.get("effective_batch"),
                 resolution=resolved.get("resolution"))
    counts = {k: v for k, v in (summary.get("data") or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {
        "base_model": cfg.model,
        "objective": cfg.objective,
        "kind": "unet" if cfg.full else "lora",
        "family": resolved.get("family"),
        "hyperparameters": {k: v for k, v in hyper.items() if v is not None},
        "options": {k: getattr(cfg, k) for k in CARD_OPTIONS},
        "data": {"digest": resolved.get("data_digest"), "pairs": resolved.get("pairs"), "images": resolved.get("images"),
                 "sources": pairs_provenance(data_paths), "counts": counts},
        "training": {"steps": summary.get("steps"),
                     "last": {k: round(v, 6) for k, v in (summary.get("last") or {}).items() if k in CARD_METRICS}},
    }


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return "-" if v is None else str(v)


def render_model_card(folder: str | Path, facts: dict):
    """The `huggingface_hub.ModelCard` of a run folder from its facts (:func:`model_card_facts`, plus `eval` and
    `samples` once `prefpipe eval` has run). The YAML is `ModelCardData`'s: base_model (a hub id only),
    library_name, pipeline_tag, tags, a `widget` of the sample images, and `prefpipe` (the facts)."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    base, kind, objective = facts["base_model"], facts["kind"], facts["objective"]
    tags = ["diffusers", "text-to-image", *(["lora"] if kind == "lora" else []),
            OBJECTIVE_TAGS.get(objective, objective), "prefpipe"]
    family_tag = {"sdxl": "stable-diffusion-xl", "sd3": "stable-diffusion-3", "flux": "flux"}.get(facts.get("family"))
    if family_tag:
        tags.insert(2, family_tag)
    samples = facts.get("samples") or []
    data = ModelCardData(
        base_model=base if is_hub_id(base) else None, library_name="diffusers", pipeline_tag="text-to-image",
        tags=tags, widget=[{"text": s["prompt"], "output": {"url": s["file"]}} for s in samples] or None,
        prefpipe=facts,
    )
    where = "USER/REPO"  # the hub repo it is uploaded to (`hf upload USER/REPO RUN`), or the folder
    net, cls = {"sd3": ("transformer", "SD3Transformer2DModel"), "flux": ("transformer", "FluxTransformer2DModel")}.get(
        facts.get("family"), ("unet", "UNet2DConditionModel"))
    label = "UNet" if net == "unet" else "transformer"
    load = (f'pipe.load_lora_weights("{where}")  # or the run folder {folder}' if kind == "lora" else
            f'pipe.{net} = {cls}.from_pretrained("{where}", subfolder="{net}")  # or {folder}/{net}')
    usage = ("from diffusers import DiffusionPipeline" + ("" if kind == "lora" else f", {cls}")
             + f'\n\npipe = DiffusionPipeline.from_pretrained("{base}")\n{load}\nimage = pipe("a prompt").images[0]')
    evaluation = facts.get("eval")
    if evaluation:
        evaluation = {**evaluation, "results": [{k: _fmt(v) for k, v in r.items()} for r in evaluation["results"]]}
    return ModelCard.from_template(
        data, template_str=MODEL_CARD_TEMPLATE,
        title=f"{folder.name}: {OBJECTIVE_NAMES.get(objective, objective)} {'LoRA' if kind == 'lora' else label}",
        what=f"A {'LoRA adapter' if kind == 'lora' else 'fine-tuned ' + label}",
        base=base, base_link=f"https://huggingface.co/{base}" if is_hub_id(base) else base,
        pairs=_fmt(facts["data"].get("pairs")), objective=objective, objective_name=OBJECTIVE_NAMES.get(objective, objective),
        hyper={k: _fmt(v) for k, v in facts["hyperparameters"].items()}, training=facts["training"],
        options={k: _fmt(v) for k, v in facts["options"].items()}, data=facts["data"], samples=samples,
        evaluation=evaluation, usage=usage, curves="curves.png" if (folder / "curves.png").exists() else None,
    )


def write_model_card(folder: str | Path, facts: dict) -> Path:
    """Write `folder/README.md` (atomically) from `facts`."""
    from prefpipe.core.files import write_atomic

    path = Path(folder) / CARD
    text = str(render_model_card(folder, facts))
    write_atomic(path, text if text.endswith("\n") else text + "\n")
    return path


def read_model_card_facts(folder: str | Path) -> dict | None:
    """The facts of a card prefpipe wrote (its YAML's `prefpipe`), or None (no card, or someone else's)."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD
    if not path.is_file():
        return None
    facts = ModelCard.load(path).data.to_dict().get("prefpipe")
    return facts if isinstance(facts, dict) and "objective" in facts else None


def update_model_card(folder: str | Path, evaluation: dict, samples: list[tuple[str, bytes]]) -> Path | None:
    """Add an eval's results and sample images (prompt, PNG bytes) to a run's card: the images go to
    `RUN/samples/eval-K.png` (replacing the last eval's). A folder without a prefpipe card (a checkpoint folder,
    a run from elsewhere) is left alone: returns None."""
    import shutil

    from prefpipe.core.files import write_atomic

    folder = Path(folder)
    facts = read_model_card_facts(folder)
    if facts is None:
        return None
    shutil.rmtree(folder / SAMPLES, ignore_errors=True)
    if samples:
        (folder / SAMPLES).mkdir(parents=True)
    files = []
    for k, (prompt, png) in enumerate(samples):
        name = f"{SAMPLES}/eval-{k}.png"
        write_atomic(folder / name, png)
        files.append({"prompt": prompt, "file": name})
    facts.update(eval=evaluation, samples=files)
    return write_model_card(folder, facts)
