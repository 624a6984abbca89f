"""The one scoring path: rows with encoded images and prompts -> every scorer's score of every image.

label (the candidates), relabel (both images of human pairs) and eval (every model's candidates) score
through :func:`score_rows`; each keeps its own output table and batching.

- Each image is decoded once (`prefpipe.core.images.decode`) and shared by every scorer.
- A row is kept when every one of its images decodes (and `keep` accepts it); the others come back in
  `bad` with the reason, for the caller to count and log with its own key.
- Each scorer is called once per batch, on the kept rows' images column by column (all of `image_0`,
  then all of `image_1`, ...), each image with its row's prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from labelers.base import Scorer
from labelers.registry import build_scorer
from prefpipe.core.errors import PrefpipeError
from prefpipe.core.images import BadImage, decode


def load_scorers(names: Sequence[str], weights: dict[str, str], *, batch_size: int = 32, device: str = "auto",
                 dtype: str | None = None) -> list[Scorer]:
    """Build the named scorers (each from `weights[name]`, else its real default), quietly."""
    from prefpipe.models import quiet_libraries

    quiet_libraries()
    if not names:
        raise PrefpipeError("give at least one --scorer")
    if len(set(names)) != len(names):
        raise PrefpipeError(f"--scorer given twice: {', '.join(names)}")
    kwargs = {"batch_size": batch_size, "device": device}
    if dtype not in (None, "auto"):
        kwargs["dtype"] = dtype
    return [build_scorer(n, weights.get(n), **kwargs) for n in names]


@dataclass
class ScoredRows:
    """The result of :func:`score_rows` on one batch."""

    kept: list[int] = field(default_factory=list)  # row indices scored, in order
    bad: list[tuple[int, str]] = field(default_factory=list)  # (row index, why) of rows left out
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # scorer name -> (len(kept), n_images) float32

    def column(self, scorer: str, image: int = 0) -> np.ndarray:
        """The scores of image column `image` of the kept rows, shape (len(kept),)."""
        return self.scores[scorer][:, image]


def score_rows(scorers: Sequence[Scorer], images: Sequence[Sequence[bytes | None]], prompts: Sequence[str], *,
               keep: Callable[[int], str | None] | None = None) -> ScoredRows:
    """Score a batch of rows: `images[c][i]` is image column c of row i (one column for candidates, two for
    pairs), `prompts[i]` its prompt. `keep(i)`, if given, returns why row i is left out before decoding
    (an empty caption), or None."""
    out = ScoredRows()
    decoded: list[list] = [[] for _ in images]
    for i in range(len(prompts)):
        why = keep(i) if keep is not None else None
        row = []
        if why is None:
            for column in images:
                try:
                    row.append(decode(column[i]))
                except BadImage as e:
                    why = str(e)
                    break
        if why is not None:
            out.bad.append((i, why))
            continue
        out.kept.append(i)
        for c, im in enumerate(row):
            decoded[c].append(im)
    n = len(out.kept)
    kept_prompts = [prompts[i] for i in out.kept]
    for scorer in scorers:
        if n:
            flat = np.asarray(scorer.score([im for column in decoded for im in column], kept_prompts * len(images)),
                              dtype=np.float32).reshape(-1)
        else:
            flat = np.zeros(0, np.float32)
        out.scores[scorer.name] = flat.reshape(len(images), n).T if n else np.zeros((0, len(images)), np.float32)
    return out
