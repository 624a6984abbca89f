"""`prefpipe ingest hpdv2`: HPDv2 rankings -> pairs.

`train.json`: prompt, file_path or image_path, human_preference (1 = preferred); `test.json`: prompt,
image_path, rank (1 = best). The file is streamed entry by entry with ijson (the JSON array is never loaded
whole); images are read from `<split>/` beside it; each entry's ranking becomes pairs: `--pairs all` (every
two images with different scores; equal scores are ties) or `best-worst` (one pair). A unit is
`--entries-per-shard` consecutive entries. Duplicates (see duplicates.py): by image path across the file,
from a light pass over the entries; by image bytes within a unit.

Confinement: an image path of the JSON (absolute, `../`, or through a symlink) is read only if it resolves,
symlinks followed, inside the folder given as --from (or inside its `<split>/` folder, itself possibly a
link); any other is never opened, and its pairs are dropped as `outside_folder`, logged with their key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ijson
import pyarrow as pa

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.files import sha256_file
from prefpipe.core.identity import fingerprint
from prefpipe.core.images import ImageChecker
from prefpipe.core.prompts import prompt_id
from prefpipe.core.schema import PAIRS, conform
from prefpipe.stages.ingest.duplicates import RepeatedPairs, digest, key64, pair_key, plan_duplicates
from prefpipe.stages.ingest.options import IngestOptions
from prefpipe.stages.ingest.run import Job, UnitContext, checked_options, run_units


# -- the annotation file ---------------------------------------------------------------------------
def iter_json_array(path: str | Path, chunk_size: int = 1 << 20) -> Iterator[Any]:
    """Stream the elements of a top-level JSON array without loading the file (memory ~ one element).

    Reads `chunk_size` bytes at a time (ijson). Numbers are int or float; anything after the closing
    bracket is ignored. A file that is not a JSON array, is cut short, is malformed or is not UTF-8 raises
    PrefpipeError naming the file.
    """
    count = 0
    with open(path, "rb") as f:
        if not _opens_an_array(f, chunk_size):
            raise PrefpipeError(f"{path}: expected a JSON array of entries")
        f.seek(0)
        try:
            for entry in ijson.items(f, "item", use_float=True, buf_size=chunk_size):
                yield entry
                count += 1
        except ijson.JSONError as e:
            text = str(e)
            if "trailing garbage" in text or "Additional data" in text:  # after the closing bracket
                return
            if "UTF8" in text or "codec can't decode" in text:
                raise PrefpipeError(f"{path}: not UTF-8 text (in entry {count}); JSON files must be UTF-8") from None
            if "premature EOF" in text or text.startswith("Incomplete"):
                raise PrefpipeError(f"{path}: the JSON array is not closed (file truncated?)") from None
            reason = re.split(r"\n|\\n", text.removeprefix("b'"))[0].strip()
            raise PrefpipeError(f"{path}: malformed JSON at entry {count} ({reason})") from None


def _opens_an_array(f, chunk_size: int) -> bool:
    """Whether the first character after leading whitespace is `[`."""
    while chunk := f.read(chunk_size):
        rest = chunk.lstrip(b" \t\r\n")
        if rest:
            return rest[:1] == b"["
    return False


class BadEntry(Exception):
    """An HPDv2 entry that gives no ranking; the message says why."""


def hpdv2_ranking(entry: Any) -> tuple[str, list[str], list[float]]:
    """(prompt, image paths, scores: higher is preferred) of one HPDv2 entry; raises BadEntry.

    train.json: `human_preference` (1 = preferred) over `file_path` (or `image_path`);
    test.json: `rank` (1 = best, an average over annotators) over `image_path`.
    """
    if not isinstance(entry, dict):
        raise BadEntry(f"entry is {type(entry).__name__}, expected an object")
    prompt = entry.get("prompt")
    paths = entry.get("file_path", entry.get("image_path"))
    if "human_preference" in entry:
        scores = [float(v) for v in entry["human_preference"]] if isinstance(entry["human_preference"], list) else None
    elif "rank" in entry:
        scores = [-float(v) for v in entry["rank"]] if isinstance(entry["rank"], list) else None
    else:
        raise BadEntry("neither 'human_preference' (train.json) nor 'rank' (test.json)")
    if not isinstance(prompt, str):
        raise BadEntry("'prompt' is missing or not text")
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise BadEntry("'file_path'/'image_path' is missing or not a list of paths")
    if scores is None or len(scores) != len(paths):
        raise BadEntry(f"{len(paths)} images but preferences {entry.get('human_preference', entry.get('rank'))!r}")
    if len(paths) < 2:
        raise BadEntry("fewer than two images")
    return prompt, paths, scores


def ranking_pairs(scores: list[float], mode: str) -> list[tuple[int, int, float]]:
    """(i, j, label_0) pairs from one ranking; label_0 is 1 (i preferred), 0 (j preferred) or 0.5 (tie)."""
    def label(i: int, j: int) -> float:
        return 0.5 if scores[i] == scores[j] else (1.0 if scores[i] > scores[j] else 0.0)

    if mode == "best-worst":
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        if best == worst:
            worst = len(scores) - 1 if best == 0 else 0
        i, j = sorted((best, worst))
        return [(i, j, label(i, j))]
    return [(i, j, label(i, j)) for i in range(len(scores)) for j in range(i + 1, len(scores))]


_WHY = {  # why a pair was dropped by a filter, for the log (by key)
    "tie": "the two images are ranked equal (a tie)",
    "same_images": "the same image path twice",
    "empty_caption": "the prompt is empty or blank",
    "duplicate": "repeats an earlier pair (same prompt, same image paths, same outcome)",
}
_WHY_BYTES = {
    "same_images": "the two images have identical bytes",
    "duplicate": "repeats an earlier pair of this shard (same prompt, same image bytes, same outcome)",
}


def _pair_light(prompt: str, paths: list[str], pair: tuple[int, int, float], opts: IngestOptions) -> str | None:
    """The drop reason of a pair decided without reading its images (None: keep going)."""
    i, j, l0 = pair
    if l0 == 0.5 and opts.ties == "drop":
        return "tie"
    if opts.same_images == "drop" and os.path.normpath(paths[i]) == os.path.normpath(paths[j]):
        return "same_images"
    if opts.empty_captions == "drop" and not prompt.strip():
        return "empty_caption"
    return None


class OutsideFolder(Exception):
    """An image path that resolves outside the input folder; the message says where it was looked up."""


class HPDv2Source:
    """An HPDv2 folder: `<split>.json` plus the images under `<split>/` (or paths relative to the folder).

    Image paths are confined to the folder given as --from (see :meth:`image_path`).
    """

    def __init__(self, source: str | Path, split: str):
        p = Path(source)
        if p.is_file() and p.suffix == ".json":
            self.json, self.root = p, p.parent
        elif p.is_dir():
            self.json, self.root = p / f"{split}.json", p
            if not self.json.exists():
                found = ", ".join(sorted(f.name for f in p.glob("*.json"))) or "none"
                raise PrefpipeError(f"--from {p}: no {split}.json (JSON files present: {found}); check --split")
        else:
            raise PrefpipeError(f"--from {source}: no such folder (give the HPDv2 folder holding train.json/test.json)")
        self.split = split
        self.image_dir = self.root / split
        # where image paths may lead once resolved: the folder given, and its split folder (maybe a link)
        self.allowed = (self.root.resolve(), self.image_dir.resolve())
        self.label = str(source)
        self.fingerprint = fingerprint(self.json.name, sha256_file(self.json))  # by content

    def entries(self) -> Iterator[Any]:
        return iter_json_array(self.json)

    def check_first(self) -> None:
        """A file that is not HPDv2 stops at once (its first entry names what is missing)."""
        first = next(iter(self.entries()), None)
        if first is None:
            raise PrefpipeError(f"{self.json}: no entries")
        try:
            hpdv2_ranking(first)
        except BadEntry as e:
            raise PrefpipeError(
                f"{self.json}: not an HPDv2 annotation file: entry 0: {e} (expected prompt, file_path/image_path, "
                "and human_preference or rank)"
            ) from None

    def image_path(self, rel: str) -> Path:
        """The file an entry's image path names: under `<split>/`, else under the folder (the first that
        exists), resolved (symlinks followed). Raises OutsideFolder when that lies outside the folder given
        (an absolute path elsewhere, `../`, a symlink out): such a path is never opened."""
        p = next((base / rel for base in (self.image_dir, self.root) if (base / rel).exists()), self.image_dir / rel)
        real = p.resolve()  # RuntimeError on a symlink loop, ValueError on a NUL in the path
        if not any(real.is_relative_to(base) for base in self.allowed):
            raise OutsideFolder(f"{rel} resolves outside the input folder {self.root}; not read")
        return real


def _hpdv2_units(src: HPDv2Source, opts: IngestOptions) -> Iterator[tuple[int, list[tuple[int, Any]]]]:
    """(unit, [(entry index, entry), ...]) in file order; `--limit` counts entries."""
    unit, chunk = 0, []
    for idx, entry in enumerate(src.entries()):
        if opts.limit is not None and idx >= opts.limit:
            break
        chunk.append((idx, entry))
        if len(chunk) == opts.entries_per_shard:
            yield unit, chunk
            unit, chunk = unit + 1, []
    if chunk:
        yield unit, chunk


def _light_pass(src: HPDv2Source, opts: IngestOptions) -> tuple[int, dict[int, Any]]:
    """Count the units and (when dropping duplicates) plan the global duplicates by (prompt, paths, outcome)."""
    n_units = 0

    def keyed():
        nonlocal n_units
        for unit, chunk in _hpdv2_units(src, opts):
            n_units = unit + 1
            rows, keys, k = [], [], 0
            for _, entry in chunk:
                try:
                    prompt, paths, scores = hpdv2_ranking(entry)
                except (BadEntry, TypeError, ValueError):
                    continue
                for pair in ranking_pairs(scores, opts.pairs):
                    if _pair_light(prompt, paths, pair, opts) is None and opts.duplicates == "drop":
                        i, j, l0 = pair
                        rows.append(k)
                        keys.append(key64(*pair_key(prompt, os.path.normpath(paths[i]), os.path.normpath(paths[j]), l0)))
                    k += 1
            yield unit, rows, keys

    plan = plan_duplicates(keyed())
    return n_units, plan


# -- one unit --------------------------------------------------------------------------------------
def _read_image(src: HPDv2Source, checker: ImageChecker, cache: dict, rel: str) -> tuple:
    """(bytes to store, content hash, drop reason, why) of one image path, read and checked once per entry;
    the reason is None for a good image, "outside_folder" (never read) or "bad_image"."""
    if rel not in cache:
        p = src.image_dir / rel
        try:
            p = src.image_path(rel)
            data = p.read_bytes()
        except OutsideFolder as e:
            cache[rel] = (None, None, "outside_folder", str(e))
        except (OSError, RuntimeError, ValueError) as e:  # missing, unreadable, a symlink loop, a NUL in the path
            cache[rel] = (None, None, "bad_image", f"cannot read {p}: {getattr(e, 'strerror', None) or e}")
        else:
            stored, why = checker.check(data)
            cache[rel] = (stored, digest(data), "bad_image" if why else None, why)
    return cache[rel]


def hpdv2_unit(src: HPDv2Source, chunk: list[tuple[int, Any]], opts: IngestOptions, dups, ctx: UnitContext) -> None:
    """Turn one unit's entries into pairs, drop pairs with their reason, write the rest.

    `dups`: the unit's pair indices that repeat an earlier pair (from the light pass's plan), or None.
    """
    writer, bad = ctx.writer, ctx.bad
    dup_rows = set(dups.tolist()) if dups is not None else set()
    repeated = RepeatedPairs(opts)  # byte-level duplicate keys within this unit
    rows: list[dict] = []
    k = 0  # pair index within the unit (the light pass numbers pairs the same way)

    def flush() -> None:
        if rows:
            writer.write(conform(pa.Table.from_pylist(rows), PAIRS))
            writer.count("kept", len(rows))
            rows.clear()

    for idx, entry in chunk:
        writer.count("entries_read")
        try:
            prompt, paths, scores = hpdv2_ranking(entry)
        except (BadEntry, TypeError, ValueError) as e:
            writer.count("bad_entries")
            bad("bad_entry", f"{src.json.name} entry {idx}", str(e))
            continue
        images: dict[str, tuple] = {}  # each image read once per entry
        for pair in ranking_pairs(scores, opts.pairs):
            i, j, l0 = pair
            writer.count("pairs_read")
            why = None
            reason = _pair_light(prompt, paths, pair, opts)
            if reason is None and k in dup_rows:
                reason = "duplicate"
            k += 1
            if reason is None:
                (s0, h0, reason0, why0), (s1, h1, reason1, why1) = (_read_image(src, ctx.checker, images, paths[i]),
                                                                    _read_image(src, ctx.checker, images, paths[j]))
                if reason0 or reason1:
                    reason, bad_path, why = (reason0, paths[i], why0) if reason0 else (reason1, paths[j], why1)
                    bad(reason, f"{src.json.name} entry {idx} image {bad_path}", why)
                else:
                    reason = repeated.reason(prompt, h0, h1, l0)
                    why = _WHY_BYTES.get(reason)
            if reason is not None:
                writer.count(f"dropped_{reason}")
                if reason in _WHY and bad.wants(reason):  # a filter's drop (the faults are logged above)
                    bad(reason, f"{src.json.name} entry {idx} images {paths[i]}, {paths[j]}", why or _WHY[reason])
                continue
            if l0 == 0.5:
                writer.count("ties_kept")
            rows.append({
                "caption": prompt, "jpg_0": s0, "jpg_1": s1, "label_0": l0, "label_1": 1.0 - l0,
                "image_0_uid": paths[i], "image_1_uid": paths[j],
                "best_image_uid": None if l0 == 0.5 else (paths[i] if l0 == 1 else paths[j]),
                "has_label": True, "are_different": h0 != h1, "ranking_id": idx,
                "num_example_per_prompt": len(paths), "source": "human", "prompt_id": prompt_id(prompt),
            })
            if len(rows) >= ctx.batch_size:
                flush()
        if ctx.bar is not None:
            ctx.bar.update(1)
    flush()


def ingest_hpdv2(source: str | Path, out: str | Path, opts: IngestOptions | None = None, *,
                 batch_size: int = 64, progress: bool = True, rank: int | None = None,
                 world: int | None = None) -> dict:
    """Ingest HPDv2 rankings into `out/pairs/human` as pairs; run or resume this process's units."""
    opts = checked_options(opts, batch_size)
    src = HPDv2Source(source, opts.split)
    src.check_first()
    n_units, dups = _light_pass(src, opts)

    def units(todo: list[int]):
        pending = set(todo)
        return ((unit, chunk) for unit, chunk in _hpdv2_units(src, opts) if unit in pending), None

    def run_unit(unit: int, chunk: list[tuple[int, Any]], ctx: UnitContext) -> None:
        hpdv2_unit(src, chunk, opts, dups.get(unit), ctx)

    return run_units(Job(
        stage="ingest hpdv2", noun="entries", item="entry", options=opts.identity("hpdv2"),
        input_fingerprint=src.fingerprint, n_units=n_units, units=units, run_unit=run_unit,
        header=f"ingest hpdv2: {src.json} ({n_units} shards of up to {opts.entries_per_shard} entries, "
               f"--pairs {opts.pairs})",
    ), out, opts, batch_size=batch_size, progress=progress, rank=rank, world=world)
