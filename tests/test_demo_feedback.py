"""`make demo-feedback`'s parts, each against the real thing it stands beside.

- the oracle (`prefpipe/demo/oracle.py`) against the drawing program's ground truth (`prefpipe/demo/world.py`
  knows what it drew), also after the JPEG round trip the Pick-a-Pic shards put images through;
- the simulated annotators: their stated agreement and tie rates measured on what they wrote (the shards
  read back, every image judged again by the oracle), and the shards read by the real `prefpipe ingest
  pickapic`;
- the demo's CLIP: saved in open_clip's format and loaded by the real `clip` scorer (`build_scorer`), which
  scores as the trained model does; cached by config;
- the control's reversed pairs and the headline's input errors.

The whole chain (`make demo-feedback`, reduced) is tests/test_demo_feedback_chain.py.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.prompts import prompt_id
from prefpipe.core.schema import CANDIDATES, PICKAPIC_V2, conform
from prefpipe.demo import oracle
from prefpipe.demo.world import COLOURS, SHAPES, TEXTURES, caption, combinations, draw_dataset, draw_image
from tests.conftest import run_cli

# ------------------------------------------------------------------------------------------------------
# The oracle against the drawing program
# ------------------------------------------------------------------------------------------------------


def _jpeg_round_trip(pixels: np.ndarray, quality: int = 95) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, subsampling=0)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def test_oracle_reads_every_drawn_image_as_the_drawing_program_drew_it():
    drawn = draw_dataset(600, seed=2024)
    readings = [oracle.read(p, c) for p, c in zip(drawn.pixels, drawn.captions())]
    acc = oracle.accuracy(readings)
    for part in oracle.PARTS:
        assert acc[part]["n"] == 600
        assert acc[part]["accuracy"] == 1.0, (part, acc[part])
    # every texture and shape was among them, so none of them is left unread
    assert set(drawn.textures.tolist()) == set(range(len(TEXTURES)))
    assert {r.wanted[1] for r in readings} == set(SHAPES)
    # images reach the annotators as JPEG (quality 95, the shards' encoding): still read right
    jpeg = [oracle.read(_jpeg_round_trip(p), c) for p, c in zip(drawn.pixels[:200], drawn.captions()[:200])]
    assert oracle.accuracy(jpeg)["all"]["accuracy"] >= 0.99
    assert oracle.shape_reading_accuracy(n=300, seed=9) >= 0.99


def test_oracle_says_what_is_wrong_when_the_image_is_not_what_the_prompt_asked_for():
    rng = np.random.default_rng(3)
    colours = list(COLOURS)
    wrong = {"shape_colour": 0, "background": 0, "shape": 0}
    for _ in range(60):
        fg, bg = rng.choice(colours, 2, replace=False)
        shape = SHAPES[int(rng.integers(3))]
        pixels = draw_image(rng, fg, shape, bg, TEXTURES[int(rng.integers(4))])
        other_fg = next(c for c in colours if c not in (fg, bg))
        other_shape = SHAPES[(SHAPES.index(shape) + 1) % 3]
        # asked for another shape colour / background / shape: exactly that part is wrong
        for part, prompt in (("shape_colour", caption(other_fg, shape, bg)), ("background", caption(fg, shape, other_fg)),
                             ("shape", caption(fg, other_shape, bg))):
            parts = oracle.read(pixels, prompt).parts
            assert not parts[part] and not parts["all"], (fg, shape, bg, prompt, parts)
            assert sum(parts[p] for p in ("shape_colour", "background", "shape")) == 2, (prompt, parts)
            wrong[part] += 1
        # the colours swapped (the base model's typical mistake): both colours wrong, utility 1 (the shape)
        swapped = oracle.read(pixels, caption(bg, shape, fg))
        assert not swapped.parts["shape_colour"] and not swapped.parts["background"]
        assert swapped.utility == 1
        assert oracle.read(pixels, caption(fg, shape, bg)).utility == 3
    assert wrong == {"shape_colour": 60, "background": 60, "shape": 60}


def test_oracle_reads_no_shape_in_a_flat_image_and_rejects_other_prompts():
    flat = np.zeros((32, 32, 3), np.uint8)
    flat[:] = COLOURS["green"]
    r = oracle.read(flat, caption("red", "circle", "green"))
    assert r.background == "green" and r.shape_colour is None and r.shape is None
    assert r.parts == {"shape_colour": False, "background": True, "colours": False, "shape": False, "all": False}
    with pytest.raises(ValueError, match="not a demo caption"):
        oracle.read(flat, "a photo of a cat")


def test_oracle_is_deterministic_and_needs_no_learnt_model():
    drawn = draw_dataset(50, seed=8)
    a = oracle.alignment([Image.fromarray(p) for p in drawn.pixels], drawn.captions())
    b = oracle.alignment([Image.fromarray(p) for p in drawn.pixels], drawn.captions())
    assert a == b
    # reading images loads neither torch nor any scorer: the oracle cannot lean on the CLIP it judges
    code = ("import sys, numpy as np; from prefpipe.demo import oracle; from prefpipe.demo.world import draw_dataset; "
            "d = draw_dataset(20, 1); rs = [oracle.read(p, c) for p, c in zip(d.pixels, d.captions())]; "
            "assert all(r.parts['all'] for r in rs); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'labelers', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------------------------------------------------
# Simulated annotators -> Pick-a-Pic v2 shards -> prefpipe ingest pickapic
# ------------------------------------------------------------------------------------------------------


def write_drawn_candidates(folder: Path, prompts: int = 60, per_prompt: int = 4, seed: int = 0) -> Path:
    """A candidates dataset (the schema `prefpipe generate` writes) of drawn images; each candidate shows
    what its prompt asked for, or gets one or two of the three things wrong, so the oracle separates most
    pairs of a prompt."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    rows = []
    for fg, shape, bg in combinations()[:prompts]:
        prompt = caption(fg, shape, bg)
        for c in range(per_prompt):
            got = [fg, shape, bg]
            for k in rng.permutation(3)[: int(rng.integers(0, 3))]:  # 0-2 of the parts drawn wrong
                if k == 1:
                    got[1] = SHAPES[(SHAPES.index(shape) + 1 + int(rng.integers(2))) % 3]
                else:
                    got[k] = rng.choice([x for x in colours if x not in (got[0], got[2])])
            buf = io.BytesIO()
            Image.fromarray(draw_image(rng, *got, TEXTURES[int(rng.integers(4))])).save(buf, format="PNG")
            rows.append({"prompt_id": prompt_id(prompt), "prompt": prompt, "candidate": c, "seed": len(rows),
                         "image": buf.getvalue(), "width": 32, "height": 32, "model": "drawn", "scheduler": "none",
                         "steps": 0, "guidance": 0.0})
    folder.mkdir(parents=True)
    pq.write_table(conform(pa.Table.from_pylist(rows), CANDIDATES), folder / "part-00000.parquet")
    return folder


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotators")
    cands = write_drawn_candidates(root / "candidates", prompts=90, per_prompt=5)
    run_cli("demo-annotate", "--candidates", cands, "--out", root / "pickapic", "--pairs-per-prompt", 10,
            "--agreement", 0.8, "--tie-rate", 0.1, "--annotators", 5, "--shards", 3, "--seed", 1)
    return root, cands


def test_annotators_write_the_published_pick_a_pic_v2_layout(annotated):
    root, _ = annotated
    files = sorted((root / "pickapic" / "data").glob("*.parquet"))
    assert len(files) == 3
    for k, f in enumerate(files):
        assert f.name.startswith(f"train-{k:05d}-of-00003-") and len(f.stem.split("-")[-1]) == 16
        schema = pq.read_schema(f)
        assert schema.names == PICKAPIC_V2.names + ["__index_level_0__"]
        for field in PICKAPIC_V2:
            assert schema.field(field.name).type == field.type, field.name
    t = pa.concat_tables(pq.read_table(f) for f in files)
    assert t.num_rows == 90 * 10
    d = t.to_pydict()
    assert set(d["user_id"]) == set(range(5))
    for l0, l1, best, u0, u1 in zip(d["label_0"], d["label_1"], d["best_image_uid"], d["image_0_uid"], d["image_1_uid"]):
        assert (l0, l1) in ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5))
        assert best == (u0 if l0 == 1 else u1 if l1 == 1 else None)
    # images are JPEG bytes, as in the published dataset
    assert all(b[:2] == b"\xff\xd8" for b in d["jpg_0"][:20] + d["jpg_1"][:20])


def test_annotators_realise_their_stated_agreement_and_tie_rates(annotated):
    """Measured on the shards they wrote: every image read again by the oracle (from the JPEG bytes)."""
    root, _ = annotated
    t = pa.concat_tables(pq.read_table(f) for f in sorted((root / "pickapic" / "data").glob("*.parquet")))
    d = t.to_pydict()
    ties = agree = separated = 0
    for prompt, j0, j1, l0 in zip(d["caption"], d["jpg_0"], d["jpg_1"], d["label_0"]):
        u0 = oracle.read(oracle.to_pixels(j0), prompt).utility
        u1 = oracle.read(oracle.to_pixels(j1), prompt).utility
        ties += l0 == 0.5
        if u0 != u1:
            separated += 1
            agree += l0 == float(u0 > u1)
    n = t.num_rows
    assert separated > 0.6 * n  # the drawn candidates differ, so most pairs test the annotators
    # binomial tolerance: 4 standard deviations
    assert abs(ties / n - 0.1) < 4 * np.sqrt(0.1 * 0.9 / n), ties / n
    assert abs(agree / separated - 0.8) < 4 * np.sqrt(0.8 * 0.2 / separated), agree / separated
    record = json.loads((root / "pickapic" / "annotators.json").read_text())
    assert record["pairs"] == n and record["ties"] == ties and record["oracle_separates"] == separated
    assert record["agree"] == agree
    assert record["realised"]["agreement_where_oracle_separates"] == pytest.approx(agree / separated)


def test_noiseless_annotators_agree_with_the_oracle_on_every_pair_it_separates(tmp_path):
    cands = write_drawn_candidates(tmp_path / "candidates", prompts=20, per_prompt=4, seed=5)
    run_cli("demo-annotate", "--candidates", cands, "--out", tmp_path / "pickapic", "--agreement", 1,
            "--tie-rate", 0, "--pairs-per-prompt", 6)
    r = json.loads((tmp_path / "pickapic" / "annotators.json").read_text())
    assert r["pairs"] == 20 * 6 and r["ties"] == 0 and r["disagree"] == 0 and r["agree"] == r["oracle_separates"] > 0


def test_the_shards_go_through_the_real_ingest_pickapic_into_pairs_human(annotated, tmp_path):
    root, _ = annotated
    run_cli("ingest", "pickapic", "--from", root / "pickapic" / "data", "--out", tmp_path / "w", "--no-progress",
            "--verify-images", "full")
    pairs = pa.concat_tables(pq.read_table(f) for f in sorted((tmp_path / "w" / "pairs" / "human").glob("*.parquet")))
    record = json.loads((root / "pickapic" / "annotators.json").read_text())
    # ingest drops the ties (as the Diffusion-DPO paper does) and nothing else: no image is bad, no pair repeats
    assert pairs.num_rows == record["pairs"] - record["ties"]
    d = pairs.to_pydict()
    assert set(d["source"]) == {"human"}
    assert {p for p in d["prompt_id"]} == {prompt_id(c) for c in d["caption"]}
    src = pa.concat_tables(pq.read_table(f) for f in sorted((root / "pickapic" / "data").glob("*.parquet"))).to_pydict()
    judged = {(u0, u1): l0 for u0, u1, l0 in zip(src["image_0_uid"], src["image_1_uid"], src["label_0"])}
    assert all(judged[(u0, u1)] == l0 for u0, u1, l0 in zip(d["image_0_uid"], d["image_1_uid"], d["label_0"]))


def test_annotators_refuse_rates_that_cannot_add_up(tmp_path):
    cands = write_drawn_candidates(tmp_path / "candidates", prompts=2, per_prompt=2)
    proc = run_cli("demo-annotate", "--candidates", cands, "--out", tmp_path / "out", "--agreement", 0.95,
                   "--tie-rate", 0.1, check=False)
    assert proc.returncode != 0
    assert "--agreement 0.95, --tie-rate 0.1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = run_cli("demo-annotate", "--candidates", tmp_path / "missing", "--out", tmp_path / "out", check=False)
    assert proc.returncode != 0 and "--candidates" in proc.stderr


# ------------------------------------------------------------------------------------------------------
# The demo's CLIP through the real `clip` scorer
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_clip(tmp_path_factory):
    from prefpipe.demo.clip import QUICK, build_demo_clip

    out = tmp_path_factory.mktemp("clip") / "clip"
    record = build_demo_clip(QUICK, out, progress=False)
    return out, record


def test_demo_clip_saves_in_open_clip_format_and_the_clip_scorer_loads_it(quick_clip, one_thread):
    import torch
    import torch.nn.functional as F

    from labelers.hpsv2 import build_open_clip
    from labelers.registry import build_scorer
    from prefpipe.demo.clip import QUICK, normalise

    out, record = quick_clip
    assert not record["cached"]
    assert {p.name for p in out.iterdir()} == {"open_clip_config.json", "open_clip_model.safetensors", "prefpipe_demo_clip.json"}
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"] == QUICK.model_cfg() and cfg["preprocess_cfg"]["mean"] == [0.48145466, 0.4578275, 0.40821073]

    scorer = build_scorer("clip", weights=str(out), device="cpu")
    assert scorer.backend == "open_clip" and scorer.version == f"open_clip:{out}"
    drawn = draw_dataset(16, seed=77)
    prompts = drawn.captions()
    wrong = [caption(*combinations()[(c + 1) % 90]) for c in drawn.combos]
    got = scorer.score([Image.fromarray(p) for p in drawn.pixels], prompts)
    got_wrong = scorer.score([Image.fromarray(p) for p in drawn.pixels], wrong)

    # the same weights, read back by hand into a fresh open_clip model, score the same
    from safetensors.torch import load_file

    model, tokenizer = build_open_clip(QUICK.model_cfg())
    model.load_state_dict(load_file(str(out / "open_clip_model.safetensors")))
    model.eval()
    with torch.no_grad():
        x = normalise(torch.from_numpy(drawn.pixels).float().div(255).permute(0, 3, 1, 2))
        img = F.normalize(model.encode_image(x), dim=-1)
        want = [(100 * (img * F.normalize(model.encode_text(tokenizer(p)), dim=-1)).sum(-1)).clamp(min=0).numpy()
                for p in (prompts, wrong)]
    np.testing.assert_allclose(got, want[0], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got_wrong, want[1], rtol=1e-4, atol=1e-3)
    assert not np.allclose(got, got_wrong)  # the score reads the prompt


def test_demo_clip_is_cached_by_config(quick_clip, tmp_path):
    from dataclasses import replace

    from prefpipe.demo.clip import CACHE, QUICK, build_demo_clip

    out, first = quick_clip
    weights = (out / "open_clip_model.safetensors").read_bytes()
    again = build_demo_clip(QUICK, out, progress=False)
    assert again["cached"] and (out / "open_clip_model.safetensors").read_bytes() == weights
    assert CACHE.holds(out, QUICK) and not CACHE.holds(out, replace(QUICK, steps=QUICK.steps + 1))
    # same config elsewhere: the same weights (one thread, deterministic kernels, seeded drawings)
    other = build_demo_clip(QUICK, tmp_path / "clip", progress=False)
    assert not other["cached"] and (tmp_path / "clip" / "open_clip_model.safetensors").read_bytes() == weights
    assert other["config"] == first["config"]


def test_demo_clip_command_says_what_it_did(tmp_path):
    proc = run_cli("demo-clip", "--out", tmp_path / "clip", "--quick", "--steps", 3, "--no-progress")
    assert "demo-clip: 3 steps of 32 drawn images" in proc.stderr
    proc = run_cli("demo-clip", "--out", tmp_path / "clip", "--quick", "--steps", 3, "--no-progress")
    assert "already holds this config" in proc.stderr
    bad = run_cli("demo-clip", "--out", tmp_path / "clip", "--steps", 0, check=False)
    assert bad.returncode != 0 and "--steps" in bad.stderr


# ------------------------------------------------------------------------------------------------------
# The control's reversed pairs, the headline's inputs
# ------------------------------------------------------------------------------------------------------


def test_reversed_pairs_flip_every_preference_and_keep_the_rest(annotated, tmp_path):
    from prefpipe.demo.feedback import reverse_pairs

    root, _ = annotated
    run_cli("ingest", "pickapic", "--from", root / "pickapic" / "data", "--out", tmp_path / "w", "--no-progress")
    n = reverse_pairs(tmp_path / "w" / "pairs" / "human", tmp_path / "reversed")
    a = pa.concat_tables(pq.read_table(f) for f in sorted((tmp_path / "w" / "pairs" / "human").glob("*.parquet"))).to_pydict()
    b = pa.concat_tables(pq.read_table(f) for f in sorted((tmp_path / "reversed").glob("*.parquet"))).to_pydict()
    assert n == len(a["label_0"]) == len(b["label_0"]) > 0
    assert b["label_0"] == a["label_1"] and b["label_1"] == a["label_0"]
    assert all(bb != ab and bb in (u0, u1) for ab, bb, u0, u1 in
               zip(a["best_image_uid"], b["best_image_uid"], a["image_0_uid"], a["image_1_uid"]))
    assert b["jpg_0"] == a["jpg_0"] and b["caption"] == a["caption"]


def test_reversed_scores_turn_each_prompts_top_into_its_bottom(tmp_path):
    from prefpipe.core.schema import SCORES, conform
    from prefpipe.demo.feedback import reverse_scores
    from prefpipe.stages.feedback import FeedbackOptions, build_feedback

    rows = [{"prompt_id": p, "candidate": c, "scorer": "clip", "score": float(s)}
            for p, scores in (("a", [3, 1, 2]), ("b", [0, 5, 4])) for c, s in enumerate(scores)]
    (tmp_path / "scores").mkdir()
    pq.write_table(conform(pa.Table.from_pylist(rows), SCORES), tmp_path / "scores" / "s.parquet")
    assert reverse_scores(tmp_path / "scores", tmp_path / "reversed") == 6
    labels = {}
    for name in ("scores", "reversed"):
        ds = build_feedback(tmp_path / name, tmp_path / f"fb-{name}", FeedbackOptions(
            source="scores", desirable_top=0.34, undesirable_bottom=0.34))
        t = pa.concat_tables(pq.read_table(f) for f in sorted(ds.folder.glob("*.parquet"))).to_pydict()
        labels[name] = {(p, c): d for p, c, d in zip(t["prompt_id"], t["candidate"], t["desirable"])}
    assert labels["scores"] == {("a", 0): True, ("a", 1): False, ("b", 1): True, ("b", 0): False}
    assert labels["reversed"] == {k: not v for k, v in labels["scores"].items()}


def test_verdict_needs_every_evaluated_arm_above_the_base_and_its_control_not():
    from prefpipe.demo.feedback import verdict

    assert verdict({"base": 0.4, "ai": 0.5, "control": 0.3})
    assert verdict({"base": 0.4, "ai": 0.5, "control": 0.4, "ai-kto": 0.7, "control-kto": 0.2, "human": 0.1})
    assert not verdict({"base": 0.4, "ai": 0.5, "control": 0.3, "ai-kto": 0.7, "control-kto": 0.45})
    assert not verdict({"base": 0.4, "ai": 0.4, "control": 0.3})
    assert not verdict({"base": 0.4, "ai": 0.9})  # no control evaluated: nothing shown


def test_headline_names_a_missing_eval_report(tmp_path):
    from prefpipe.demo.feedback import feedback_headline

    with pytest.raises(PrefpipeError, match="no eval report"):
        feedback_headline(tmp_path / "eval")
    proc = run_cli("demo-feedback-headline", "--eval", tmp_path / "eval", check=False)
    assert proc.returncode != 0 and "report.json: no eval report" in proc.stderr and "Traceback" not in proc.stderr
