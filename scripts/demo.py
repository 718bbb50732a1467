"""The whole chain on the embedded default (synthetic images), on the CPU: ``make demo``.

    python scripts/demo.py [--out demo_out] [--minutes 8] [--nproc 2] [--n-train 400] [--n-test 20]
                           [--kinds nuclei ...]

1. shardgen: synthetic images (by default fluorescent nuclei; ``--kinds`` adds two-channel
   cytoplasm, phase contrast, H&E, rod-shaped bacteria) -> heat-diffusion flows -> WebDataset
   shards, manifest and weights (``<out>/shards``), then ``verify``;
2. ``torchrun --nproc_per_node=2 train/main.py --config configs/demo.yaml`` on those shards: a
   tiny encoder of the paper's structure, 1200 steps (about 6 minutes on 2 cores; stopped
   early, with a checkpoint, at ``--minutes``), exporting ``<out>/run/model_cellpose.pt`` in
   Cellpose's layout;
3. ``python -m infer.benchmark`` on the held-out test split in the shards, never trained on
   (``<out>/benchmark``: the paper's table, benchmark.{md,csv,json}, and the per-image scores,
   images.csv), printed, and per kind of image (``<out>/summary.csv``);
4. the test images written as TIFFs (``<out>/test/images``) and ``python -m infer`` on them with
   the exported model: masks and outline overlays to open in Fiji or napari
   (``<out>/predictions``);
5. ``<out>/demo.png``: one test image of each kind with the predicted outlines, and the loss
   curves.

Everything it writes opens in Fiji and napari (TIFF masks, PNG overlays). Takes about
7 minutes on 2 cores. The model starts from random weights and learns slowly (see
the learning check in docs/BENCHMARKS.md): a few minutes on a CPU give rough masks of the
simplest kind, fluorescent nuclei; all five kinds need far longer.
"""

import argparse
import csv
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chain import benchmark, curves, export_images, infer, train  # noqa: E402
from figure import render_figure  # noqa: E402
from pipeline.io import read_image  # noqa: E402
from pipeline.synthetic import KINDS  # noqa: E402
from pipeline.weights import EXPORT_NAME, read_sidecar  # noqa: E402
from shardgen.build import BuildConfig, build_dataset  # noqa: E402
from shardgen.verify import verify  # noqa: E402

PANELS = 4  # test images in the figure (at least one per kind)


def make_shards(out: Path, n_train: int, n_test: int, kinds: list[str], workers: int) -> Path:
    """Stage 1: the synthetic dataset through shardgen, then verify what was written."""
    src = out / "synthetic_src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "counts.txt").write_text(f"train {n_train}\ntest {n_test}\nkinds {' '.join(kinds)}\n")
    shards = out / "shards"
    start = time.time()
    summary = build_dataset("synthetic", src, shards, config=BuildConfig(workers=workers))
    problems = verify(shards)
    if problems:
        raise SystemExit("shard verification failed:\n" + "\n".join(problems))
    print(f"shards: {summary['written']} samples ({summary['cells']} cells), {summary['rejected']} rejected, "
          f"verified -> {shards} ({time.time() - start:.0f} s)")
    return shards


def kind_of(row: dict) -> str:
    """The kind of a synthetic image: the end of its source (``test/00003_nuclei``)."""
    return row["source"].split("_")[-1]


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Mean AP and error rate per kind of image and over all, from the benchmark's image rows
    (as the benchmark averages: AP over images with any object, the error rate over images with
    true ones)."""
    by_kind = defaultdict(list)
    for row in rows:
        if row["status"] == "ok":
            by_kind[kind_of(row)].append(row)
    by_kind["all"] = [row for group in list(by_kind.values()) for row in group]
    columns = ("ap@0.5", "ap@0.75", "ap@0.9", "error_rate@0.5")
    return {
        kind: dict(images=len(group), cells=sum(int(r["n_true"]) for r in group),
                   found=sum(int(r["n_pred"]) for r in group),
                   **{c: float(np.nanmean([float(r[c]) for r in group])) for c in columns})
        for kind, group in by_kind.items()
    }


def print_summary(summary: dict[str, dict]) -> None:
    header = f"{'kind':<10}{'images':>7}{'cells':>7}{'found':>7}{'AP@0.5':>8}{'AP@0.75':>9}{'AP@0.9':>8}{'err@0.5':>9}"
    print(header)
    print("-" * len(header))
    for kind, s in summary.items():
        print(f"{kind:<10}{s['images']:>7}{s['cells']:>7}{s['found']:>7}{s['ap@0.5']:>8.3f}{s['ap@0.75']:>9.3f}"
              f"{s['ap@0.9']:>8.3f}{s['error_rate@0.5']:>9.3f}")


def figure(out: Path, rows: list[dict], run_dir: Path, title: str) -> Path:
    """Test images with their predicted outlines (infer's overlay PNGs): the first of each kind,
    then the next ones up to ``PANELS``; and the loss curves."""
    ap = {r["key"]: float(r["ap@0.5"]) for r in rows if r["status"] == "ok"}
    kinds = {r["key"]: kind_of(r) for r in rows}
    first_of_kind = {kinds[name]: name for name in sorted(kinds, reverse=True)}
    names = sorted(first_of_kind.values()) + sorted(set(kinds) - set(first_of_kind.values()))
    panels = []
    for name in names[:max(PANELS, len(first_of_kind))]:
        overlay = out / "predictions" / f"{name}_outlines.png"
        if overlay.is_file():
            panels.append((f"{kinds[name]}: AP@0.5 {ap.get(name, float('nan')):.2f}", read_image(overlay)[..., :3]))
    path = out / "demo.png"
    Image.fromarray(render_figure(panels, curves(run_dir), title)).save(path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    parser.add_argument("--minutes", type=float, default=8.0,
                        help="training time limit; the run stops there even before configs/demo.yaml's last step")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes (CPU ranks)")
    parser.add_argument("--n-train", type=int, default=400, help="synthetic training images")
    parser.add_argument("--n-test", type=int, default=20, help="held-out synthetic test images (kinds cycle)")
    parser.add_argument("--kinds", nargs="+", default=["nuclei"], choices=KINDS, help="kinds of synthetic image")
    parser.add_argument("overrides", nargs="*", help="extra training overrides, section.field=value")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    shards = make_shards(out, args.n_train, args.n_test, args.kinds, workers=args.nproc)
    run_dir = out / "run"
    minutes = train(shards, run_dir, args.minutes, args.nproc, args.overrides, out / "train.log", config="demo.yaml")
    checkpoint = run_dir / EXPORT_NAME
    # The table from the shards' test split (as trained: at the images' own scale), then the
    # masks and overlays of the same images as files.
    _, rows = benchmark(shards, checkpoint, out / "benchmark", ("--diameter", "none"))
    infer(export_images(shards, "test", out / "test" / "images"), checkpoint, out)
    summary = summarise(rows)
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["kind", *next(iter(summary.values()))])
        writer.writeheader()
        writer.writerows({"kind": kind, **values} for kind, values in summary.items())

    steps = read_sidecar(run_dir / EXPORT_NAME).step
    title = (f"tiny CP-SAM from random weights, {minutes:.1f} min / {steps} steps on {args.nproc} CPU processes; "
             f"held-out synthetic images, AP@0.5 {summary['all']['ap@0.5']:.2f} (red: predicted outlines)")
    path = figure(out, rows, run_dir, title)
    print()
    print((out / "benchmark" / "benchmark.md").read_text())
    print_summary(summary)
    print(f"\nfigure: {path}\nmasks and overlays: {out / 'predictions'}\n"
          f"table and per-image scores: {out / 'benchmark'} (benchmark.md, benchmark.json, images.csv)"
          f"\nmodel (Cellpose layout): {run_dir / EXPORT_NAME}   total {(time.time() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
