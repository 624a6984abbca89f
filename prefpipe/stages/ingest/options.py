"""The options of `prefpipe ingest`: what decides the output, and the click options both sources share."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from prefpipe.core.errors import PrefpipeError

HUMAN_PAIRS = Path("pairs") / "human"
# Drop reasons, in the order they are checked (cheap checks first, decoding last) and reported.
# outside_folder: an HPDv2 image path that resolves (symlinks followed) outside the folder given as --from.
REASONS = ("unlabeled", "bad_label", "tie", "same_images", "empty_caption", "duplicate", "outside_folder",
           "bad_image")
# The drops the options ask for (logged at INFO); the other reasons are faults in the data (WARNING).
FILTERED = ("unlabeled", "tie", "same_images", "empty_caption", "duplicate")


@dataclass
class IngestOptions:
    """Options that decide the output (recorded in `_prefpipe.json`; a resume must match them)."""

    split: str = "train"
    ties: str = "drop"  # drop | keep (as label 0.5 / 0.5)
    unlabeled: str = "drop"  # Pick-a-Pic rows with has_label false
    same_images: str = "drop"  # are_different false, or identical image bytes
    empty_captions: str = "drop"
    duplicates: str = "drop"
    verify_images: str = "header"  # full: decode every image | header: parse + end marker | none
    max_side: int | None = None  # re-encode (JPEG) images whose longer side exceeds this, keeping aspect
    jpeg_quality: int = 90
    limit: int | None = None  # first N input rows (Pick-a-Pic) or entries (HPDv2)
    pairs: str = "all"  # HPDv2: all | best-worst
    entries_per_shard: int = 2000  # HPDv2: entries of the JSON file per unit

    def identity(self, kind: str) -> dict[str, Any]:
        """The options that apply to `kind` (pickapic | hpdv2), as recorded in `_prefpipe.json`."""
        skip = {"pickapic": ("pairs", "entries_per_shard"), "hpdv2": ("unlabeled",)}[kind]
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def validate(self) -> None:
        for name in ("ties", "unlabeled", "same_images", "empty_captions", "duplicates"):
            if getattr(self, name) not in ("drop", "keep"):
                raise PrefpipeError(f"--{name.replace('_', '-')} {getattr(self, name)}: choose drop or keep")
        if self.verify_images not in ("full", "header", "none"):
            raise PrefpipeError(f"--verify-images {self.verify_images}: choose full, header or none")
        if self.pairs not in ("all", "best-worst"):
            raise PrefpipeError(f"--pairs {self.pairs}: choose all or best-worst")
        if self.max_side is not None and self.max_side < 8:
            raise PrefpipeError(f"--max-side {self.max_side}: must be at least 8 pixels")
        if not 1 <= self.jpeg_quality <= 100:
            raise PrefpipeError(f"--jpeg-quality {self.jpeg_quality}: must be 1..100")
        if self.limit is not None and self.limit < 1:
            raise PrefpipeError(f"--limit {self.limit}: must be at least 1")
        if self.entries_per_shard < 1:
            raise PrefpipeError(f"--entries-per-shard {self.entries_per_shard}: must be at least 1")


def filter_options(f):
    """The click options of both `ingest` commands: the output folder, the filters, image checks, batching."""
    drop_keep = click.Choice(["drop", "keep"])
    for decorator in reversed([
        click.option("--out", required=True, type=click.Path(), help="Work folder; pairs go to WORKDIR/pairs/human (re-run to resume)."),
        click.option("--ties", type=drop_keep, default="drop", show_default=True, help="Ties: drop (as the Diffusion-DPO paper), or keep as label 0.5/0.5."),
        click.option("--same-images", type=drop_keep, default="drop", show_default=True, help="Pairs of one image twice (are_different false, same path or identical bytes)."),
        click.option("--empty-captions", type=drop_keep, default="drop", show_default=True, help="Rows whose caption is empty or blank."),
        click.option("--duplicates", type=drop_keep, default="drop", show_default=True, help="Repeats of a pair (same caption, same images in either order, same outcome); the first is kept."),
        click.option("--verify-images", type=click.Choice(["full", "header", "none"]), default="header", show_default=True, help="full: decode every image; header: parse it and check the JPEG end marker (about 30x cheaper); none."),
        click.option("--max-side", type=click.IntRange(min=8), default=None, help="Re-encode (JPEG) images whose longer side exceeds N pixels, keeping the aspect ratio."),
        click.option("--jpeg-quality", type=click.IntRange(1, 100), default=90, show_default=True, help="JPEG quality of re-encoded images (--max-side)."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N input rows (Pick-a-Pic) or entries (HPDv2): a quick slice."),
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Rows per batch read and per output row group."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
    ]):
        f = decorator(f)
    return f
