"""Arrow schemas of prefpipe's tables, in one place (see ARCHITECTURE.md, "Tables").

- candidates: one row per generated image.
- scores: long format, one row per (image, scorer); scores are comparable only within a scorer.
- pairs: one schema for human and AI feedback. It is a superset of Pick-a-Pic v2's published columns,
  so our pairs load unmodified where Pick-a-Pic loads (the Diffusion-DPO reference trainers read only
  `caption`, `jpg_0`, `jpg_1`, `label_0`).
"""

from __future__ import annotations

import pyarrow as pa

from prefpipe.core.errors import PrefpipeError

CANDIDATES = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),  # stable hash of the prompt text
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("candidate", pa.int32(), nullable=False),  # index within the prompt, 0..N-1
        pa.field("seed", pa.int64(), nullable=False),  # pure function of (--seed, prompt_id, candidate)
        pa.field("image", pa.binary(), nullable=False),  # encoded bytes (PNG)
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("scheduler", pa.string(), nullable=False),
        pa.field("steps", pa.int32(), nullable=False),
        pa.field("guidance", pa.float32(), nullable=False),
        pa.field("negative_prompt", pa.string()),
        pa.field("trajectory", pa.binary()),  # D3PO: stored latents of every step (null otherwise)
    ]
)

SCORES = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("candidate", pa.int32(), nullable=False),
        pa.field("scorer", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
    ]
)

# Pick-a-Pic v2 as published (minus the stray pandas `__index_level_0__`), in its column order.
PICKAPIC_V2 = pa.schema(
    [
        pa.field("are_different", pa.bool_()),
        pa.field("best_image_uid", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("created_at", pa.timestamp("ns")),
        pa.field("has_label", pa.bool_()),
        pa.field("image_0_uid", pa.string()),
        pa.field("image_0_url", pa.string()),
        pa.field("image_1_uid", pa.string()),
        pa.field("image_1_url", pa.string()),
        pa.field("jpg_0", pa.binary()),
        pa.field("jpg_1", pa.binary()),
        pa.field("label_0", pa.float64()),  # 1 = image 0 preferred, 0 = image 1, 0.5 = tie
        pa.field("label_1", pa.float64()),
        pa.field("model_0", pa.string()),
        pa.field("model_1", pa.string()),
        pa.field("ranking_id", pa.int64()),
        pa.field("user_id", pa.int64()),
        pa.field("num_example_per_prompt", pa.int64()),
    ]
)

PAIRS = pa.schema(
    list(PICKAPIC_V2)
    + [
        pa.field("source", pa.string()),  # "human" | "ai"
        pa.field("scorer", pa.string()),  # AI pairs: the scorer (or ensemble) that labelled them
        pa.field("score_0", pa.float32()),
        pa.field("score_1", pa.float32()),
        pa.field("margin", pa.float32()),  # |score_0 - score_1| in the scorer's units
        pa.field("prompt_id", pa.string()),
    ]
)

# Per-image feedback (Diffusion-KTO): one row per labelled image, no image bytes. The image lives where its
# keys say: a candidates dataset at (prompt_id, candidate), or a pairs dataset at (pairs_file, pairs_row, side).
FEEDBACK = pa.schema(
    [
        pa.field("prompt_id", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("candidate", pa.int32()),  # from scores / thumbs: the candidate's index within its prompt
        pa.field("image_uid", pa.string()),  # from pairs: image_0_uid / image_1_uid
        pa.field("pairs_file", pa.string()),  # from pairs: the shard's file name ...
        pa.field("pairs_row", pa.int64()),  # ... its row ...
        pa.field("side", pa.int8()),  # ... and which image of the pair (0: jpg_0, 1: jpg_1)
        pa.field("desirable", pa.bool_(), nullable=False),  # True desirable, False undesirable
        pa.field("source", pa.string(), nullable=False),  # "pairs" | "scores" | "thumbs"
        pa.field("score", pa.float32()),  # scores: the scorer's score; thumbs: the net votes (ups - downs)
    ]
)

SCHEMAS = {"candidates": CANDIDATES, "scores": SCORES, "pairs": PAIRS, "feedback": FEEDBACK}


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Order and cast `table`'s columns to `schema`; absent nullable columns become nulls.

    Raises PrefpipeError naming the column when a required column is missing or cannot be cast.
    """
    columns = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            if not col.type.equals(field.type):
                try:
                    col = col.cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise PrefpipeError(
                        f"column '{field.name}' has type {col.type}, expected {field.type}: {e}"
                    ) from e
            columns.append(col)
        elif field.nullable:
            columns.append(pa.nulls(table.num_rows, field.type))
        else:
            raise PrefpipeError(f"column '{field.name}' ({field.type}) is missing")
    return pa.Table.from_arrays(columns, schema=schema)


def check_columns(actual: pa.Schema, required: dict[str, pa.DataType | tuple[pa.DataType, ...]], where: str) -> None:
    """Stop at once when a required column is missing or of the wrong type.

    `required` maps a column name to its type, or to a tuple of accepted types.
    """
    for name, want in required.items():
        accepted = want if isinstance(want, tuple) else (want,)
        if name not in actual.names:
            raise PrefpipeError(
                f"{where}: column '{name}' is missing (expected {' or '.join(map(str, accepted))}); "
                f"columns present: {', '.join(actual.names)}"
            )
        got = actual.field(name).type
        if not any(got.equals(t) for t in accepted):
            raise PrefpipeError(
                f"{where}: column '{name}' has type {got}, expected {' or '.join(map(str, accepted))}"
            )
