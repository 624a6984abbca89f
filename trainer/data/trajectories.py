"""D3PO's candidates with their recorded trajectories, and the pairs of them a run trains on.

Trajectories of the candidates in use are held in memory, decoded (float16: ``(T+1) x C x h x w x 2``
bytes each, as stored; `prefpipe.core.trajectory`); the VAE is never used. :class:`TrajectoryPairs` turns
pairs of them into :class:`StepBatch` es, one recorded DDIM step per pair. Which preferences become pairs,
and the checks on them, are in `trainer/data/preferences.py`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.tables import parquet_files
from prefpipe.core.trajectory import decode_trajectory
from trainer.conditioning import PromptEmbeds
from trainer.data import add_count

TRAJECTORY_DROPS = {
    "ties_dropped": "ties", "bad_label": "label_0 not 0, 0.5 or 1",
    "uid_not_a_candidate": "image uids not PROMPT_ID-CANDIDATE (not pairs of `prefpipe label`)",
    "not_two_candidates_of_one_prompt": "the two images not two candidates of one prompt",
    "not_in_candidates": "candidates missing from --candidates",
    "no_trajectory": "candidates without a trajectory (generate --trajectories)",
    "image_mismatch": "pair images differ from the candidates' (pairs made from other candidates?)",
    "different_initial_noise": "candidates not sharing the initial noise",
    "different_sampler_settings": "candidates sampled with other timesteps or eta",
}


def image_digest(data: bytes | None) -> bytes | None:
    return None if data is None else hashlib.sha1(data).digest()


@dataclass
class Candidate:
    """One sampled image and its trajectory (see `prefpipe.stages.generate.encode_trajectory`)."""

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


CANDIDATE_COLUMNS = ["prompt_id", "candidate", "prompt", "negative_prompt", "width", "height", "image", "trajectory"]


def candidate_prompts(candidates: str | Path) -> list[tuple[str, list[int]]]:
    """The prompts of a candidates dataset in the order they were generated, each with its candidate indices."""
    order: dict[str, list[int]] = {}
    for f in candidate_files(candidates):
        table = pq.read_table(f, columns=["prompt_id", "candidate"])
        for pid, c in zip(table["prompt_id"].to_pylist(), table["candidate"].to_pylist()):
            order.setdefault(pid, []).append(c)
    return [(pid, sorted(cs)) for pid, cs in order.items()]


def candidate_files(candidates: str | Path) -> list[Path]:
    if not Path(candidates).exists():
        raise PrefpipeError(f"--candidates {candidates}: no such folder (make it with `prefpipe generate --trajectories`)")
    files = parquet_files(candidates)
    names = pq.ParquetFile(files[0]).schema_arrow.names
    missing = [c for c in CANDIDATE_COLUMNS if c not in names]
    if missing:
        raise PrefpipeError(f"--candidates {candidates}: column(s) {', '.join(missing)} missing; not a candidates dataset")
    return files


def read_candidates(candidates: str | Path, wanted: set[tuple[str, int]], counts: dict[str, int]) -> dict[tuple[str, int], Candidate]:
    """The `wanted` (prompt_id, candidate) rows of a candidates dataset, trajectories decoded.

    Rows without a trajectory are counted (`no_trajectory`) and left out.
    """
    found: dict[tuple[str, int], Candidate] = {}
    for f in candidate_files(candidates):
        pf = pq.ParquetFile(f)
        for rg in range(pf.num_row_groups):
            keys = pf.read_row_group(rg, columns=["prompt_id", "candidate"])
            hits = [i for i, k in enumerate(zip(keys["prompt_id"].to_pylist(), keys["candidate"].to_pylist()))
                    if k in wanted]
            if not hits:
                continue
            rows = pf.read_row_group(rg, columns=CANDIDATE_COLUMNS).take(pa.array(hits)).to_pydict()
            for i in range(len(hits)):
                key = (rows["prompt_id"][i], rows["candidate"][i])
                if rows["trajectory"][i] is None:
                    add_count(counts, "no_trajectory")
                    continue
                traj = decode_trajectory(rows["trajectory"][i])
                found[key] = Candidate(
                    prompt_id=key[0], candidate=key[1], prompt=rows["prompt"][i], negative_prompt=rows["negative_prompt"][i],
                    height=rows["height"][i], width=rows["width"][i], image=image_digest(rows["image"][i]),
                    latents=traj["latents"], timesteps=traj["timesteps"].astype(np.int64), eta=float(traj["eta"]),
                    guidance=float(traj["guidance"]),
                )
    return found


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


@dataclass
class TrajectoryPairs:
    """The training pairs: (winner, loser) candidates of one prompt, with their trajectories."""

    pairs: list[tuple[Candidate, Candidate]]
    counts: dict[str, int]
    sources: list[str]
    digest: str = ""  # the content digest of the candidates and every preference source
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
