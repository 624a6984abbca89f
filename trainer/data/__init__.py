"""Training data: pairs datasets (Diffusion-DPO, SFT) and recorded trajectories (D3PO) -> tensors.

    pairs shards ──scan (rows.py)──▶ rows kept (caption, both images decode, label in {0, 0.5, 1})
                 ──prepare──▶ joint resize + crop (+ flip) of both images
                 ──encode (cache.py)──▶ VAE moments (mean, logvar) + text embeddings ──▶ cache unit files
    index (pairs.py: one item per trained pair, winner first) ──order(seed, epoch)──▶ micro-batches ──▶ PairBatch

    feedback shards (`prefpipe feedback`) + the candidates or pairs they point into (--images)
                 ──(feedback.py)──▶ single-image rows in the pairs layout (the image in both slots, label 1 / 0)
                 ──▶ the same scan, cache, index and order; PairBatch.desirable carries each image's label (KTO)

    preferences (pairs tables, D3PO label files: d3po_labels.py) + candidates with trajectories
                 ──(trajectories.py)──▶ pairs of trajectories ──▶ StepBatch (one recorded DDIM step each)

**Input.** Any pairs dataset: ours (`prefpipe.core.schema.PAIRS`) or Pick-a-Pic shards as published. Only
`caption`, `jpg_0`, `jpg_1` (encoded PNG/JPEG bytes) and `label_0` are read (plus `image_0_uid`,
`image_1_uid`, `prompt_id` for the row key when present). A missing column stops at once, naming it.

**Winner.** `label_0 == 1`: image 0 wins; `0`: image 1 wins; `0.5`: a tie, dropped by default
(`keep_ties="skip"`) or, with `"half"`, trained in *both* orders at weight 0.5 each: the two DPO terms
`-logsigmoid(x) - logsigmoid(-x)` are minimised at `x = 0`, so a tie pulls the implicit reward margin to
zero instead of pushing it towards an arbitrary side. Other labels are bad rows.
"""

from __future__ import annotations


def describe_drops(counts: dict[str, int], reasons: dict[str, str]) -> str:
    """'2 ties (...), 1 empty caption': the counters of `reasons` (counter -> words) that are set, or 'none'."""
    parts = [f"{counts[k]} {v}" for k, v in reasons.items() if counts.get(k)]
    return ", ".join(parts) if parts else "none"


def add_count(counts: dict[str, int], what: str, n: int = 1) -> None:
    """counts[what] += n (a counter of dropped rows, by reason)."""
    counts[what] = counts.get(what, 0) + n
