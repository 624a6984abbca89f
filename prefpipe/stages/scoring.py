"""The one scoring path: rows with encoded images and prompts -> every scorer's score of every image.

label (the candidates), relabel (both images of human pairs) and eval (every model's candidates) score
through :func:`score_rows`; each keeps its own output table and batching.

- Each image is decoded once (`prefpipe.core.images.decode`), converted to 8-bit RGB by the one mode policy
  (`to_rgb`; conversions come back in `converted`) and shared by every scorer.
- A row is kept when every one of its images decodes, has the size its row declares (`sizes`, for
  candidates) and `keep` accepts it, and when every scorer gives it finite scores; the others come back in
  `bad` with a reason (`bad_image`, `size_mismatch`, `nonfinite_score`, or the caller's own) and why, for
  the caller to count and log with its own key. No table is ever written with a non-finite score.
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
from prefpipe.core.images import BadImage, decode, size_mismatch, to_rgb


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


def preparing_workers(scorers: Sequence[Scorer]) -> int:
    """Threads decoding batches ahead of `scorers` (`prefpipe.core.background.default_workers`): several when one of
    them runs on an accelerator, else one (a scorer without a device attribute counts as CPU)."""
    from prefpipe.core.background import default_workers, on_cpu

    devices = [getattr(s, "device", "cpu") for s in scorers]
    return default_workers(next((d for d in devices if not on_cpu(d)), "cpu"))


@dataclass
class ScoredRows:
    """The result of :func:`score_rows` on one batch."""

    kept: list[int] = field(default_factory=list)  # row indices scored, in order
    bad: list[tuple[int, str, str]] = field(default_factory=list)  # (row index, reason, why) of rows left out
    converted: list[tuple[int, str]] = field(default_factory=list)  # (row index, how an image became RGB)
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # scorer name -> (len(kept), n_images) float32

    def column(self, scorer: str, image: int = 0) -> np.ndarray:
        """The scores of image column `image` of the kept rows, shape (len(kept),)."""
        return self.scores[scorer][:, image]


@dataclass
class DecodedRows:
    """A batch's rows decoded (by :func:`decode_rows`), before any scorer ran."""

    rows: list[int]  # row indices whose images decoded, in order
    images: list[list]  # images[c]: image column c of those rows, 8-bit RGB
    prompts: list[str]
    bad: list[tuple[int, str, str]]
    converted: list[tuple[int, str]]


def decode_rows(images: Sequence[Sequence[bytes | None]], prompts: Sequence[str], *,
                keep: Callable[[int], str | None] | None = None, keep_reason: str = "bad_row",
                sizes: Sequence[tuple[int | None, int | None]] | None = None) -> DecodedRows:
    """Decode a batch of rows (see :func:`score_rows`); the half that can run ahead, in another thread."""
    out = DecodedRows([], [[] for _ in images], [], [], [])
    for i in range(len(prompts)):
        why = keep(i) if keep is not None else None
        reason = keep_reason
        row = []
        if why is None:
            for column in images:
                try:
                    im = decode(column[i])
                except BadImage as e:
                    reason, why = "bad_image", str(e)
                    break
                why = size_mismatch(im, *sizes[i]) if sizes is not None else None
                if why is not None:
                    reason = "size_mismatch"
                    break
                im, note = to_rgb(im)
                if note:
                    out.converted.append((i, note))
                row.append(im)
        if why is not None:
            out.bad.append((i, reason, why))
            continue
        out.rows.append(i)
        out.prompts.append(prompts[i])
        for c, im in enumerate(row):
            out.images[c].append(im)
    return out


def score_decoded(scorers: Sequence[Scorer], decoded: DecodedRows) -> ScoredRows:
    """Run every scorer on a decoded batch; rows with a non-finite score move to `bad`."""
    out = ScoredRows(bad=list(decoded.bad), converted=list(decoded.converted))
    n, columns = len(decoded.rows), len(decoded.images)
    raw: dict[str, np.ndarray] = {}
    for scorer in scorers:
        if n:
            flat = np.asarray(scorer.score([im for column in decoded.images for im in column], decoded.prompts * columns),
                              dtype=np.float32).reshape(-1)
            raw[scorer.name] = flat.reshape(columns, n).T
        else:
            raw[scorer.name] = np.zeros((0, columns), np.float32)
    finite = np.ones(n, bool)
    for name, values in raw.items():
        for j in np.flatnonzero(~np.isfinite(values).all(axis=1)):
            if finite[j]:
                out.bad.append((decoded.rows[j], "nonfinite_score", f"{name} gave {values[j].tolist()}"))
            finite[j] = False
    out.kept = [i for i, ok in zip(decoded.rows, finite) if ok]
    out.scores = {name: values[finite] for name, values in raw.items()}
    out.bad.sort()
    return out


def score_rows(scorers: Sequence[Scorer], images: Sequence[Sequence[bytes | None]], prompts: Sequence[str], *,
               keep: Callable[[int], str | None] | None = None, keep_reason: str = "bad_row",
               sizes: Sequence[tuple[int | None, int | None]] | None = None) -> ScoredRows:
    """Score a batch of rows: `images[c][i]` is image column c of row i (one column for candidates, two for
    pairs), `prompts[i]` its prompt, `sizes[i]` the (width, height) row i declares. `keep(i)`, if given,
    returns why row i is left out before decoding (an empty caption: reason `keep_reason`), or None.
    :func:`decode_rows` then :func:`score_decoded`; a loop over many batches decodes the next one ahead
    (`prefpipe.core.background.prefetch`)."""
    return score_decoded(scorers, decode_rows(images, prompts, keep=keep, keep_reason=keep_reason, sizes=sizes))
