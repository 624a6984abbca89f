"""The demo's builds cached by config: a folder holds a build and a JSON record of the config that made it.

`prefpipe demo-model` (the base model) and `prefpipe demo-clip` (the CLIP scorer) are minutes of training
each, deterministic for a config (`model.reproducible`). Their folder is reused when its record's `config`
equals this config's identity (the config plus a format number, bumped when the code changes what a config
produces) and its marker file (the last one a finished build writes) exists; anything else is rebuilt.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click


@dataclass(frozen=True)
class ConfigCache:
    what: str  # the command, for its message: "demo-model"
    record: str  # the record's file name in the folder
    marker: str  # a file only a finished build has
    version: int  # the format number

    def identity(self, cfg) -> dict[str, Any]:
        """The config as the record stores it (tuples become lists, as in the file)."""
        return json.loads(json.dumps({"format": self.version, **asdict(cfg)}))

    def read(self, out: str | Path) -> dict | None:
        try:
            return json.loads((Path(out) / self.record).read_text())
        except (OSError, ValueError):
            return None

    def holds(self, out: str | Path, cfg) -> bool:
        """`out` holds a finished build of exactly this config."""
        record = self.read(out)
        return (Path(out) / self.marker).exists() and record is not None and record.get("config") == self.identity(cfg)

    def reuse(self, out: str | Path, cfg, force: bool) -> dict | None:
        """The record plus `cached: True` when `out` already holds this config (and not `force`), else None."""
        if force or not self.holds(out, cfg):
            return None
        record = self.read(out)
        click.echo(f"{self.what}: {out} already holds this config (trained in {record['timings_s']['total']:.0f} s); "
                   "nothing to do", err=True)
        return {**record, "cached": True}

    def write(self, folder: Path, record: dict) -> None:
        (folder / self.record).write_text(json.dumps(record, indent=2) + "\n")
