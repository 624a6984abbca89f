"""Prompt sets: read any supported file into distinct prompts with stable ids.

Formats: `.txt` (one prompt per line), `.jsonl` and `.parquet` (column `prompt` or `caption`),
`.tsv`/`.csv` with a header (column `Prompt`, as PartiPrompts, or `prompt`/`caption`).
Blank prompts are skipped; a prompt that appears again keeps its first position (one `prompt_id`
per distinct prompt, so no candidate is generated twice).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from prefpipe.core.errors import PrefpipeError

PROMPT_COLUMNS = ("prompt", "caption", "Prompt", "text")


def prompt_id(prompt: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of the SHA-256 of its stripped UTF-8 text."""
    return hashlib.sha256(prompt.strip().encode("utf-8")).hexdigest()[:16]


@dataclass
class PromptSet:
    prompts: list[str]
    ids: list[str]
    source: str
    read: int = 0  # prompts read, blank and duplicate ones included
    blank: int = 0
    duplicates: int = 0
    duplicate_examples: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def summary(self) -> str:
        s = f"{len(self)} distinct prompts from {self.source}"
        extra = []
        if self.blank:
            extra.append(f"{self.blank} blank skipped")
        if self.duplicates:
            extra.append(f"{self.duplicates} duplicates merged")
        return s + (f" ({', '.join(extra)})" if extra else "")


def _column(rows_columns: list[str], path: Path) -> str:
    for c in PROMPT_COLUMNS:
        if c in rows_columns:
            return c
    raise PrefpipeError(
        f"{path}: no prompt column; expected one of {', '.join(PROMPT_COLUMNS)}, found {', '.join(rows_columns) or 'none'}"
    )


def _raw_prompts(path: Path) -> list[tuple[str, object]]:
    """(location, value) for every prompt in the file; the location names the line or row."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        return [(f"line {i}", line) for i, line in enumerate(text.splitlines(), start=1)]
    if suffix == ".jsonl":
        out = []
        col = None
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrefpipeError(f"{path}, line {i}: not valid JSON ({e.msg})") from e
            if isinstance(obj, str):
                out.append((f"line {i}", obj))
                continue
            if not isinstance(obj, dict):
                raise PrefpipeError(f"{path}, line {i}: expected a JSON object with a 'prompt' field")
            col = col or _column(list(obj), path)
            if col not in obj:
                raise PrefpipeError(f"{path}, line {i}: field '{col}' is missing")
            out.append((f"line {i}", obj[col]))
        return out
    if suffix in (".tsv", ".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            col = _column(list(reader.fieldnames or []), path)
            # line numbers count the header as line 1
            return [(f"line {i}", row.get(col)) for i, row in enumerate(reader, start=2)]
    if suffix == ".parquet":
        from prefpipe.core.tables import parquet_file

        pf = parquet_file(path)
        col = _column(pf.schema_arrow.names, path)
        values = pf.read(columns=[col]).column(col).to_pylist()
        return [(f"row {i}", v) for i, v in enumerate(values)]
    raise PrefpipeError(f"{path}: unsupported prompt file type '{suffix}'; use .txt, .jsonl, .parquet, .tsv or .csv")


def read_prompts(path: str | Path, limit: int | None = None) -> PromptSet:
    """Read, clean and de-duplicate the prompts of a file (first `limit` distinct ones if given)."""
    path = Path(path)
    if not path.exists():
        raise PrefpipeError(f"--prompts {path}: no such file")
    if path.is_dir():
        raise PrefpipeError(f"--prompts {path}: is a folder; give a .txt, .jsonl, .parquet or .tsv file")
    ps = PromptSet([], [], str(path))
    seen: set[str] = set()
    try:
        raw = _raw_prompts(path)
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise PrefpipeError(f"--prompts {path}, line {line}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    for where, value in raw:
        ps.read += 1
        if value is not None and not isinstance(value, str):
            raise PrefpipeError(f"{path}, {where}: prompt is {type(value).__name__}, expected text")
        text = (value or "").strip()
        if not text:
            ps.blank += 1
            continue
        pid = prompt_id(text)
        if pid in seen:
            ps.duplicates += 1
            if len(ps.duplicate_examples) < 3:
                ps.duplicate_examples.append(f"{where}: {text[:60]!r}")
            continue
        seen.add(pid)
        ps.prompts.append(text)
        ps.ids.append(pid)
        if limit is not None and len(ps.prompts) >= limit:
            break
    if not ps.prompts:
        raise PrefpipeError(f"--prompts {path}: no prompts in the file ({ps.read} entries read, all blank)")
    return ps
