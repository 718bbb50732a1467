"""The whole chain that exists today, on the embedded default (synthetic images), on the CPU.

    python scripts/demo.py [--out demo_out] [--n-train 40] [--n-test 20] [--noise 0.5]

1. shardgen: synthetic images -> checked samples with heat-diffusion flows -> WebDataset shards,
   manifest and weights (``<out>/shards``), then ``verify``;
2. the test split streamed back from the shards with webdataset;
3. a stand-in for the network's output: 5 x the stored flows and a cellprob logit, with noise;
4. flow-following mask reconstruction (infer.dynamics);
5. the paper's metrics (pipeline.metrics), per kind of image.

Until the trainer lands, the "prediction" is the ground-truth flow field plus Gaussian noise,
so this checks that the shards, the targets and the reconstruction fit together; later stages
replace it with a trained model. Writes, under --out: the shards, and per test image
``<name>_img.tif``, ``<name>_labels.tif`` (truth) and ``<name>_masks.tif`` (rebuilt), which open
in Fiji and napari, and ``metrics.csv``.
"""

import argparse
import csv
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

import webdataset as wds

from infer.dynamics import flows_to_masks
from pipeline.io import write_image, write_labels
from pipeline.metrics import aggregated_jaccard_index, average_precision, error_rate
from pipeline.shards import decode_sample
from shardgen.build import BuildConfig, build_dataset
from shardgen.verify import verify

THRESHOLDS = (0.5, 0.75, 0.9)


def fake_network_output(labels: np.ndarray, flows: np.ndarray, rng: np.random.Generator, noise: float):
    """What a good network would predict: 5 x unit flows and a cellprob logit, plus noise."""
    dP = 5.0 * flows.astype(np.float32) + rng.normal(0.0, noise, flows.shape).astype(np.float32)
    cellprob = np.where(labels > 0, 4.0, -4.0).astype(np.float32)
    cellprob += rng.normal(0.0, noise, labels.shape).astype(np.float32)
    return dP, cellprob


def make_shards(out: Path, n_train: int, n_test: int) -> Path:
    """Stage 1: the synthetic dataset through shardgen, then verify what was written."""
    src = out / "synthetic_src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "counts.txt").write_text(f"train {n_train}\ntest {n_test}\n")
    shards = out / "shards"
    summary = build_dataset("synthetic", src, shards, config=BuildConfig(workers=0))
    print(f"shards: {summary['written']} samples ({summary['cells']} cells), {summary['rejected']} rejected -> {shards}")
    problems = verify(shards)
    if problems:
        raise SystemExit("shard verification failed:\n" + "\n".join(problems))
    return shards


def run(out: Path, n_train: int, n_test: int, seed: int, noise: float) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    shards = make_shards(out, n_train, n_test)
    rng = np.random.default_rng(seed)
    rows = []
    urls = sorted(str(p) for p in (shards / "synthetic").glob("synthetic-test-*.tar"))
    stream = (decode_sample(raw) for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    for image, labels, flows, meta, _ in tqdm(stream, total=n_test, desc="masks", unit="img"):
        name = meta.key
        dP, cellprob = fake_network_output(labels, flows, rng, noise)
        start = time.perf_counter()
        masks = flows_to_masks(dP, cellprob)
        masks_s = time.perf_counter() - start

        ap, tp, fp, fn = average_precision(labels, masks, THRESHOLDS)
        err, _ = error_rate(labels, masks)
        aji, _ = aggregated_jaccard_index(labels, masks)
        write_image(out / f"{name}_img.tif", image)
        write_labels(out / f"{name}_labels.tif", labels)
        write_labels(out / f"{name}_masks.tif", masks)
        rows.append(
            dict(
                name=name, kind=meta.source.split("_")[-1], diameter=round(meta.diameter, 1),
                n_true=int(labels.max()), n_pred=int(masks.max()),
                **{f"ap{int(t * 100)}": float(ap[0, i]) for i, t in enumerate(THRESHOLDS)},
                error_rate=float(err[0]), aji=float(aji[0]),
                masks_s=round(masks_s, 4),
            )
        )
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def print_summary(rows: list[dict]) -> None:
    by_kind = defaultdict(list)
    for row in rows:
        by_kind[row["kind"]].append(row)
    by_kind["all"] = rows
    header = f"{'kind':<10}{'images':>7}{'cells':>7}{'AP@0.5':>8}{'AP@0.75':>9}{'AP@0.9':>8}{'err@0.5':>9}{'AJI':>7}{'masks s':>9}"
    print(header)
    print("-" * len(header))
    for kind, group in by_kind.items():
        mean = lambda key: float(np.nanmean([r[key] for r in group]))  # noqa: E731
        print(
            f"{kind:<10}{len(group):>7}{sum(r['n_true'] for r in group):>7}{mean('ap50'):>8.3f}{mean('ap75'):>9.3f}"
            f"{mean('ap90'):>8.3f}{mean('error_rate'):>9.3f}{mean('aji'):>7.3f}{mean('masks_s'):>9.3f}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    parser.add_argument("--n-train", type=int, default=40, help="synthetic training images put in shards")
    parser.add_argument("--n-test", type=int, default=20, help="synthetic test images, cycling through the kinds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stand-in network's noise")
    parser.add_argument("--noise", type=float, default=0.5, help="sigma of the noise added to the fake network output")
    args = parser.parse_args(argv)
    rows = run(args.out, args.n_train, args.n_test, args.seed, args.noise)
    print_summary(rows)
    print(f"\nwrote shards, {len(rows)} test images with truth and rebuilt masks, and metrics.csv to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
