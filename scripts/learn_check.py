"""Learning check: does the whole chain learn? (issue 4)

    python scripts/learn_check.py [--out runs/learn_check] [--minutes 30] [--nproc 2] [override ...]

1. Shards from the real samples in ../shared/data (Cellpose cyto: 20 images; DSB2018 nuclei:
   the images not held out) plus synthetic images, with sampling weights favouring nuclei.
2. ``torchrun --nproc_per_node=N train/main.py --config configs/learn-check.yaml`` (the tiny
   model, a fixed number of steps: 25-28 minutes on 2 cores), stopped early at ``--minutes``
   (with a checkpoint and the export) if the machine is slower.
3. The held-out DSB images (one image per appearance group from dsb2018/manifest.csv and a
   fixed share of the rest, never seen in training) as a shard root of their own
   (``<out>/held_out_shards``), then ``python -m infer.benchmark --diameter auto`` on it (the
   table: ``<out>/benchmark``); the same at the images' own scale (``--diameter none``,
   ``<out>/native_scale``) for comparison. ``python -m infer --diameter auto`` on the same images
   as files gives the masks and outlines of the figure (``<out>/predictions``).
4. Prints the table, AP@0.5/0.75/0.9 and the loss curve, and writes ``<out>/learn_check.json``,
   ``<out>/loss_curve.csv`` and ``<out>/learn_check.png`` (the four held-out images with the most
   nuclei, predicted outlines, loss curves). Goal (issue 4): AP@0.5 >= 0.6 on the held-out DSB
   nuclei; the exit code is 1 below it. Runs and results: docs/BENCHMARKS.md.
"""

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chain import REPO, benchmark, curves, export_images, infer, train  # noqa: E402
from figure import render_figure  # noqa: E402
from pipeline.io import read_image  # noqa: E402
from shardgen.build import BuildConfig, build_dataset, finalize  # noqa: E402

SHARED = Path(os.environ.get("CPSAM_SHARED_DATA", REPO.parent / "shared" / "data"))
HELD_OUT_FRACTION = 0.25
# Sampling weights of the three shard groups: measured in docs/BENCHMARKS.md (runs 7 and 9).
WEIGHTS = {"instance_pngs": 0.85, "synthetic": 0.1, "cyto2": 0.05}
# Inference: each image's diameter estimated from a first run at its own scale, then rescaled to
# 30 px (the tiny model is trained on a narrow range of sizes around 30; docs/BENCHMARKS.md).
INFER_OPTIONS = ("--diameter", "auto")
# The held-out images' shard root has the converter's only split (instance_pngs: "all").
HELD_OUT_SPLIT = ("--split", "all")


def appearance_groups(root: Path) -> dict[str, str]:
    """Each DSB image id's appearance group (fluo_gray, color, bright_gray) from manifest.csv."""
    return {row["image_id"]: row["appearance_group"] for row in csv.DictReader((root / "manifest.csv").open())}


def split_dsb(root: Path) -> tuple[list[str], list[str]]:
    """Held-out DSB ids: every 4th image of each appearance group (at least one per group)."""
    groups: dict[str, list[str]] = {}
    for image_id, group in sorted(appearance_groups(root).items()):
        groups.setdefault(group, []).append(image_id)
    held = sorted(ids[i] for ids in groups.values() for i in range(0, len(ids), round(1 / HELD_OUT_FRACTION)))
    held_set = set(held)
    train = sorted(image_id for ids in groups.values() for image_id in ids if image_id not in held_set)
    return train, held


def ap_by_group(rows: list[dict], groups: dict[str, str]) -> dict[str, dict]:
    """Mean AP@0.5 and image count per appearance group, from the benchmark's image rows (the
    source of a DSB sample is its image id)."""
    scores: dict[str, list[float]] = {}
    for row in rows:
        if row["status"] == "ok":
            scores.setdefault(groups[row["source"]], []).append(float(row["ap@0.5"]))
    return {group: {"images": len(v), "ap50": round(float(np.mean(v)), 4)} for group, v in sorted(scores.items())}


def diameters(rows: list[dict]) -> dict[str, dict]:
    """Per held-out image (id shortened to 8 characters): the diameter ``--diameter auto``
    estimated and the labels' own, from the benchmark's image rows."""
    return {row["source"][:8]: {"estimated": float(row["diameter"]) if row["diameter"] else None,
                                "true": float(row["true_diameter"])} for row in rows}


def link_tree(ids: list[str], source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        link = target / image_id
        if not link.exists():
            link.symlink_to(source / image_id, target_is_directory=True)
    return target


def monuseg_as_training(test_dir: Path, target: Path) -> Path:
    """The MoNuSeg test-split files linked into the training layout, so they are trained on."""
    for sub in ("Tissue Images", "Annotations"):
        (target / "MoNuSeg 2018 Training Data" / sub).mkdir(parents=True, exist_ok=True)
    for tif in sorted(test_dir.glob("*.tif")):
        for src, sub in ((tif, "Tissue Images"), (tif.with_suffix(".xml"), "Annotations")):
            link = target / "MoNuSeg 2018 Training Data" / sub / src.name
            if not link.exists():
                link.symlink_to(src)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "learn_check")
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="training time limit; the run stops there even before the config's last step")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--synthetic", type=int, default=200, help="synthetic training images")
    parser.add_argument("--monuseg", type=float, default=0.0,
                        help="sampling weight of the two MoNuSeg H&E images in ../shared/data (0: left out); "
                             "taken from the DSB weight")
    parser.add_argument("overrides", nargs="*", help="extra training overrides, section.field=value")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    dsb = SHARED / "dsb2018"
    if not (dsb / "manifest.csv").is_file() or not (SHARED / "cellpose_cyto").is_dir():
        sys.exit(f"the real samples are needed: {SHARED} (set CPSAM_SHARED_DATA)")

    # 1. Shards: DSB training part, Cellpose cyto, synthetic; weights favour nuclei.
    start = time.time()
    train_ids, held_ids = split_dsb(dsb)
    dsb_train = link_tree(train_ids, dsb / "stage1_train", out / "sources" / "dsb_train")
    synthetic = out / "sources" / "synthetic"
    synthetic.mkdir(parents=True, exist_ok=True)
    (synthetic / "counts.txt").write_text(f"train {args.synthetic}\ntest 10\n")
    shards = out / "shards"
    config = BuildConfig(workers=args.nproc)
    sources = [("instance_pngs", dsb_train), ("cyto2", SHARED / "cellpose_cyto"), ("synthetic", synthetic)]
    weights = dict(WEIGHTS)
    if args.monuseg > 0:
        sources.append(("monuseg", monuseg_as_training(SHARED / "monuseg" / "MoNuSegTestData", out / "sources" / "monuseg")))
        weights = weights | {"instance_pngs": round(weights["instance_pngs"] - args.monuseg, 4), "monuseg": args.monuseg}
    for name, src in sources:
        build_dataset(name, src, shards, config=config, finalize_root=False)
    weights_file = out / "weights_override.yaml"
    weights_file.write_text("".join(f"{k}: {v}\n" for k, v in weights.items()))
    finalize(shards, weights_file)
    print(f"shards: {len(train_ids)} DSB + 20 cyto + {args.synthetic} synthetic images ({time.time() - start:.0f} s)")

    # 2. Train: configs/learn-check.yaml's steps, stopped early at --minutes (validation on the
    #    synthetic test split for the curve).
    run_dir = out / "run"
    train_minutes = train(shards, run_dir, args.minutes, args.nproc, args.overrides, out / "train.log",
                          config="learn-check.yaml")

    # 3. The held-out DSB images as shards of their own, the table from them (estimated diameter,
    #    and at the images' own scale), then the masks and outlines of the figure as files.
    held_root = out / "held_out_shards"
    dsb_held = link_tree(held_ids, dsb / "stage1_train", out / "sources" / "dsb_held_out")
    build_dataset("instance_pngs", dsb_held, held_root, config=config)
    checkpoint = run_dir / "model_cellpose.pt"
    table, rows = benchmark(held_root, checkpoint, out / "benchmark", (*HELD_OUT_SPLIT, *INFER_OPTIONS))
    native_table, native = benchmark(held_root, checkpoint, out / "native_scale", (*HELD_OUT_SPLIT, "--diameter", "none"))
    infer(export_images(held_root, "all", out / "held_out" / "images", name="source"), checkpoint, out, INFER_OPTIONS)

    # 4. Report: numbers, the loss curve as CSV, and a figure.
    mean = table["overall"]
    curve = curves(run_dir)
    train_curve = curve.get("train loss", [])
    with (out / "loss_curve.csv").open("w") as f:
        f.write("step,loss\n" + "".join(f"{s},{v:.5f}\n" for s, v in train_curve))
    result = {
        "held_out_images": len(held_ids), "train_dsb_images": len(train_ids), "train_minutes": round(train_minutes, 1),
        "steps": train_curve[-1][0] if train_curve else 0, "ap50": mean["ap50"],
        "ap75": mean["ap75"], "ap90": mean["ap90"], "error_rate": mean["error50"],
        "ap50_by_group": ap_by_group(rows, appearance_groups(dsb)), "goal_ap50": 0.6,
        "inference": " ".join(INFER_OPTIONS), "diameters": diameters(rows),
        "ap50_native_scale": native_table["overall"]["ap50"],
        "ap50_by_group_native_scale": ap_by_group(native, appearance_groups(dsb)),
        "loss_first": train_curve[0][1] if train_curve else None,
        "loss_last": float(np.mean([v for _, v in train_curve[-5:]])) if train_curve else None,
        "validation_loss": curve.get("validation loss", []), "overrides": args.overrides,
    }
    (out / "learn_check.json").write_text(json.dumps(result, indent=1))
    scored = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -int(r["n_true"]))[:4]
    panels = [(f"{int(r['n_true'])} nuclei: AP@0.5 {float(r['ap@0.5']):.2f}",
               read_image(out / "predictions" / f"{r['source']}_outlines.png")[..., :3])
              for r in scored]
    title = (f"learning check: tiny CP-SAM, {train_minutes:.0f} min on {args.nproc} CPU processes; "
             f"{len(held_ids)} held-out DSB images, AP@0.5 {result['ap50']:.2f} (goal 0.6)")
    Image.fromarray(render_figure(panels, curve, title)).save(out / "learn_check.png")
    print((out / "benchmark" / "benchmark.md").read_text())
    print("loss curve (step: loss):", ", ".join(f"{s}: {v:.2f}" for s, v in train_curve[:: max(1, len(train_curve) // 12)]))
    print(json.dumps({k: v for k, v in result.items() if k != "validation_loss"}))
    print(f"figure: {out / 'learn_check.png'}")
    return 0 if (result["ap50"] or 0.0) >= 0.6 else 1  # None: no image had an object


if __name__ == "__main__":
    sys.exit(main())
