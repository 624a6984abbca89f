"""The prompts an eval runs on: the --prompts file, less the prompts of the --holdout training pairs.

    prompts ─(--holdout: drop training prompts, --limit)─▶ DIR/prompts.txt (DIR/prompts.jsonl when a
    prompt spans lines): the file the generate stage reads for every model.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefpipe.core.errors import PrefpipeError


def training_prompt_ids(pairs_dirs: list[str] | tuple[str, ...]) -> set[str]:
    """Distinct prompt ids of training pairs: the `prompt_id` column, or the id of `caption` where it is null.

    Streams the two columns only: a pairs dataset of any size is read in bounded memory.
    """
    import pyarrow.parquet as pq

    from prefpipe.core.prompts import prompt_id
    from prefpipe.core.tables import parquet_files

    ids: set[str] = set()
    for folder in pairs_dirs:
        for f in parquet_files(folder):
            pf = pq.ParquetFile(f)
            cols = [c for c in ("prompt_id", "caption") if c in pf.schema_arrow.names]
            if not cols:
                raise PrefpipeError(f"--holdout {folder}: {f.name} has neither a prompt_id nor a caption column")
            for batch in pf.iter_batches(batch_size=8192, columns=cols):
                pids = batch.column("prompt_id").to_pylist() if "prompt_id" in cols else [None] * batch.num_rows
                caps = batch.column("caption").to_pylist() if "caption" in cols else [None] * batch.num_rows
                for pid, cap in zip(pids, caps):
                    if pid:
                        ids.add(pid)
                    elif cap and cap.strip():
                        ids.add(prompt_id(cap))
    return ids


def prepare_prompts(prompts: str | Path, out: str | Path, holdout=(), limit: int | None = None) -> dict:
    """Read the prompt file, drop prompts of the --holdout training pairs, keep the first `limit`,
    and write them to `out/prompts.txt` (`prompts.jsonl` when a prompt spans lines): the file generate reads.

    Returns the `prompts` section of report.json plus `path` (absolute), `ids` and `texts`.
    """
    from prefpipe.core.files import write_atomic
    from prefpipe.core.prompts import read_prompts

    ps = read_prompts(prompts)
    kept = list(zip(ps.ids, ps.prompts))
    train_ids: set[str] = set()
    if holdout:
        train_ids = training_prompt_ids(holdout)
        kept = [(i, p) for i, p in kept if i not in train_ids]
    removed = len(ps) - len(kept)
    if limit is not None:
        kept = kept[:limit]
    if not kept:
        raise PrefpipeError(
            f"--prompts {prompts}: no prompt left to evaluate: all {len(ps)} appear in the --holdout training pairs"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = [p for _, p in kept]
    if all(len(t.splitlines()) == 1 for t in texts):
        path = out / "prompts.txt"
        content = "\n".join(texts) + "\n"
    else:  # a line break inside a prompt would split it in a .txt file
        path = out / "prompts.jsonl"
        content = "".join(json.dumps({"prompt": t}, ensure_ascii=False) + "\n" for t in texts)
    if not path.exists() or path.read_text(encoding="utf-8") != content:
        write_atomic(path, content)
    return {
        "source": str(prompts),
        "file": path.name,
        "count": len(kept),
        "read": len(ps),
        "holdout": [str(h) for h in holdout],
        "training_prompts": len(train_ids),
        "removed_by_holdout": removed,
        "limit": limit,
        "path": str(path),
        "ids": [i for i, _ in kept],
        "texts": texts,
    }
