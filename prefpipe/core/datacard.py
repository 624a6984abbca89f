"""The one dataset-card writer: every stage's output folder gets a `README.md` the hub and `datasets` read.

The stage contract (`prefpipe.core.dataset.ShardedDataset`) calls :func:`write_dataset_card` when a folder's
last unit is written (and again when the stage records a summary), so every stage has a card without
asking for one. The card is made with `huggingface_hub`'s `DatasetCard` / `DatasetCardData`:

- YAML `configs` (`data_files`: split `train` = `train-*.parquet`, the shards' hub names) and `dataset_info`
  (`features`, converted from the folder's Arrow schema by `datasets.Features.from_arrow_schema`, and the
  split's row count), so `datasets.load_dataset(folder)` and the hub viewer read the same features and
  split the card states (`datasets` checks the row count when it loads);
- a body with the stage, its options, the counters summed over the units (rows kept, dropped by reason),
  the facts the stage recorded (a summary, an agreement report), its input and content digests and the
  library versions.

`_prefpipe.json` stays the source of truth; the card is rewritten from it, never read back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prefpipe.core.files import write_atomic

CARD = "README.md"
SHARDS = "train-*.parquet"  # `prefpipe.core.dataset.shard_name`'s pattern: one split, `train`

# What a folder holds, by the stage that wrote it (the stage name is in `_prefpipe.json`).
STAGE_TITLES = {
    "generate": "Candidate images (one row per generated image)",
    "score": "Scores (one row per image and scorer)",
    "pair": "AI preference pairs (Pick-a-Pic v2 columns)",
    "relabel": "Human preference pairs relabelled by AI scorers",
    "ingest pickapic": "Human preference pairs from Pick-a-Pic",
    "ingest hpdv2": "Human preference pairs from HPDv2",
    "annotate": "Human preference pairs from `prefpipe annotate`",
}
# The manifest's own keys; any other top-level key is a fact the stage recorded (`ShardedDataset.record`).
MANIFEST_KEYS = {"format", "stage", "options", "input_fingerprint", "n_units", "runtime", "versions", "created",
                 "complete", "units", "files", "digest"}

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

Written by the `{{ stage }}` stage of prefpipe (preference alignment of text-to-image diffusion models): {{ rows }} rows in {{ n_units }} Parquet shard{{ "s" if n_units != 1 else "" }}
(`{{ shards }}`, split `train`){{ "" if complete else ", not yet complete" }}.

```python
from datasets import load_dataset

ds = load_dataset("USER/REPO", split="train")  # once uploaded (`hf upload USER/REPO FOLDER --repo-type dataset`); or the folder
```

## Columns

| column | type | nullable |
| --- | --- | --- |
{% for name, dtype, nullable in columns -%}
| `{{ name }}` | {{ dtype }} | {{ "yes" if nullable else "no" }} |
{% endfor %}
## How it was made

- stage: `{{ stage }}`, created {{ created }}
- input fingerprint: `{{ input_fingerprint }}`{% if digest %}; content digest of this dataset: `{{ digest }}`{% endif %}
- versions: {{ versions }}

Options (a re-run with other values into this folder is refused):

```json
{{ options }}
```

## Counters

Summed over the finished shards:

| counter | value |
| --- | --- |
{% for k, v in counters.items() -%}
| {{ k }} | {{ v }} |
{% endfor %}
{% for name, value in recorded.items() %}
## {{ name }}

```json
{{ value }}
```
{% endfor %}"""


def dataset_info(schema: pa.Schema, rows: int | None, folder: Path | None = None):
    """`datasets.DatasetInfo` of a stage folder: its features (the Arrow schema as `datasets` converts it, which is
    what `load_dataset` returns) and, when `rows` is given (a complete folder), the `train` split's row count and
    sizes (from the shards' Parquet footers: bytes uncompressed and on disk)."""
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo

    splits = None
    sizes: dict[str, int] = {}
    if rows is not None:
        shards = sorted(folder.glob(SHARDS)) if folder is not None else []
        num_bytes = sum(pq.ParquetFile(f).metadata.row_group(i).total_byte_size
                        for f in shards for i in range(pq.ParquetFile(f).metadata.num_row_groups))
        splits = SplitDict()
        splits.add(SplitInfo(name="train", num_examples=rows, num_bytes=num_bytes))
        sizes = {"download_size": sum(f.stat().st_size for f in shards), "dataset_size": num_bytes}
    return DatasetInfo(features=Features.from_arrow_schema(schema), splits=splits, **sizes)


def dataset_card(manifest: dict, schema: pa.Schema, counters: dict[str, int | float], folder: Path | None = None):
    """The `huggingface_hub.DatasetCard` of a stage folder, from its manifest, Arrow schema and counters (and the
    folder's shards, for the split's sizes)."""
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCard, DatasetCardData

    stage = manifest.get("stage", "?")
    rows = int(counters.get("rows", 0))
    complete = bool(manifest.get("complete"))
    data = DatasetCardData(
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": SHARDS}]}],
        tags=["prefpipe", f"prefpipe-{stage.replace(' ', '-')}"],
        task_categories=["text-to-image"],
    )
    # written as `datasets` writes it (push_to_hub); the row count only once every shard is there, since
    # `load_dataset` checks it against the files
    info = dataset_info(schema, rows if complete else None, folder)
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    columns = [(f.name, getattr(info.features[f.name], "dtype", str(f.type)), f.nullable) for f in schema]
    recorded = {k: json.dumps(v, indent=2, sort_keys=True, default=str) for k, v in manifest.items()
                if k not in MANIFEST_KEYS}
    versions = ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items()) or "unknown"
    return DatasetCard.from_template(
        data, template_str=TEMPLATE, title=STAGE_TITLES.get(stage, f"prefpipe `{stage}` dataset"), stage=stage,
        rows=rows, n_units=manifest.get("n_units", 0), shards=SHARDS, complete=complete, columns=columns, created=manifest.get("created", "?"),
        input_fingerprint=manifest.get("input_fingerprint"), digest=manifest.get("digest"), versions=versions,
        options=json.dumps(manifest.get("options", {}), indent=2, sort_keys=True, default=str),
        counters=dict(sorted(counters.items())), recorded=recorded,
    )


def write_dataset_card(folder: str | Path, manifest: dict, schema: pa.Schema, counters: dict[str, int | float]) -> Path:
    """Write `folder/README.md` (atomically) for the stage folder whose manifest, schema and counters are given."""
    folder = Path(folder)
    card = dataset_card(manifest, schema, counters, folder)
    path = folder / CARD
    write_atomic(path, str(card) + ("" if str(card).endswith("\n") else "\n"))
    return path
