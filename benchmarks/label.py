"""Label-stage throughput: images/s per scorer, all scorers in one pass vs one pass per scorer, and our
HPSv2 against the `hpsv2` package's own API on the same checkpoint (same process, same images).

    .venv/bin/python benchmarks/label.py                     # tiny checkpoints built here, CPU
    .venv/bin/python benchmarks/label.py --real --images 512 # hub defaults, on a GPU (needs the hub)

Writes benchmarks/results/label.json.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SCORERS = ["pickscore", "hpsv2", "clip", "aesthetic", "compressibility"]


def drawn_candidates(folder: Path, n: int, side: int) -> Path:
    """A candidates dataset of `n` PNG images (smooth noise, `side` px), 4 per prompt, in 4 shards."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from prefpipe.core.dataset import ShardedDataset
    from prefpipe.core.prompts import prompt_id
    from prefpipe.core.schema import CANDIDATES

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        small = rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side, side), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        p = f"a photo of object {i // 4}"
        rows.append(dict(prompt_id=prompt_id(p), prompt=p, candidate=i % 4, seed=i, image=buf.getvalue(),
                         width=side, height=side, model="drawn", scheduler="none", steps=0, guidance=0.0))
    ds = ShardedDataset(folder, "generate", {"bench": n}, "fp", 4, CANDIDATES)
    per = -(-n // 4)
    for u in range(4):
        with ds.write_unit(u) as w:
            w.write(pa.Table.from_pylist(rows[u * per : (u + 1) * per], schema=CANDIDATES))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--real", action="store_true", help="use the real hub checkpoints instead of tiny ones")
    args = ap.parse_args()

    from prefpipe.stages.label import score_candidates
    from prefpipe.stages.scoring import load_scorers
    from prefpipe.testing.scorers import write_tiny_scorer

    work = Path(tempfile.mkdtemp(prefix="prefpipe-bench-label-"))
    cands = drawn_candidates(work / "candidates", args.images, args.side)
    weights = {} if args.real else {k: str(write_tiny_scorer(k, work / k)) for k in SCORERS if k != "compressibility"}
    scorers = load_scorers(SCORERS, weights, batch_size=args.batch_size, device="auto")
    by_name = {s.name: s for s in scorers}
    score_candidates(cands, work / "warm", SCORERS, weights, batch_size=args.batch_size, progress=False, scorers=scorers)

    result: dict = {"images": args.images, "side": args.side, "weights": "hub" if args.real else "tiny", "per_scorer": {}}
    t0 = time.perf_counter()
    score_candidates(cands, work / "all", SCORERS, weights, batch_size=args.batch_size, progress=False, scorers=scorers)
    one_pass = time.perf_counter() - t0
    separate = 0.0
    for name in SCORERS:
        t0 = time.perf_counter()
        score_candidates(cands, work / f"only-{name}", [name], weights, batch_size=args.batch_size, progress=False,
                         scorers=[by_name[name]])
        dt = time.perf_counter() - t0
        separate += dt
        result["per_scorer"][name] = {"images_per_s": args.images / dt}
    result["all_in_one_pass_s"] = one_pass
    result["one_pass_per_scorer_s"] = separate
    result["one_pass_speedup"] = separate / one_pass

    # HPSv2: ours (batched) against the reference package's per-image API, same checkpoint and images
    try:
        import polars as pl
        from PIL import Image

        from prefpipe.core.tables import parquet_files

        df = pl.read_parquet(parquet_files(cands))
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in df["image"]]
        prompts = df["prompt"].to_list()
        ref_score, checkpoint = _hpsv2_reference(work, weights.get("hpsv2"))
        t0 = time.perf_counter()
        for img, p in zip(images, prompts):
            ref_score([img], p, cp=checkpoint, hps_version="v2.1")
        ref_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        by_name["hpsv2"].score(images, prompts)
        ours_s = time.perf_counter() - t0
        result["hpsv2_vs_reference_package"] = {"ours_images_per_s": len(images) / ours_s,
                                                "reference_per_image_api_images_per_s": len(images) / ref_s,
                                                "speedup": ref_s / ours_s}
    except ImportError as e:
        result["hpsv2_vs_reference_package"] = f"skipped: {e} (pip install --no-deps hpsv2x clint)"

    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "label.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def _hpsv2_reference(work: Path, tiny_weights: str | None):
    """The hpsv2 package's `img_score.score`; with tiny weights, its model cache filled with the tiny arch."""
    from hpsv2 import img_score

    if tiny_weights is None:
        return img_score.score, None
    from hpsv2.src.open_clip import factory

    from prefpipe.testing.scorers import TINY_OPEN_CLIP_H

    factory._MODEL_CONFIGS["prefpipe-tiny-ViT-H-14"] = json.loads(json.dumps(TINY_OPEN_CLIP_H))  # noqa: SLF001 - the reference package has no public way to register an architecture
    real_create = img_score.create_model_and_transforms
    img_score.create_model_and_transforms = lambda name, pretrained, **kw: real_create("prefpipe-tiny-ViT-H-14", None, **kw)
    img_score.model_dict = {}
    img_score.root_path = str(work)
    img_score.device = "cpu"
    return img_score.score, str(Path(tiny_weights) / "HPS_v2.1_compressed.pt")


if __name__ == "__main__":
    main()
