"""The whole chain that exists today, on the embedded default (synthetic images), on the CPU.

    python scripts/demo.py [--out demo_out] [--n-images 20] [--size 256] [--seed 0]

synthetic images and labels -> heat-diffusion flows (pipeline.flows) -> a stand-in for the
network's output (5 x flows and a cellprob logit, with noise) -> flow-following mask
reconstruction (infer.dynamics) -> the paper's metrics (pipeline.metrics), per kind of image.

Until the trainer lands, the "prediction" is the ground-truth flow field plus Gaussian noise,
so this checks that targets and reconstruction fit together; later stages replace it with a
trained model. Writes, under --out: ``<name>_img.tif``, ``<name>_labels.tif`` (truth) and
``<name>_masks.tif`` (rebuilt), which open in Fiji and napari, and ``metrics.csv``.
"""

import argparse
import csv
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from infer.dynamics import flows_to_masks
from pipeline.flows import masks_to_flows
from pipeline.io import write_image, write_labels
from pipeline.metrics import aggregated_jaccard_index, average_precision, error_rate
from pipeline.synthetic import KINDS, generate_dataset

THRESHOLDS = (0.5, 0.75, 0.9)


def fake_network_output(labels: np.ndarray, rng: np.random.Generator, noise: float):
    """What a good network would predict: 5 x unit flows and a cellprob logit, plus noise."""
    flows = masks_to_flows(labels)
    dP = 5.0 * flows + rng.normal(0.0, noise, flows.shape).astype(np.float32)
    cellprob = np.where(labels > 0, 4.0, -4.0).astype(np.float32)
    cellprob += rng.normal(0.0, noise, labels.shape).astype(np.float32)
    return dP, cellprob


def run(out: Path, n_images: int, size: int, seed: int, noise: float) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    samples = generate_dataset(n_images, kinds=KINDS, shape=(size, size), seed=seed)
    for index, (image, labels, meta) in enumerate(tqdm(samples, total=n_images, desc="demo", unit="img")):
        name = f"{index:03d}_{meta['kind']}"
        start = time.perf_counter()
        dP, cellprob = fake_network_output(labels, rng, noise)
        flows_s = time.perf_counter() - start
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
                name=name, kind=meta["kind"], diameter=round(meta["diameter"], 1),
                n_true=int(labels.max()), n_pred=int(masks.max()),
                **{f"ap{int(t * 100)}": float(ap[0, i]) for i, t in enumerate(THRESHOLDS)},
                error_rate=float(err[0]), aji=float(aji[0]),
                flows_s=round(flows_s, 4), masks_s=round(masks_s, 4),
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
    header = f"{'kind':<10}{'images':>7}{'cells':>7}{'AP@0.5':>8}{'AP@0.75':>9}{'AP@0.9':>8}{'err@0.5':>9}{'AJI':>7}{'flows s':>9}{'masks s':>9}"
    print(header)
    print("-" * len(header))
    for kind, group in by_kind.items():
        mean = lambda key: float(np.nanmean([r[key] for r in group]))  # noqa: E731
        print(
            f"{kind:<10}{len(group):>7}{sum(r['n_true'] for r in group):>7}{mean('ap50'):>8.3f}{mean('ap75'):>9.3f}"
            f"{mean('ap90'):>8.3f}{mean('error_rate'):>9.3f}{mean('aji'):>7.3f}{mean('flows_s'):>9.3f}{mean('masks_s'):>9.3f}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    parser.add_argument("--n-images", type=int, default=20, help="synthetic images, cycling through the kinds")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.5, help="sigma of the noise added to the fake network output")
    args = parser.parse_args(argv)
    rows = run(args.out, args.n_images, args.size, args.seed, args.noise)
    print_summary(rows)
    print(f"\nwrote {len(rows)} images, truth and rebuilt masks, and metrics.csv to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
