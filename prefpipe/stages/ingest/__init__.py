"""The ingest stage: human preference datasets in, pairs out (`WORKDIR/pairs/human`, PAIRS schema).

    prefpipe ingest pickapic --from data/ --out WORKDIR      Pick-a-Pic v2 Parquet shards (or the hub id)
    prefpipe ingest hpdv2 --from HPD/ --out WORKDIR          HPDv2 train.json/test.json + images beside them

- options.py     IngestOptions (what decides the output), the drop REASONS, the click options both share
- run.py         the one unit loop: shards, ranks, resume, image checks, bad-row log, counters, summary
- duplicates.py  the duplicate rule: pair keys, the global plan by image id (cached), bytes within a unit
- pickapic.py    Pick-a-Pic: local Parquet or hub streaming sources, schema check, filters, one unit
- hpdv2.py       HPDv2: the streamed JSON annotations, rankings -> pairs, one unit
"""

from __future__ import annotations

import click

from prefpipe.core.errors import PrefpipeGroup
from prefpipe.stages.ingest.hpdv2 import ingest_hpdv2
from prefpipe.stages.ingest.options import IngestOptions, filter_options
from prefpipe.stages.ingest.pickapic import ingest_pickapic


@click.group(cls=PrefpipeGroup)
def ingest() -> None:
    """Bring human preference datasets in as pairs (WORKDIR/pairs/human, the pairs schema)."""


@ingest.command("pickapic")
@click.option("--from", "source", required=True, help="Folder, glob or file of the published Parquet shards (data/train-*.parquet; the *_no_images variant too), or a hub id (yuvalkirstain/pickapic_v2) streamed with `datasets`.")
@click.option("--split", default="train", show_default=True, help="Split to read (file names <split>-NNNNN-of-NNNNN*.parquet).")
@click.option("--unlabeled", type=click.Choice(["drop", "keep"]), default="drop", show_default=True, help="Rows with has_label false.")
@filter_options
def pickapic_command(source, out, batch_size, no_progress, **options):
    """Pick-a-Pic v2 (or v1) preferences -> pairs."""
    ingest_pickapic(source, out, IngestOptions(**options), batch_size=batch_size, progress=not no_progress)


@ingest.command("hpdv2")
@click.option("--from", "source", required=True, type=click.Path(), help="HPDv2 folder: train.json / test.json with the images under train/ and test/.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True, help="Which annotation file (and image folder) to read.")
@click.option("--pairs", type=click.Choice(["all", "best-worst"]), default="all", show_default=True, help="all: every two images of a ranking; best-worst: one pair per ranking.")
@click.option("--entries-per-shard", type=click.IntRange(min=1), default=2000, show_default=True, help="Entries of the JSON file per output shard (the unit of resume and of sharding).")
@filter_options
def hpdv2_command(source, out, batch_size, no_progress, **options):
    """HPDv2 rankings -> pairs."""
    ingest_hpdv2(source, out, IngestOptions(**options), batch_size=batch_size, progress=not no_progress)
