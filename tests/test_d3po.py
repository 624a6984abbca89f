"""D3PO on a tiny SD 1.5 (32 px, 4 DDIM steps): per-step log-probabilities, the loss at round 0, preferences
from `prefpipe label` pairs and from D3PO's human-label JSON, rounds, and the checks on what is paired."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.tables import parquet_files, read_manifest
from tests.conftest import run_cli
from trainer.config import TrainConfig
from trainer.data.preferences import load_trajectory_pairs, read_d3po_labels, write_label_sheet
from trainer.data.trajectories import TrajectoryPairs, candidate_prompts, read_candidates
from trainer.recipes import train
from trainer.recipes.d3po import DDIMArgs, step_log_prob
from trainer.unet import adapters_disabled

PROMPTS = ["a red box", "a blue ball", "a green tree", "a yellow cat"]
PER_PROMPT, STEPS, GUIDANCE = 3, 4, 3.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A 32 px tiny SD 1.5, 4 prompts x 3 candidates sampled with trajectories, and `prefpipe label` pairs."""
    from prefpipe.stages.generate import GenerateOptions, generate
    from prefpipe.testing.tiny import write_tiny_pipeline

    root = tmp_path_factory.mktemp("d3po")
    model = write_tiny_pipeline("sd15", root / "model", size=32)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    candidates = root / "work" / "candidates"
    generate(GenerateOptions(model=str(model), per_prompt=PER_PROMPT, steps=STEPS, guidance=GUIDANCE, trajectories=True),
             prompts, candidates, batch_size=6, device="cpu", progress=False)
    run_cli("label", "--scorer", "compressibility", "--candidates", candidates, "--out", root / "work",
            "--strategy", "all", "--no-progress")
    return {"root": root, "model": model, "prompts": prompts, "candidates": candidates, "workdir": root / "work"}


def _cfg(world, out, **kw) -> TrainConfig:
    base = dict(model=str(world["model"]), out=str(out), objective="d3po", candidates=str(world["candidates"]),
                workdir=str(world["workdir"]), batch_size=2, max_steps=2, learning_rate=1e-3, checkpoint_every=0,
                no_progress=True)
    return TrainConfig(**{**base, **kw})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _all_steps(world) -> tuple[TrajectoryPairs, object]:
    """Every candidate as a (candidate, itself) pair, prompts encoded: a handle on all recorded steps."""
    from prefpipe.models import load_pipeline
    from trainer.conditioning import TextConditioner

    rows = read_candidates(world["candidates"], {(p, c) for p, cs in candidate_prompts(world["candidates"]) for c in cs}, {})
    data = TrajectoryPairs([(c, c) for c in rows.values()], {}, [])
    pipe = load_pipeline(str(world["model"]), dtype="fp32", device="cpu", scheduler="ddim")
    data.encode_prompts(TextConditioner(pipe, "cpu"))
    return data, pipe


def _log_probs(unet, data: TrajectoryPairs, ddim: DDIMArgs) -> torch.Tensor:
    """(2 x pairs, T) log-probabilities of every recorded step: the winners' rows, then the losers'."""
    n, steps = len(data), len(data.timesteps)
    out = torch.empty(2 * n, steps)
    with torch.no_grad():
        for k in range(steps):
            out[:, k] = step_log_prob(unet, data.step_batch(np.arange(n), np.full(n, k), "sd15"), ddim)
    return out


# ------------------------------------------------------------------------------------------------------
# One step's log-probability
# ------------------------------------------------------------------------------------------------------


def test_recorded_steps_replay_as_draws_of_the_guided_ddim_gaussian(world):
    from peft import LoraConfig

    data, pipe = _all_steps(world)
    ddim = DDIMArgs.of(pipe.scheduler.config, data.timesteps, data.eta)
    assert data.eta == 1.0 and list(ddim.trainable_steps()) == [0, 1, 2, 3]  # SD's set_alpha_to_one=False
    base = _log_probs(pipe.unet, data, ddim)[: len(data)]

    # Independent of trainer code: the pipeline's own prompt encoding and guidance, the scheduler's own
    # DDIM mean (step with zero variance noise) and variance, torch's Normal.
    cand = next(iter(c for c, _ in data.pairs))
    cond, uncond = pipe.encode_prompt(cand.prompt, "cpu", 1, True)
    pipe.scheduler.set_timesteps(STEPS)
    lat = torch.tensor(cand.latents, dtype=torch.float32)
    for k, t in enumerate(cand.timesteps.tolist()):
        with torch.no_grad():
            u, c = pipe.unet(torch.cat([lat[k : k + 1]] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        eps = u + GUIDANCE * (c - u)
        mean = pipe.scheduler.step(eps, t, lat[k : k + 1], eta=1.0, variance_noise=torch.zeros_like(eps)).prev_sample
        std = pipe.scheduler._get_variance(t, t - 1000 // STEPS).sqrt()  # noqa: SLF001 - diffusers' own variance as the reference; eta 1, the last step uses final_alpha_cumprod
        expected = torch.distributions.Normal(mean, std).log_prob(lat[k + 1 : k + 2]).mean()
        assert base[0, k].item() == pytest.approx(expected.item(), abs=1e-4)

    # The recorded x_{k+1} is a draw: its log-prob averages the Gaussian's expectation -1/2 - log std - log sqrt(2 pi).
    t = torch.as_tensor(data.timesteps)
    zeros = torch.zeros(len(t), 1, 1, 1)
    from trainer.losses import ddim_step_mean_std

    _, std = ddim_step_mean_std(zeros, t, zeros, prev_timestep=ddim.prev_timestep(t), eta=1.0, **ddim.scheduler)
    expectation = -0.5 - std.flatten().log() - 0.5 * math.log(2 * math.pi)  # (T,)
    excess = base - expectation  # each a mean over 64 latent elements of (1 - z^2)/2: sd about 0.09
    assert abs(excess.mean().item()) < 0.06 and excess.abs().max().item() < 0.5, excess

    # LoRA at zero, enabled or disabled: the same log-probabilities as the model that sampled.
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    assert torch.equal(_log_probs(pipe.unet, data, ddim)[: len(data)], base)
    with adapters_disabled(pipe.unet):
        assert torch.equal(_log_probs(pipe.unet, data, ddim)[: len(data)], base)
    # Another model (random LoRA B): the recorded steps are less likely under it (KL > 0), unless disabled.
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    assert _log_probs(pipe.unet, data, ddim)[: len(data)].mean() < base.mean() - 0.01
    with adapters_disabled(pipe.unet):
        assert torch.equal(_log_probs(pipe.unet, data, ddim)[: len(data)], base)


# ------------------------------------------------------------------------------------------------------
# Training: round 0, the gradient's sign, both kinds of preferences, export
# ------------------------------------------------------------------------------------------------------


def test_pairs_from_prefpipe_label_train_from_log2_and_export_a_lora_diffusers_loads(world, tmp_path):
    from prefpipe.models import load_pipeline

    run = tmp_path / "ai"
    result = CliRunner().invoke(__import__("trainer.cli", fromlist=["train"]).train, [
        "--model", str(world["model"]), "--out", str(run), "--objective", "d3po", "--candidates", str(world["candidates"]),
        "--source", "ai", "--workdir", str(world["workdir"]), "--max-steps", "3", "--batch-size", "2",
        "--step-fraction", "0.5", "--learning-rate", "1e-3", "--no-progress", "--checkpoint-every", "0",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = _metrics(run)
    first = metrics[0]
    # Round 0: LoRA B is zero, the policy is the reference: every ratio is 1, the loss log 2.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["implicit_acc"] == 0.5 and first["ratio_w"] == 1.0 and first["ratio_l"] == 1.0
    assert first["clip_frac"] == 0.0 and first["reward_margin"] == 0.0
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[-1]["ratio_w"] != 1.0
    config = json.loads((run / "train_config.json").read_text())
    n_pairs = len(PROMPTS) * math.comb(PER_PROMPT, 2)  # strategy all; compressibility never ties here
    assert config["resolved"]["pairs"] == n_pairs and config["resolved"]["steps_per_pair"] == 2
    assert config["resolved"]["beta"] == 0.1 and config["resolved"]["eps"] == 0.1
    for name in ("pytorch_lora_weights.safetensors", "curves.png", "checkpoint-3"):
        assert (run / name).exists(), name
    pipe = load_pipeline(str(world["model"]), dtype="fp32", device="cpu", lora=str(run))  # what generate/eval do
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


def test_one_step_on_one_pair_raises_the_winner_log_prob_against_the_loser(world, tmp_path):
    from peft import LoraConfig

    from trainer.export import load_lora

    run = tmp_path / "one"
    train(_cfg(world, run, source=("ai",), limit=1, batch_size=1, max_steps=1, learning_rate=1e-2, lora_rank=4))
    pair = load_trajectory_pairs(_cfg(world, run, source=("ai",), limit=1))
    data, pipe = _all_steps(world)
    ddim = DDIMArgs.of(pipe.scheduler.config, data.timesteps, data.eta)
    data.pairs = pair.pairs  # the trained (winner, loser)

    def margin() -> float:  # summed over the steps: log p(winner's step) - log p(loser's step)
        winner, loser = _log_probs(pipe.unet, data, ddim)
        return (winner - loser).sum().item()

    before = margin()
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    load_lora(pipe.unet, run, "sd15")
    after = margin()
    assert after > before + 1e-4, (before, after)


def test_d3po_label_files_are_averaged_over_annotators_and_train(world, tmp_path):
    prompts = candidate_prompts(world["candidates"])
    assert len(prompts) == len(PROMPTS) and all(cs == [0, 1, 2] for _, cs in prompts)
    labels = tmp_path / "labels"
    labels.mkdir()
    # Two annotators; the second labelled one prompt fewer (D3PO cuts every file to the shortest).
    (labels / "alice.json").write_text(json.dumps([[2, 0, 1], [1, 1, 1], [0, 0, 3], [5, 5, 5]]))
    (labels / "bob.json").write_text(json.dumps([[2, 0, 1], [1, 1, 1], [0, 2, 3]]))
    scores, files = read_d3po_labels([labels])
    assert [f.name for f in files] == ["alice.json", "bob.json"] and len(scores) == 3
    np.testing.assert_allclose(scores[2], [0, 1, 3])
    # prompt 0: 0 > 2 > 1 (3 pairs); prompt 1: all tied (3 ties); prompt 2: 2 > 1 > 0 (3 pairs)
    run = tmp_path / "human"
    summary = train(_cfg(world, run, labels=(str(labels),), batch_size=2, max_steps=2))
    assert summary["data"]["pairs"] == 6 and summary["data"]["ties_dropped"] == 3
    data = load_trajectory_pairs(_cfg(world, run, labels=(str(labels),)))
    got = {(w.prompt_id, w.candidate, lo.candidate) for w, lo in data.pairs}
    p0, p2 = prompts[0][0], prompts[2][0]
    assert got == {(p0, 0, 2), (p0, 0, 1), (p0, 2, 1), (p2, 2, 1), (p2, 2, 0), (p2, 1, 0)}
    assert (run / "pytorch_lora_weights.safetensors").exists() and len(_metrics(run)) == 2

    # The sheet people label from: images under D3PO's names, the prompts in order.
    sheet = write_label_sheet(world["candidates"], tmp_path / "sheet")
    assert json.loads((sheet / "prompt.json").read_text()) == PROMPTS
    table = pq.read_table(parquet_files(world["candidates"])[0], columns=["prompt_id", "candidate", "image"]).to_pylist()
    row = next(r for r in table if r["prompt_id"] == p2 and r["candidate"] == 1)
    assert (sheet / "images" / f"{3 * 2 + 1:05}.png").read_bytes() == row["image"]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[1, 0]]))
    with pytest.raises(PrefpipeError, match="prompt 0 .* has 2 scores but 3 candidates"):
        load_trajectory_pairs(_cfg(world, run, labels=(str(bad),)))
    bad.write_text(json.dumps({"a": 1}))
    with pytest.raises(PrefpipeError, match="D3PO's format"):
        read_d3po_labels([bad])


def test_pairs_must_be_two_candidates_of_one_prompt_sharing_the_initial_noise(world, tmp_path):
    from prefpipe.core.trajectory import decode_trajectory, encode_trajectory

    pairs = pq.read_table(parquet_files(world["workdir"] / "pairs" / "ai")[0])
    rows = pairs.to_pylist()
    assert all(r["image_0_uid"].rsplit("-", 1)[0] == r["prompt_id"] for r in rows)
    # Row 0 across prompts, row 1 with another prompt's image bytes, row 2 a tie; the rest untouched.
    other = next(r for r in rows if r["prompt_id"] != rows[0]["prompt_id"])
    rows[0]["image_1_uid"] = other["image_1_uid"]
    rows[1]["jpg_0"] = other["jpg_0"]
    rows[2]["label_0"], rows[2]["label_1"] = 0.5, 0.5
    folder = tmp_path / "pairs"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=pairs.schema), folder / "train-00000-of-00001.parquet")

    # A copy of the candidates where one candidate of the last prompt starts from other noise.
    cands = tmp_path / "cands"
    cands.mkdir()
    table = pq.read_table(parquet_files(world["candidates"])[0]).to_pylist()
    moved = table[-1]
    traj = decode_trajectory(moved["trajectory"])
    moved["trajectory"] = encode_trajectory(traj["latents"] + np.float16(0.5), traj["timesteps"], 1.0, GUIDANCE)
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(parquet_files(world["candidates"])[0])),
                   cands / "train-00000-of-00001.parquet")
    moved_key = f"{moved['prompt_id']}-{moved['candidate']}"
    touching = sum(moved_key in (r["image_0_uid"], r["image_1_uid"]) for r in rows[3:])

    data = load_trajectory_pairs(_cfg(world, tmp_path / "r", pairs=(str(folder),), candidates=str(cands)))
    c = data.counts
    assert c["not_two_candidates_of_one_prompt"] == 1 and c["image_mismatch"] == 1 and c["ties_dropped"] == 1
    assert c["different_initial_noise"] == touching >= 1
    assert len(data) == len(rows) - 3 - touching
    for w, lo in data.pairs:
        assert w.prompt_id == lo.prompt_id and np.array_equal(w.latents[0], lo.latents[0])

    # Pairs made from other candidates (Pick-a-Pic style uids) leave nothing, and say why.
    rows = [{**r, "image_0_uid": f"u{i}", "image_1_uid": f"v{i}"} for i, r in enumerate(pairs.to_pylist())]
    pq.write_table(pa.Table.from_pylist(rows, schema=pairs.schema), folder / "train-00000-of-00001.parquet")
    with pytest.raises(PrefpipeError, match=r"all dropped \(12 image uids not PROMPT_ID-CANDIDATE"):
        load_trajectory_pairs(_cfg(world, tmp_path / "r", pairs=(str(folder),)))


def test_options_of_the_other_recipe_are_refused_with_a_message(world, tmp_path):
    with pytest.raises(PrefpipeError, match="trajectories"):
        train(_cfg(world, tmp_path / "a", candidates=None, source=("ai",)))
    with pytest.raises(PrefpipeError, match="--random-flip, --caption-dropout: not used by --objective d3po"):
        train(_cfg(world, tmp_path / "b", source=("ai",), random_flip=True, caption_dropout=0.1))
    with pytest.raises(PrefpipeError, match="--candidates, --labels and --step-fraction are for --objective d3po"):
        train(_cfg(world, tmp_path / "c", objective="dpo", pairs=(str(world["workdir"] / "pairs" / "ai"),)))
    with pytest.raises(PrefpipeError, match="--eps 1.5: must be in"):
        train(_cfg(world, tmp_path / "d", source=("ai",), eps=1.5))
    with pytest.raises(PrefpipeError, match="--eps: --objective dpo has no eps"):
        train(_cfg(world, tmp_path / "e", objective="dpo", candidates=None, eps=0.2,
                   pairs=(str(world["workdir"] / "pairs" / "ai"),)))


# ------------------------------------------------------------------------------------------------------
# Rounds
# ------------------------------------------------------------------------------------------------------


def test_two_rounds_sample_with_the_last_rounds_lora_and_continue_from_it(world, tmp_path):
    from prefpipe.stages.rounds import d3po_rounds

    work = tmp_path / "rounds"
    args = ["--model", str(world["model"]), "--prompts", str(world["prompts"]), "--workdir", str(work),
            "--rounds", "2", "--per-prompt", "2", "--steps", "3", "--guidance", "2.0", "--device", "cpu",
            "--train", "max-steps=2", "--train", "batch-size=2", "--train", "learning-rate=1e-2",
            "--train", "checkpoint-every=0", "--train", "no-progress=true", "--no-progress"]
    result = CliRunner().invoke(d3po_rounds, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run1, run2 = work / "round-1" / "run", work / "round-2" / "run"
    gen1 = read_manifest(work / "round-1" / "candidates")["options"]
    gen2 = read_manifest(work / "round-2" / "candidates")["options"]
    assert gen1["lora"] is None and gen2["lora"] == str(run1.resolve())  # round 2's sampler: round 1's LoRA
    assert gen1["trajectories"] and gen2["seed"] == gen1["seed"] + 1
    assert json.loads((run2 / "train_config.json").read_text())["init_from"] == str(run1)
    assert _metrics(run1)[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert _metrics(run2)[0]["ratio_w"] != 1.0  # round 2 starts from round 1's weights, the reference is the base
    for run in (run1, run2):
        assert (run / "pytorch_lora_weights.safetensors").exists()
    before = (run2 / "metrics.jsonl").read_bytes()
    result = CliRunner().invoke(d3po_rounds, args, catch_exceptions=False)  # a re-run resumes: nothing to do
    assert result.exit_code == 0 and (run2 / "metrics.jsonl").read_bytes() == before


def test_init_from_a_run_with_other_adapter_shapes_is_refused(world, tmp_path):
    run = tmp_path / "r8"
    train(_cfg(world, run, source=("ai",), max_steps=1, batch_size=1, limit=1))
    with pytest.raises(PrefpipeError, match="other shapes; train with --lora-rank 8"):
        train(_cfg(world, tmp_path / "r4", source=("ai",), max_steps=1, batch_size=1, limit=1, lora_rank=4, init_from=str(run)))


def test_d3po_trains_over_an_nf4_base_from_log_2(world, tmp_path):
    """--quantize nf4 (trainer/quantize.py) under D3PO: the policy and the adapters-off reference run the same 4-bit
    layers, so at round 0 every ratio is exactly 1."""
    pytest.importorskip("bitsandbytes")
    from trainer.recipes import train

    run = tmp_path / "nf4"
    train(_cfg(world, run, source=("ai",), max_steps=2, step_fraction=0.5, quantize="nf4"))
    first, last = _metrics(run)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7) and first["ratio_w"] == 1.0
    assert math.isfinite(last["loss"]) and last["ratio_w"] != 1.0
