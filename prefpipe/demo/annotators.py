"""Simulated annotators: people who judge pairs of the base model's images, written as Pick-a-Pic v2.

`make demo-feedback` compares human with AI feedback, and no people are at hand; so, as the drawing
program knows what each caption asked for, annotators are simulated from the oracle
(`prefpipe/demo/oracle.py`) with a stated noise rate:

- a pair of two candidates of one prompt is shown to one of `annotators` people (drawn at random);
- where the oracle separates the two images (one shows more of the asked-for shape colour, background
  colour and shape: `Reading.utility`), the person calls a tie with probability `tie_rate` and otherwise
  picks the oracle's choice with probability `agreement / (1 - tie_rate)`: over such pairs, `agreement`
  agree, `tie_rate` tie, the rest pick the other image (defaults 80%, 10%, 10%);
- where the oracle cannot separate them, the person calls a tie with probability `tie_rate` and otherwise
  picks either image at random (people rarely say "no preference", and the task then is a coin).

The judgments are written as the published Pick-a-Pic v2 dataset is: `data/train-NNNNN-of-NNNNN-<16 hex>.parquet`
shards with exactly its columns and types (`prefpipe.core.schema.PICKAPIC_V2`, plus the stray pandas
`__index_level_0__`), images as JPEG bytes in `jpg_0`/`jpg_1` (quality 95, no chroma subsampling: 32 px
colours survive), ties as labels (0.5, 0.5). `prefpipe ingest pickapic --from DIR` reads them as it reads
the real dataset. `DIR/annotators.json` records the rates asked for and those realised.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.files import atomic_output, write_atomic
from prefpipe.core.schema import PICKAPIC_V2
from prefpipe.core.tables import iter_batches
from prefpipe.demo import oracle

PUBLISHED = pa.schema(list(PICKAPIC_V2) + [pa.field("__index_level_0__", pa.int64())])
FIRST_JUDGMENT = dt.datetime(2023, 5, 1, 12, 0, 0)


@dataclass
class AnnotatorOptions:
    pairs_per_prompt: int = 6  # of the C*(C-1)/2 pairs of a prompt's C candidates, drawn without repeats
    agreement: float = 0.8  # over pairs the oracle separates: the fraction that agree with it
    tie_rate: float = 0.1  # the fraction called a tie (any pair)
    annotators: int = 8
    shards: int = 4
    seed: int = 0

    def check(self) -> None:
        if not 0 <= self.tie_rate < 1 or not 0 <= self.agreement <= 1 - self.tie_rate:
            raise PrefpipeError(f"--agreement {self.agreement}, --tie-rate {self.tie_rate}: need 0 <= tie rate < 1 "
                                "and agreement <= 1 - tie rate")
        if self.pairs_per_prompt < 1 or self.annotators < 1 or self.shards < 1:
            raise PrefpipeError("--pairs-per-prompt, --annotators and --shards must be at least 1")


def jpeg(png: bytes, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def judge(u0: int, u1: int, rng: np.random.Generator, opts: AnnotatorOptions) -> float:
    """label_0 of one simulated person: 1 (image 0), 0 (image 1) or 0.5 (tie), given the oracle's utilities."""
    r = rng.random()
    if r < opts.tie_rate:
        return 0.5
    if u0 == u1:
        return float(rng.random() < 0.5)
    agree = r < opts.tie_rate + opts.agreement
    return float((u0 > u1) == agree)


def read_candidates(candidates: str | Path) -> dict[str, list[dict]]:
    """prompt_id -> its candidates ({"candidate", "prompt", "image", "reading"}), in candidate order."""
    by_prompt: dict[str, list[dict]] = {}
    for batch in iter_batches(candidates, columns=["prompt_id", "prompt", "candidate", "image"]):
        for row in batch.to_pylist():
            row["reading"] = oracle.read(oracle.to_pixels(row["image"]), row["prompt"])
            by_prompt.setdefault(row["prompt_id"], []).append(row)
    for rows in by_prompt.values():
        rows.sort(key=lambda r: r["candidate"])
    return dict(sorted(by_prompt.items()))


def annotate(candidates: str | Path, out: str | Path, opts: AnnotatorOptions) -> dict:
    """Judge pairs of `candidates` (a `prefpipe generate` dataset) into Pick-a-Pic v2 shards under OUT/data."""
    opts.check()
    out = Path(out)
    rng = np.random.default_rng(opts.seed)
    by_prompt = read_candidates(candidates)
    rows: list[dict] = []
    counts = {"pairs": 0, "oracle_separates": 0, "agree": 0, "disagree": 0, "ties": 0, "oracle_ties_coin": 0}
    for pid, cands in by_prompt.items():
        index = [(i, j) for i in range(len(cands)) for j in range(i + 1, len(cands))]
        take = rng.permutation(len(index))[: opts.pairs_per_prompt]
        for k in take:
            a, b = (cands[x] for x in (index[k] if rng.random() < 0.5 else index[k][::-1]))
            u0, u1 = a["reading"].utility, b["reading"].utility
            label = judge(u0, u1, rng, opts)
            counts["pairs"] += 1
            if label == 0.5:
                counts["ties"] += 1
            elif u0 != u1:
                counts["agree" if (label == 1) == (u0 > u1) else "disagree"] += 1
            else:
                counts["oracle_ties_coin"] += 1
            counts["oracle_separates"] += u0 != u1
            uid = [f"{pid}-{c['candidate']}" for c in (a, b)]
            rows.append({
                "are_different": True,
                "best_image_uid": uid[0] if label == 1 else uid[1] if label == 0 else None,
                "caption": a["prompt"],
                "created_at": FIRST_JUDGMENT + dt.timedelta(seconds=len(rows)),
                "has_label": True,
                "image_0_uid": uid[0], "image_0_url": f"https://demo.invalid/{uid[0]}.jpg",
                "image_1_uid": uid[1], "image_1_url": f"https://demo.invalid/{uid[1]}.jpg",
                "jpg_0": jpeg(a["image"]), "jpg_1": jpeg(b["image"]),
                "label_0": label, "label_1": 1.0 - label,
                "model_0": "demo-base", "model_1": "demo-base",
                "ranking_id": len(rows), "user_id": int(rng.integers(opts.annotators)),
                "num_example_per_prompt": 1,
            })
    if not rows:
        raise PrefpipeError(f"{candidates}: no prompt with two candidates to pair")
    shards = min(opts.shards, len(rows))
    bounds = np.linspace(0, len(rows), shards + 1).astype(int)
    with atomic_output(out) as tmp:
        (tmp / "data").mkdir(parents=True)
        for k in range(shards):
            part = rows[bounds[k]:bounds[k + 1]]
            cols = {f.name: [r.get(f.name) for r in part] for f in PUBLISHED if f.name != "__index_level_0__"}
            cols["__index_level_0__"] = list(range(bounds[k], bounds[k + 1]))
            table = pa.table(cols, schema=PUBLISHED)
            digest = hashlib.sha256(b"".join(r["jpg_0"] + r["jpg_1"] for r in part)).hexdigest()[:16]
            pq.write_table(table, tmp / "data" / f"train-{k:05d}-of-{shards:05d}-{digest}.parquet")
        separated = counts["oracle_separates"]
        record = {
            "options": asdict(opts), "candidates": str(candidates), "prompts": len(by_prompt), **counts,
            "realised": {
                "agreement_where_oracle_separates": counts["agree"] / separated if separated else None,
                "ties": counts["ties"] / counts["pairs"],
            },
        }
        write_atomic(tmp / "annotators.json", json.dumps(record, indent=2) + "\n")
    return record


@click.command("demo-annotate")
@click.option("--candidates", required=True, type=click.Path(exists=True), help="The base model's candidates (`prefpipe generate`).")
@click.option("--out", required=True, type=click.Path(), help="Folder to write: data/train-*.parquet (Pick-a-Pic v2) and annotators.json.")
@click.option("--pairs-per-prompt", type=click.IntRange(min=1), default=6, show_default=True, help="Pairs judged per prompt.")
@click.option("--agreement", type=click.FloatRange(0, 1), default=0.8, show_default=True,
              help="Over pairs the oracle separates: the fraction of judgments that agree with it.")
@click.option("--tie-rate", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="The fraction of judgments that are ties (labels 0.5, 0.5).")
@click.option("--annotators", type=click.IntRange(min=1), default=8, show_default=True, help="Simulated people (user_id).")
@click.option("--shards", type=click.IntRange(min=1), default=4, show_default=True, help="Parquet shards to write.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Rewrite OUT even if it is there.")
def demo_annotate(candidates, out, force, **options):
    """Simulated annotators judge pairs of candidates (from the oracle, with noise); writes Pick-a-Pic v2 shards."""
    if (Path(out) / "annotators.json").exists() and not force:
        click.echo(f"demo-annotate: {out} is already written (--force rewrites it)", err=True)
        return
    r = annotate(candidates, out, AnnotatorOptions(**options))
    click.echo(
        f"demo-annotate: {r['pairs']} pairs of {r['prompts']} prompts judged by {options['annotators']} simulated "
        f"annotators: {r['ties']} ties, and where the oracle separates the images ({r['oracle_separates']}) "
        f"{r['agree']} agree, {r['disagree']} disagree -> {Path(out) / 'data'}",
        err=True,
    )
