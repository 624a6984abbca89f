"""The D3PO recipe (Yang et al. 2023, arXiv 2311.13231): preferences over recorded sampler trajectories -> a LoRA.

    generate --trajectories ──▶ candidates: every DDIM step's latents; a prompt's candidates share x_T
    preferences ─ pairs (`prefpipe label`, or people, in our pairs schema) ─┐
                └ D3PO labels JSON (per prompt, per-candidate scores)      ─┴▶ (prompt, winner, loser)
    per pair: K = max(1, int(T x step_fraction)) of its T steps, shuffled ──▶ for each step k:
        log p(x_{k+1} | x_k), the DDIM step's Gaussian, under the policy and (no_grad, adapters off) the reference
        ──▶ d3po_loss: -logsigmoid(beta (log r_w - log r_l)),  r = clamp(p / p_ref, 1 - eps, 1 + eps)
    rounds (`run_rounds`, `prefpipe d3po-rounds`): generate with the last round's LoRA ▶ label ▶ train --init-from it

What follows yk7333/d3po (`scripts/train.py`, `scripts/rm/train_d3po.py`) and DDPO's `ddim_step_with_logprob`:

- **One step's log-probability** (:func:`step_log_prob`): the model's noise prediction at the recorded
  ``x_k`` with classifier-free guidance as at sampling (the trajectory's own ``guidance``; the unconditional
  branch is what the pipeline used: the empty prompt, the candidate's negative prompt, or zeros for SDXL
  pipelines with ``force_zeros_for_empty_prompt``), then the Gaussian log-density of the recorded
  ``x_{k+1}`` under the DDIM step, averaged over latent dimensions (`trainer.losses.ddim_step_log_prob`).
  Steps without a density (the last step of a scheduler with ``set_alpha_to_one=True``) are not trained.
- **Which steps**: per pair, a permutation of its trainable steps drawn from the pair's generator (the
  seed and the pair's slot, as in `trainer/loop.py`); the first K are trained. Winner and loser are
  trained at the same step index (D3PO's time permutation is shared by the images of a prompt).
- **One optimizer step** accumulates ``batch_size x K`` (x processes x accumulation) per-step losses:
  one UNet micro-batch per trained step, as D3PO accumulates over ``gradient_accumulation x timesteps``.
- **The reference** is the base model: the same UNet with its LoRA adapters disabled, its log-probs
  computed once per step under no_grad (with --full or --reference-copy, a frozen copy). With
  ``--init-from RUN`` (the next round) the last round's LoRA is loaded into the adapters only, so the
  reference stays the original model, as in D3PO's online script (`scripts/rm/train_d3po.py` copies the
  UNet before adding LoRA and keeps that copy for every epoch; its human-feedback `scripts/train.py` copies
  after `load_state`, so a resumed run there compares with the resumed model instead). With the base as
  reference, a model that has moved far sees its ratios clipped: watch `clip_frac` in metrics.jsonl.
- **Ties are dropped** (D3PO keeps them in the mean as a constant log 2, which only rescales the loss).

Preferences are checked against the trajectories: both candidates of a pair come from the same prompt of
--candidates, start from the same initial noise x_T, were sampled with the same timesteps and eta, and
(for pairs tables) carry the very image bytes stored with the trajectory; a failing pair is counted, its
reason named, and skipped. Trajectories of the candidates in use are held in memory, decoded (float16:
``(T+1) x C x h x w x 2`` bytes each, as stored); the VAE is never used.

D3PO's human-label format (`scripts/utils.py: load_data_from_json`, `scripts/train.py`): a folder of JSON
files, one per annotator, each a list with one entry per prompt, in sampling order, and each entry a list
of per-image scores (7 images per prompt there). The files are cut to the shortest and averaged; of two
images of a prompt the higher mean score is preferred, equal means are ties. Here entry j is the j-th
prompt of --candidates in order (the order `prefpipe generate` wrote them, shards by name) and score i is
candidate i; :func:`write_label_sheet` writes the images under D3PO's names (``images/{n*j+i:05}.png``)
and its ``prompt.json`` for annotators.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from prefpipe.dataset import parquet_files
from prefpipe.errors import PrefpipeError
from trainer.conditioning import PromptEmbeds, unet_kwargs
from trainer.config import TrainConfig
from trainer.losses import (
    Objective,
    ddim_prev_timestep,
    ddim_scheduler_args,
    ddim_step_log_prob,
    ddim_step_mean_std,
)

# Options of `prefpipe train` that change what a Diffusion-DPO step sees and have no meaning on recorded
# trajectories (D3PO trains at the sampled resolution, on the sampled prompts).
_PAIR_IMAGE_OPTIONS = {"resolution": None, "random_crop": False, "random_flip": False, "caption_dropout": 0.0,
                       "keep_ties": "skip"}


# ------------------------------------------------------------------------------------------------------
# Preferences: which candidate of a prompt beat which
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preference:
    """Candidate `winner` of prompt `prompt_id` is preferred to candidate `loser` of the same prompt."""

    prompt_id: str
    winner: int
    loser: int
    key: str  # the row's name in logs
    images: tuple[bytes, bytes] | None = None  # digests of the (winner, loser) image bytes the label was given on


def _digest(data: bytes | None) -> bytes | None:
    return None if data is None else hashlib.sha1(data).digest()


def _parse_uid(uid: str | None) -> tuple[str, int] | None:
    """`prompt_id-candidate` (the uids `prefpipe label` writes) -> (prompt_id, candidate); None otherwise."""
    pid, sep, cand = (uid or "").rpartition("-")
    return (pid, int(cand)) if sep and pid and cand.isdigit() else None


def preferences_from_pairs(sources: Sequence[str | Path], counts: dict[str, int]) -> list[Preference]:
    """Preferences from pairs datasets whose image uids are `prompt_id-candidate` (`prefpipe label`'s).

    `label_0` 1: image 0 wins, 0: image 1 wins, 0.5: a tie (dropped); the two uids must name the same
    prompt. `jpg_0`/`jpg_1`, when present, are kept as digests to check against the candidates.
    """
    out: list[Preference] = []
    for source in sources:
        if not Path(source).exists() and not any(ch in str(source) for ch in "*?["):
            raise PrefpipeError(f"pairs dataset {source}: no such file or folder")
        for f in parquet_files(source):
            names = pq.ParquetFile(f).schema_arrow.names
            missing = [c for c in ("image_0_uid", "image_1_uid", "label_0") if c not in names]
            if missing:
                raise PrefpipeError(
                    f"{f}: column(s) {', '.join(missing)} missing; D3PO pairs name their two candidates of "
                    "--candidates in image_0_uid / image_1_uid as PROMPT_ID-CANDIDATE (`prefpipe label` writes them)"
                )
            cols = ["image_0_uid", "image_1_uid", "label_0"] + [c for c in ("jpg_0", "jpg_1") if c in names]
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=cols):
                rows = batch.to_pydict()
                for i in range(batch.num_rows):
                    counts["rows_read"] = counts.get("rows_read", 0) + 1
                    a, b = _parse_uid(rows["image_0_uid"][i]), _parse_uid(rows["image_1_uid"][i])
                    key = f"{rows['image_0_uid'][i]}/{rows['image_1_uid'][i]}"
                    label = rows["label_0"][i]
                    if a is None or b is None:
                        _count(counts, "uid_not_a_candidate")
                    elif a[0] != b[0] or a[1] == b[1]:
                        _count(counts, "not_two_candidates_of_one_prompt")
                    elif label == 0.5:
                        _count(counts, "ties_dropped")
                    elif label not in (0.0, 1.0):
                        _count(counts, "bad_label")
                    else:
                        digests = None
                        if "jpg_0" in rows:
                            digests = (_digest(rows["jpg_0"][i]), _digest(rows["jpg_1"][i]))
                        if label == 0.0:
                            a, b = b, a
                            digests = digests and (digests[1], digests[0])
                        out.append(Preference(a[0], a[1], b[1], key, digests))
    return out


def read_d3po_labels(paths: Sequence[str | Path]) -> tuple[list[np.ndarray], list[Path]]:
    """D3PO's human labels: per prompt, the per-candidate scores averaged over the annotators' files.

    Each path is a JSON file or a folder of them (D3PO's `json_path`). Every file is a list with one
    entry per prompt, each a list of numbers (one per image); files are cut to the shortest, as D3PO's
    `load_data_from_json` does, and averaged. Returns (scores per prompt, the files read).
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise PrefpipeError(f"--labels {p}: no .json files in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise PrefpipeError(f"--labels {p}: no such file or folder")
    tables = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise PrefpipeError(f"--labels {f}: not a JSON file ({e})") from e
        ok = isinstance(data, list) and all(
            isinstance(entry, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry)
            for entry in data
        )
        if not ok:
            raise PrefpipeError(
                f"--labels {f}: expected D3PO's format, a list (one entry per prompt) of lists of per-image scores, "
                "e.g. [[1, 0, 0, 2], [0, 1, 1, 0]]"
            )
        tables.append(data)
    n = min(len(t) for t in tables)
    scores = []
    for j in range(n):
        lengths = {len(t[j]) for t in tables}
        if len(lengths) != 1:
            raise PrefpipeError(f"--labels: prompt {j} has {sorted(lengths)} scores in different files; annotators must score the same images")
        scores.append(np.mean([np.asarray(t[j], dtype=np.float64) for t in tables], axis=0))
    return scores, files


def preferences_from_labels(scores: list[np.ndarray], prompts: list[tuple[str, list[int]]],
                            counts: dict[str, int]) -> list[Preference]:
    """Every pair of candidates of a labelled prompt whose mean scores differ; the higher score wins.

    scores[j]: the scores of prompt j; prompts[j]: (prompt_id, its candidate indices in order) of the
    j-th prompt of the candidates dataset.
    """
    if len(scores) > len(prompts):
        raise PrefpipeError(
            f"--labels score {len(scores)} prompts but --candidates holds {len(prompts)}: the labels were made on other candidates"
        )
    out: list[Preference] = []
    for j, s in enumerate(scores):
        pid, cands = prompts[j]
        if len(s) != len(cands):
            raise PrefpipeError(
                f"--labels: prompt {j} ({pid}) has {len(s)} scores but {len(cands)} candidates in --candidates"
            )
        counts["rows_read"] = counts.get("rows_read", 0) + 1
        for a, b in itertools.combinations(range(len(s)), 2):
            if s[a] == s[b]:
                _count(counts, "ties_dropped")
                continue
            w, lo = (a, b) if s[a] > s[b] else (b, a)
            out.append(Preference(pid, cands[w], cands[lo], f"labels:{j}:{cands[w]}>{cands[lo]}"))
    return out


def _count(counts: dict[str, int], what: str, n: int = 1) -> None:
    counts[what] = counts.get(what, 0) + n


# ------------------------------------------------------------------------------------------------------
# Candidates: the recorded trajectories the preferences refer to
# ------------------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One sampled image and its trajectory (see `prefpipe.generate.encode_trajectory`)."""

    prompt_id: str
    candidate: int
    prompt: str
    negative_prompt: str | None
    height: int
    width: int
    image: bytes  # digest of the stored image bytes
    latents: np.ndarray  # (T+1, C, h, w) float16, x_T first
    timesteps: np.ndarray  # (T,) int64
    eta: float
    guidance: float

    @property
    def key(self) -> str:
        return f"{self.prompt_id}-{self.candidate}"


_CANDIDATE_COLUMNS = ["prompt_id", "candidate", "prompt", "negative_prompt", "width", "height", "image", "trajectory"]


def candidate_prompts(candidates: str | Path) -> list[tuple[str, list[int]]]:
    """The prompts of a candidates dataset in the order they were generated, each with its candidate indices."""
    order: dict[str, list[int]] = {}
    for f in _candidate_files(candidates):
        table = pq.read_table(f, columns=["prompt_id", "candidate"])
        for pid, c in zip(table["prompt_id"].to_pylist(), table["candidate"].to_pylist()):
            order.setdefault(pid, []).append(c)
    return [(pid, sorted(cs)) for pid, cs in order.items()]


def _candidate_files(candidates: str | Path) -> list[Path]:
    if not Path(candidates).exists():
        raise PrefpipeError(f"--candidates {candidates}: no such folder (make it with `prefpipe generate --trajectories`)")
    files = parquet_files(candidates)
    names = pq.ParquetFile(files[0]).schema_arrow.names
    missing = [c for c in _CANDIDATE_COLUMNS if c not in names]
    if missing:
        raise PrefpipeError(f"--candidates {candidates}: column(s) {', '.join(missing)} missing; not a candidates dataset")
    return files


def read_candidates(candidates: str | Path, wanted: set[tuple[str, int]], counts: dict[str, int]) -> dict[tuple[str, int], Candidate]:
    """The `wanted` (prompt_id, candidate) rows of a candidates dataset, trajectories decoded.

    Rows without a trajectory are counted (`no_trajectory`) and left out.
    """
    from prefpipe.generate import decode_trajectory

    found: dict[tuple[str, int], Candidate] = {}
    for f in _candidate_files(candidates):
        pf = pq.ParquetFile(f)
        for rg in range(pf.num_row_groups):
            keys = pf.read_row_group(rg, columns=["prompt_id", "candidate"])
            hits = [i for i, k in enumerate(zip(keys["prompt_id"].to_pylist(), keys["candidate"].to_pylist()))
                    if k in wanted]
            if not hits:
                continue
            rows = pf.read_row_group(rg, columns=_CANDIDATE_COLUMNS).take(pa.array(hits)).to_pydict()
            for i in range(len(hits)):
                key = (rows["prompt_id"][i], rows["candidate"][i])
                if rows["trajectory"][i] is None:
                    _count(counts, "no_trajectory")
                    continue
                traj = decode_trajectory(rows["trajectory"][i])
                found[key] = Candidate(
                    prompt_id=key[0], candidate=key[1], prompt=rows["prompt"][i], negative_prompt=rows["negative_prompt"][i],
                    height=rows["height"][i], width=rows["width"][i], image=_digest(rows["image"][i]),
                    latents=traj["latents"], timesteps=traj["timesteps"].astype(np.int64), eta=float(traj["eta"]),
                    guidance=float(traj["guidance"]),
                )
    return found


def write_label_sheet(candidates: str | Path, out: str | Path) -> Path:
    """Lay out a candidates dataset for people to label in D3PO's format: `out/images/{n*j+i:05}.png` is
    candidate i of prompt j (n candidates per prompt), `out/prompt.json` the prompts in order. Their labels
    file is then a list with, per prompt j, the list of its n scores (higher = better)."""
    prompts = candidate_prompts(candidates)
    n = max(len(c) for _, c in prompts)
    index = {(pid, c): n * j + i for j, (pid, cs) in enumerate(prompts) for i, c in enumerate(cs)}
    text: dict[str, str] = {}
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for f in _candidate_files(candidates):
        table = pq.read_table(f, columns=["prompt_id", "candidate", "prompt", "image"]).to_pydict()
        for pid, c, prompt, image in zip(table["prompt_id"], table["candidate"], table["prompt"], table["image"]):
            text[pid] = prompt
            (out / "images" / f"{index[(pid, c)]:05}.png").write_bytes(image)
    (out / "prompt.json").write_text(json.dumps([text[pid] for pid, _ in prompts]))
    return out


# ------------------------------------------------------------------------------------------------------
# Training pairs of trajectories, and one step's log-probability
# ------------------------------------------------------------------------------------------------------


@dataclass
class DDIMArgs:
    """What the DDIM step's Gaussian needs besides the model output (one sampler setting per run)."""

    scheduler: dict[str, Any]  # `ddim_scheduler_args` of the DDIMScheduler the candidates were sampled with
    num_train_timesteps: int
    timesteps: np.ndarray  # (T,) the recorded timesteps, x_k -> x_{k+1} at timesteps[k]
    eta: float

    @classmethod
    def of(cls, scheduler_config, timesteps: np.ndarray, eta: float) -> DDIMArgs:
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(scheduler_config)  # as `prefpipe generate --trajectories` built it
        return cls(ddim_scheduler_args(sched), int(sched.config.num_train_timesteps), np.asarray(timesteps), float(eta))

    def prev_timestep(self, t: Tensor) -> Tensor:
        return ddim_prev_timestep(t, self.num_train_timesteps, len(self.timesteps))

    def trainable_steps(self) -> np.ndarray:
        """Indices k of the steps with a density (std > 0); the last step of `set_alpha_to_one` has none."""
        t = torch.as_tensor(self.timesteps)
        zeros = torch.zeros(len(t), 1, 1, 1)
        _, std = ddim_step_mean_std(zeros, t, zeros, prev_timestep=self.prev_timestep(t), eta=self.eta, **self.scheduler)
        return np.flatnonzero(std.flatten().numpy() > 0)


@dataclass
class StepBatch:
    """N recorded steps x_k -> x_{k+1} (winners first, then losers, in the training step)."""

    latents: Tensor  # (N, C, h, w) x_k, float32
    next_latents: Tensor  # (N, C, h, w) x_{k+1}, float32
    timesteps: Tensor  # (N,) int64
    cond: PromptEmbeds  # (N, 77, D) [+ pooled]
    uncond: PromptEmbeds  # (N, 77, D) [+ pooled]: the pipeline's unconditional branch
    guidance: Tensor  # (N,) float32
    time_ids: Tensor | None  # (N, 6) SDXL micro-conditioning, else None

    def to(self, device, dtype) -> StepBatch:
        return StepBatch(self.latents.to(device), self.next_latents.to(device), self.timesteps.to(device),
                         self.cond.to(device, dtype), self.uncond.to(device, dtype), self.guidance.to(device),
                         None if self.time_ids is None else self.time_ids.to(device, dtype))


def step_log_prob(unet, batch: StepBatch, ddim: DDIMArgs) -> Tensor:
    """``(N,)`` log p(x_{k+1} | x_k) of recorded DDIM steps under `unet`, nats per latent element.

    The noise prediction is guided as at sampling: ``uncond + g (cond - uncond)`` where the recorded
    guidance ``g > 1`` (the pipeline's condition for classifier-free guidance), the conditional prediction
    alone otherwise; then `trainer.losses.ddim_step_log_prob` with the recorded ``x_{k+1}``.
    """
    x, t = batch.latents, batch.timesteps
    guided = batch.guidance > 1
    if bool(guided.any()):
        embeds = PromptEmbeds(torch.cat([batch.uncond.prompt_embeds, batch.cond.prompt_embeds]),
                              None if batch.cond.pooled is None else torch.cat([batch.uncond.pooled, batch.cond.pooled]))
        tids = None if batch.time_ids is None else batch.time_ids.repeat(2, 1)
        uncond, cond = unet(torch.cat([x, x]), torch.cat([t, t]), **unet_kwargs(embeds, tids)).sample.chunk(2)
        g = torch.where(guided, batch.guidance, torch.ones_like(batch.guidance)).to(cond.dtype).reshape(-1, 1, 1, 1)
        eps = uncond + g * (cond - uncond)
    else:
        eps = unet(x, t, **unet_kwargs(batch.cond, batch.time_ids)).sample
    return ddim_step_log_prob(eps, t, x, batch.next_latents, prev_timestep=ddim.prev_timestep(t), eta=ddim.eta,
                              **ddim.scheduler).log_prob


@dataclass
class TrajectoryPairs:
    """The training pairs: (winner, loser) candidates of one prompt, with their trajectories."""

    pairs: list[tuple[Candidate, Candidate]]
    counts: dict[str, int]
    sources: list[str]
    cond: dict[str, PromptEmbeds] = field(default_factory=dict)  # prompt_id -> (1, 77, D)
    uncond: dict[str | None, PromptEmbeds] = field(default_factory=dict)  # negative prompt (None: none) -> (1, 77, D)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def timesteps(self) -> np.ndarray:
        return self.pairs[0][0].timesteps

    @property
    def eta(self) -> float:
        return self.pairs[0][0].eta

    def nbytes(self) -> int:
        seen = {id(c): c.latents.nbytes for pair in self.pairs for c in pair}
        return sum(seen.values())

    def encode_prompts(self, text) -> None:
        """Encode every prompt and every unconditional prompt once (`text`: a TextConditioner), kept on CPU."""
        def cpu(e: PromptEmbeds) -> PromptEmbeds:
            return e.to("cpu", torch.float32)

        cands = [c for pair in self.pairs for c in pair]
        for c in cands:
            if c.prompt_id not in self.cond:
                self.cond[c.prompt_id] = cpu(text.encode([c.prompt]))
            if c.negative_prompt not in self.uncond:
                self.uncond[c.negative_prompt] = cpu(text.empty() if c.negative_prompt is None else text.encode([c.negative_prompt]))

    def step_batch(self, items: np.ndarray, steps: np.ndarray, family: str) -> StepBatch:
        """Winners then losers of pairs `items`, each pair at its step index `steps[i]`."""
        cands = [self.pairs[i][0] for i in items] + [self.pairs[i][1] for i in items]
        ks = np.concatenate([steps, steps])
        x = torch.from_numpy(np.stack([c.latents[k] for c, k in zip(cands, ks)])).float()
        x_next = torch.from_numpy(np.stack([c.latents[k + 1] for c, k in zip(cands, ks)])).float()

        def cat(embeds: list[PromptEmbeds]) -> PromptEmbeds:
            pooled = None if embeds[0].pooled is None else torch.cat([e.pooled for e in embeds])
            return PromptEmbeds(torch.cat([e.prompt_embeds for e in embeds]), pooled)

        time_ids = None
        if family == "sdxl":  # the pipeline's default micro-conditioning: original = target size, no crop
            time_ids = torch.tensor([[c.height, c.width, 0, 0, c.height, c.width] for c in cands], dtype=torch.float32)
        return StepBatch(
            latents=x, next_latents=x_next, timesteps=torch.as_tensor(self.timesteps[ks], dtype=torch.long),
            cond=cat([self.cond[c.prompt_id] for c in cands]), uncond=cat([self.uncond[c.negative_prompt] for c in cands]),
            guidance=torch.tensor([c.guidance for c in cands], dtype=torch.float32), time_ids=time_ids,
        )


def load_trajectory_pairs(cfg: TrainConfig) -> TrajectoryPairs:
    """Preferences (pairs datasets and/or D3PO label files) matched to their trajectories in --candidates."""
    counts: dict[str, int] = {}
    prefs: list[Preference] = []
    sources = [str(p) for p in cfg.pairs_paths()] if (cfg.source or cfg.pairs) else []
    if sources:
        prefs += preferences_from_pairs(sources, counts)
    if cfg.labels:
        scores, files = read_d3po_labels(cfg.labels)
        prefs += preferences_from_labels(scores, candidate_prompts(cfg.candidates), counts)
        sources += [str(f) for f in files]
    if cfg.limit is not None:
        prefs = prefs[: cfg.limit]
    rows = read_candidates(cfg.candidates, {(p.prompt_id, c) for p in prefs for c in (p.winner, p.loser)}, counts)
    pairs: list[tuple[Candidate, Candidate]] = []
    for p in prefs:
        w, lo = rows.get((p.prompt_id, p.winner)), rows.get((p.prompt_id, p.loser))
        if w is None or lo is None:
            reason = "not_in_candidates"
        elif p.images is not None and p.images != (w.image, lo.image):
            reason = "image_mismatch"  # the pair was labelled on other images than these trajectories end in
        elif not np.array_equal(w.latents[0], lo.latents[0]):
            reason = "different_initial_noise"
        elif not (np.array_equal(w.timesteps, lo.timesteps) and w.eta == lo.eta):
            reason = "different_sampler_settings"
        else:
            pairs.append((w, lo))
            continue
        _count(counts, reason)
    data = TrajectoryPairs(pairs, counts, sources)
    counts["pairs"] = len(pairs)
    if not pairs:
        raise PrefpipeError(
            f"no D3PO training pairs: {counts.get('rows_read', 0)} preference rows read from {', '.join(sources)} "
            f"against {cfg.candidates}, all dropped ({describe_drops(counts)})"
        )
    settings = {(tuple(w.timesteps.tolist()), w.eta) for w, _ in pairs}
    if len(settings) > 1:
        raise PrefpipeError(f"--candidates {cfg.candidates}: trajectories were sampled with {len(settings)} different "
                            "step schedules or etas; train on one `prefpipe generate --trajectories` setting at a time")
    if data.eta <= 0:
        raise PrefpipeError(f"--candidates {cfg.candidates}: sampled with eta {data.eta} (deterministic DDIM): its steps "
                            "have no probability to train; generate with --trajectories (eta 1.0)")
    return data


_DROPS = {
    "ties_dropped": "ties", "bad_label": "label_0 not 0, 0.5 or 1",
    "uid_not_a_candidate": "image uids not PROMPT_ID-CANDIDATE (not pairs of `prefpipe label`)",
    "not_two_candidates_of_one_prompt": "the two images not two candidates of one prompt",
    "not_in_candidates": "candidates missing from --candidates",
    "no_trajectory": "candidates without a trajectory (generate --trajectories)",
    "image_mismatch": "pair images differ from the candidates' (pairs made from other candidates?)",
    "different_initial_noise": "candidates not sharing the initial noise",
    "different_sampler_settings": "candidates sampled with other timesteps or eta",
}


def describe_drops(counts: dict[str, int]) -> str:
    parts = [f"{counts[k]} {v}" for k, v in _DROPS.items() if counts.get(k)]
    return ", ".join(parts) if parts else "none"


# ------------------------------------------------------------------------------------------------------
# The recipe
# ------------------------------------------------------------------------------------------------------


def train_d3po(cfg: TrainConfig, objective: Objective) -> dict[str, Any]:
    """Run (or resume) one D3PO training run (`prefpipe train --objective d3po`); the summary as `train`'s."""
    from trainer.loop import (
        SUMMARY_METRICS,
        _check_run_folder,
        _find_checkpoint,
        adapters_disabled,
        finish_run,
        hyperparameters,
        make_accelerator,
        make_optimizer,
        prepare_unet,
        resume,
        run_steps,
        run_summary,
        start_run_folder,
        step_plan,
    )

    # ---- 1. options, preferences and their trajectories (no model needed) -----------------------------
    if not cfg.candidates:
        raise PrefpipeError(
            "--objective d3po trains on recorded sampler trajectories: give --candidates DIR (`prefpipe generate "
            "--trajectories`) and preferences over them (--source ai, --pairs DIR or --labels FILE)"
        )
    if not (cfg.source or cfg.pairs or cfg.labels):
        raise PrefpipeError("no training data: give --source ai (WORKDIR/pairs/ai), --pairs DIR or --labels FILE")
    changed = [f"--{k.replace('_', '-')}" for k, v in _PAIR_IMAGE_OPTIONS.items() if getattr(cfg, k) != v]
    if changed:
        raise PrefpipeError(f"{', '.join(changed)}: not used by --objective d3po (it trains on the recorded "
                            "latents at the sampled size; ties are dropped)")
    hyper = hyperparameters(objective, cfg)
    out = Path(cfg.out)
    data = load_trajectory_pairs(cfg)

    # ---- 2. accelerator -----------------------------------------------------------------------------------
    accelerator, trackers = make_accelerator(cfg, out)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    main = accelerator.is_main_process
    echo = (lambda msg: click.echo(msg, err=True)) if main else (lambda msg: None)
    checkpoint = _find_checkpoint(cfg, out, echo)
    _check_run_folder(cfg, out, checkpoint)

    # ---- 3. models: prompts encoded once, the sampler's DDIM step, the UNet ------------------------------
    from prefpipe.models import load_pipeline, model_family
    from trainer.conditioning import TextConditioner

    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    pipe = load_pipeline(cfg.model, dtype="fp32", device="cpu")
    family = model_family(pipe)
    text = TextConditioner(pipe, device, dtype=weight_dtype)
    data.encode_prompts(text)
    ddim = DDIMArgs.of(pipe.scheduler.config, data.timesteps, data.eta)
    if ddim.scheduler["prediction_type"] == "sample":
        raise PrefpipeError(f"--model {cfg.model}: prediction_type 'sample' is not supported; epsilon or v_prediction")
    unet = pipe.unet
    del pipe, text
    gc.collect()
    trainable = ddim.trainable_steps()
    if len(trainable) == 0:
        raise PrefpipeError("no trajectory step has a probability (every step is deterministic)")
    k_steps = max(1, int(len(trainable) * cfg.step_fraction))

    from trainer.data import PairOrder

    order = PairOrder(len(data), cfg.batch_size, world, cfg.seed)
    accum = cfg.gradient_accumulation
    max_steps, effective_batch, lr = step_plan(cfg, order, len(data), world)

    # ---- 4. the UNet (adapters; --init-from loads the last round's LoRA into them), reference, optimizer --
    unet, ref_unet, params = prepare_unet(unet, cfg, objective, device, weight_dtype, family)
    unet, optimizer, lr_scheduler = make_optimizer(accelerator, unet, params, cfg, lr, max_steps, family)
    state = resume(accelerator, checkpoint, echo)
    resolved = {**hyper, "lr": lr, "max_steps": max_steps, "effective_batch": effective_batch, "processes": world,
                "family": family, "pairs": len(data), "steps_per_trajectory": len(data.timesteps),
                "trainable_steps": len(trainable), "steps_per_pair": k_steps, "eta": data.eta,
                "init_from": cfg.init_from, "data": data.counts}
    start_step = state["step"]
    start_run_folder(accelerator, cfg, out, resolved, start_step, trackers)

    # ---- 5. the plan --------------------------------------------------------------------------------------
    n_train = sum(p.numel() for p in params)
    reference = (f"frozen UNet copy in {str(weight_dtype).removeprefix('torch.')}" if ref_unet is not None
                 else "the base UNet: the policy with its adapters disabled (no second UNet)")
    echo(
        f"train: d3po ({', '.join(f'{k} {v:g}' for k, v in hyper.items())}) on {len(data)} pairs of trajectories "
        f"({data.counts.get('rows_read', 0)} preference rows; dropped: {describe_drops(data.counts)}) | {family}, "
        f"{len(data.timesteps)} DDIM steps (eta {data.eta:g}), {len(trainable)} with a density\n"
        f"  batch: {cfg.batch_size} pairs/process x {world} process(es) x {accum} accumulation = {effective_batch} "
        f"pairs per step, each at {k_steps} of its steps (--step-fraction {cfg.step_fraction:g}, shuffled): "
        f"{effective_batch * k_steps} per-step losses per optimizer step\n"
        f"  steps: {max_steps} ({order.per_epoch // accum} per epoch of {len(data)} pairs)"
        f"{f', resuming after step {start_step}' if start_step else ''}; {cfg.lr_scheduler} schedule\n"
        f"  lr: {lr:g}, {cfg.optimizer}; start: {cfg.init_from or 'the base model'}\n"
        f"  memory: {'full UNet' if cfg.full else f'LoRA rank {cfg.lora_rank} on {cfg.lora_targets}'}, {n_train:,} "
        f"trainable params; reference: {reference}; trajectories in memory: {data.nbytes() / 2**20:.1f} MiB"
    )

    # ---- 6. steps: micro-batch m = (pair micro-batch m // K, its (m % K)-th chosen step) ---------------
    current: dict[str, Any] = {"m": None}

    def micro_batch(m: int):
        pair_m, slot = divmod(m, k_steps)
        if current["m"] != pair_m:
            items, _, epoch = order.micro_batch(pair_m, rank)
            chosen = np.stack([trainable[torch.randperm(len(trainable), generator=g)[:k_steps].numpy()]
                               for g in order.generators(pair_m, rank)])  # (B, K): each pair its own steps
            current.update(m=pair_m, items=items, chosen=chosen, epoch=epoch)
        batch = data.step_batch(current["items"], current["chosen"][:, slot], family).to(device, weight_dtype)
        logp = step_log_prob(unet, batch, ddim)
        with torch.no_grad(), accelerator.autocast():
            if ref_unet is not None:
                ref_logp = step_log_prob(ref_unet, batch, ddim)
            else:
                policy = accelerator.unwrap_model(unet)
                with adapters_disabled(policy):
                    ref_logp = step_log_prob(policy, batch, ddim)
        logp_w, logp_l = logp.chunk(2)
        ref_w, ref_l = ref_logp.chunk(2)
        loss, metrics = objective(logp_w=logp_w, logp_l=logp_l, ref_logp_w=ref_w, ref_logp_l=ref_l, **hyper)
        return loss, metrics, current["epoch"]

    last, wall, state = run_steps(accelerator, unet, params, optimizer, lr_scheduler, cfg, out, state, max_steps,
                                  micro_batches=accum * k_steps, micro_batch=micro_batch,
                                  hint=f"--beta (now {hyper['beta']:g}) or ")

    # ---- 7. export: the same LoRA file (or UNet) as Diffusion-DPO runs --------------------------------
    exported = finish_run(accelerator, unet, cfg, out, family)
    return run_summary(max_steps, start_step, wall, last, data.counts, state, exported, rank, world, echo,
                       SUMMARY_METRICS + (("clip_frac", "clip frac", ".3f"),))


# ------------------------------------------------------------------------------------------------------
# Rounds: generate with the current model -> label -> train from the last round's weights
# ------------------------------------------------------------------------------------------------------

# Set by run_rounds itself, per round.
_ROUND_OWNED = ("model", "out", "workdir", "source", "pairs", "candidates", "labels", "objective", "init_from")


def run_rounds(
    *,
    model: str,
    prompts: str | Path,
    workdir: str | Path,
    rounds: int,
    scorer: str = "compressibility",
    weights: dict[str, str] | None = None,
    per_prompt: int = 4,
    steps: int = 20,
    guidance: float | None = None,
    size: str | None = None,
    seed: int = 0,
    strategy: str = "all",
    generate_batch_size: int = 4,
    device: str = "auto",
    train_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[Path]:
    """N rounds of online D3PO with AI feedback; returns the run folders, round 1 first.

    Round k (folder ``WORKDIR/round-k``): ``candidates`` sampled with trajectories by the current model
    (the base for k = 1, the base with round k-1's LoRA after), generation seed ``seed + k - 1`` so each
    round sees fresh noise; ``scores`` and ``pairs/ai`` by `scorer` within each prompt (`strategy`: D3PO
    compares every pair of a prompt's images, ``all``); ``run`` trained with ``--init-from`` round k-1's
    run, the reference staying the base `model`. `train_options`: other TrainConfig fields (max_steps,
    learning_rate, lora_targets, ...), the same every round. Every stage resumes: re-running the same call
    finishes an interrupted round and skips finished ones.
    """
    from prefpipe.generate import GenerateOptions, generate
    from prefpipe.label import build_pair_dataset, score_candidates
    from prefpipe.pairs import PairOptions
    from trainer.export import LORA_FILE
    from trainer.loop import train

    if rounds < 1:
        raise PrefpipeError(f"--rounds {rounds}: must be at least 1")
    options = dict(train_options or {})
    owned = sorted(set(options) & set(_ROUND_OWNED))
    if owned:
        raise PrefpipeError(f"train options {', '.join(owned)} are set by the rounds themselves")
    workdir = Path(workdir)
    runs: list[Path] = []
    previous: str | None = None
    for k in range(1, rounds + 1):
        t0 = time.perf_counter()
        folder = workdir / f"round-{k}"
        candidates = folder / "candidates"
        generate(GenerateOptions(model=model, per_prompt=per_prompt, steps=steps, guidance=guidance, size=size,
                                 seed=seed + k - 1, lora=previous, trajectories=True),
                 prompts, candidates, batch_size=generate_batch_size, device=device, progress=progress)
        scores = score_candidates(candidates, folder / "scores", [scorer], dict(weights or {}), device=device,
                                  progress=progress)
        build_pair_dataset(scores.folder, candidates, folder / "pairs" / "ai", PairOptions(strategy=strategy, seed=seed))
        run = folder / "run"
        if not (run / LORA_FILE).exists():
            cfg = TrainConfig(model=model, out=str(run), workdir=str(folder), source=("ai",), candidates=str(candidates),
                              objective="d3po", init_from=previous, **{"no_progress": not progress, **options})
            if (run / "train_config.json").exists():
                cfg.resume = "latest"  # an interrupted round continues from its last checkpoint
            train(cfg)
        click.echo(f"d3po-rounds: round {k}/{rounds} done in {time.perf_counter() - t0:.1f} s -> {run} "
                   f"(sampler: {previous or 'the base model'})", err=True)
        previous = str(run)
        runs.append(run)
    return runs


def _parse_train_options(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs -> TrainConfig fields, typed from the dataclass (`max-steps=20`, `lora_targets=attn,ff`)."""
    import dataclasses
    import typing

    from trainer.config import _base_type

    hints = typing.get_type_hints(TrainConfig)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name = key.strip().lstrip("-").replace("-", "_")
        if not sep or name not in names:
            raise PrefpipeError(f"--train {item}: write OPTION=VALUE with a `prefpipe train` option, e.g. max-steps=50")
        tp = hints[name]
        base = _base_type(tp)
        if typing.get_origin(tp) is tuple:
            out[name] = tuple(v for v in value.split(",") if v)
        elif base is bool:
            out[name] = value.strip().lower() in ("1", "true", "yes", "on")
        elif value.strip().lower() == "none":
            out[name] = None
        else:
            try:
                out[name] = base(value)
            except ValueError as e:
                raise PrefpipeError(f"--train {item}: {value!r} is not a {base.__name__}") from e
    return out


@click.command("d3po-rounds")
@click.option("--model", required=True, help="Base diffusers pipeline (hub id or folder); every round's reference.")
@click.option("--prompts", required=True, type=click.Path(), help="Prompt file (as `prefpipe generate --prompts`).")
@click.option("--workdir", required=True, type=click.Path(), help="Writes WORKDIR/round-K/{candidates,scores,pairs/ai,run}.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Rounds of generate -> label -> train.")
@click.option("--scorer", default="compressibility", show_default=True, help="AI feedback: a `prefpipe label` scorer name.")
@click.option("--weights", multiple=True, help="NAME=PATH_OR_HUB_ID: the scorer's weights (as `prefpipe label --weights`).")
@click.option("--per-prompt", type=click.IntRange(min=2), default=4, show_default=True, help="Candidates per prompt per round.")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True, help="DDIM steps (D3PO samples with 20).")
@click.option("--guidance", type=float, default=None, help="Guidance scale [default: the pipeline's].")
@click.option("--size", default=None, help="WIDTH or WIDTHxHEIGHT [default: the model's native size].")
@click.option("--seed", type=int, default=0, show_default=True, help="Round k generates with seed + k - 1; also the training seed.")
@click.option("--strategy", type=click.Choice(["all", "best-worst", "random-k"]), default="all", show_default=True,
              help="Which candidates of a prompt to pair (D3PO: all).")
@click.option("--batch-size", "generate_batch_size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images per pipeline call when generating.")
@click.option("--device", default="auto", show_default=True, help="Generation and scoring device.")
@click.option("--train", "train_items", multiple=True,
              help="OPTION=VALUE for every round's `prefpipe train` (repeatable), e.g. --train max-steps=50 --train learning-rate=3e-4.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def d3po_rounds(weights, train_items, scorer, no_progress, **options):
    """Online D3PO: N rounds of generate (the last round's LoRA samples) -> label -> train --init-from.

    \b
    Round k writes WORKDIR/round-k/{candidates, scores, pairs/ai, run}; the last run is the tuned model
    (`prefpipe eval --tuned WORKDIR/round-N/run`). Re-run the same command to resume.
    """
    from prefpipe.label import parse_weights

    runs = run_rounds(scorer=scorer, weights=parse_weights(weights, [scorer]), progress=not no_progress,
                      train_options=_parse_train_options(train_items), **options)
    click.echo(f"d3po-rounds: {len(runs)} rounds; the model of the last: {runs[-1]}", err=True)
