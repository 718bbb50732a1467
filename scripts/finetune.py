"""Fine-tune a model on your own annotated images: ``make finetune DATA=DIR INIT=CKPT [OUT=DIR]``.

    python scripts/finetune.py --data DIR --init CKPT [--out finetune_out] [--nproc 1]
                               [--minutes M] [--diameter auto] [--config configs/finetune.yaml]
                               [section.field=value ...]

``--data`` is a Cellpose user's training folder (``shardgen.datasets.cellpose_folder``):
``<name>_img.<ext>`` + ``<name>_masks.<ext>``, ``<name>.<ext>`` + ``<name>_masks.<ext>``, the
GUI's ``<name>_seg.npy`` beside ``<name>.<ext>`` (its masks are your corrections), or
``images/`` + ``masks/``; a ``test/`` folder is the held-out set, else 20% of the pairs (chosen
by name) are. ``--init`` is Cellpose's ``cpsam`` file, this project's ``model_cellpose.pt`` or
a training run's folder. The stages run as the README runs them:

1. shardgen: the folder to shards (``<out>/shards``), verified; the held-out images written as
   TIFFs with their labels (``<out>/test``);
2. before: ``python -m infer`` with the starting weights on the held-out images, then
   ``python -m infer.evaluate`` (``<out>/before``);
3. ``torchrun --nproc_per_node=N train/main.py --config configs/finetune.yaml`` from
   ``--init`` (Cellpose 4's fine-tuning recipe; images per epoch min(800, max(8, n_train)));
   the model's shape is taken from the starting weights; extra ``section.field=value``
   arguments override the config;
4. after: the same evaluation with ``<out>/run/model_cellpose.pt`` (``<out>/after``);
5. AP@0.5 and the error rate at IoU 0.5 (mean over held-out images) before and after, printed
   and written to ``<out>/finetune.json`` (``ap50_before``, ``ap50_after``, ``n_train``,
   ``n_test``, ...).

Predictions use ``--diameter auto`` by default (each image brought to the 30 px the trainer
rescales to); ``--diameter N`` fixes it, ``--diameter none`` runs at the images' own scale.
The fine-tuned model opens in Cellpose (``model_cellpose.pt`` is in its cpsam layout), and
``python -m infer ... --save-seg`` writes ``_seg.npy`` files to correct in its GUI and feed back
here.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chain import infer_and_evaluate, train  # noqa: E402
from pipeline.io import write_image, write_labels  # noqa: E402
from pipeline.shards import MANIFEST_FILE, REJECTS_FILE, decode_sample  # noqa: E402
from pipeline.weights import EXPORT_NAME, read_sidecar  # noqa: E402
from shardgen.base import LayoutError  # noqa: E402
from shardgen.build import BuildConfig, build_dataset  # noqa: E402
from shardgen.datasets import cellpose_folder  # noqa: E402
from shardgen.verify import verify  # noqa: E402

DATASET = cellpose_folder.INFO.name
# The paper's few-shot runs: nimg_per_epoch = min(800, max(8, n_train)) (paper.md 1f).
IMAGES_PER_EPOCH = (8, 800)


def check_pairs(data: Path) -> dict[str, int]:
    """Count the usable pairs before any work; exit with what was found when there are none."""
    try:
        items = cellpose_folder.find_items(data, "train") + cellpose_folder.find_items(data, "test")
    except LayoutError as error:
        sys.exit(f"no training pairs: {error}")
    sources = cellpose_folder.label_sources(items)
    if sources["seg"] + sources["masks"] == 0:
        problems = "\n  ".join(item.ref[2] for item in items[:10])
        sys.exit(f"{data}: no usable image/label pairs ({sources['unpaired']} unpaired files):\n  {problems}\n"
                 f"expected {cellpose_folder.INFO.layout}")
    print(f"{data}: {sources['seg']} images labelled by _seg.npy (GUI), {sources['masks']} by mask files, "
          f"{sources['unpaired']} unpaired (they will be listed as rejected)")
    return sources


def make_shards(data: Path, out: Path, workers: int) -> dict[str, int]:
    """Stage 1: shards and their verification; the number of samples per split."""
    shards = out / "shards"
    summary = build_dataset(DATASET, data, shards, config=BuildConfig(workers=workers))
    problems = verify(shards)
    if problems:
        sys.exit("shard verification failed:\n" + "\n".join(problems))
    splits = pq.read_table(shards / MANIFEST_FILE, columns=["split"]).column("split").to_pylist()
    counts = {split: splits.count(split) for split in ("train", "test")}
    rejects = pq.read_table(shards / REJECTS_FILE).to_pylist()
    for reject in rejects:
        print(f"  rejected {reject['source']}: {reject['reason']}")
    print(f"shards: {counts['train']} training and {counts['test']} held-out images ({summary['cells']} cells), "
          f"{len(rejects)} rejected -> {shards}")
    if not counts["train"] or not counts["test"]:
        sys.exit(f"{data}: need at least one training and one held-out image; got {counts} "
                 f"(add images, or put the held-out ones in test/)")
    return counts


def write_test_split(shards: Path, out: Path) -> None:
    """The held-out samples as image and label TIFFs, exactly as training sees them."""
    images, labels = out / "test" / "images", out / "test" / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    urls = sorted(str(p) for p in (shards / DATASET).glob(f"{DATASET}-test-*.tar"))
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        image, truth, _, meta, _ = decode_sample(raw)
        write_image(images / f"{meta.key}.tif", image)
        write_labels(labels / f"{meta.key}_masks.tif", truth)


def evaluate(weights: Path | None, out: Path, stage: str, diameter: str) -> dict | None:
    """Mean AP@0.5 and error rate@0.5 of ``weights`` on the held-out images (None: no weights)."""
    if weights is None:
        print(f"{stage}: no weights file to evaluate (--init is a run folder without {EXPORT_NAME})")
        return None
    options = () if diameter == "none" else ("--diameter", diameter)
    rows = infer_and_evaluate(out / "test" / "images", out / "test" / "labels", weights, out / stage, options)
    scored = [row for row in rows if row["pred"] != "mean" and row["status"] == "ok"]
    result = {key: float(np.mean([float(row[column]) for row in scored]))
              for key, column in (("ap50", "ap@0.5"), ("error_rate", "error_rate@0.5"))}
    print(f"{stage}: AP@0.5 {result['ap50']:.3f}, error rate {result['error_rate']:.3f} on {len(scored)} images")
    return result


def start_weights(init: Path) -> tuple[Path | None, list[str]]:
    """The weights file to evaluate before training, and the model-shape overrides ``init`` needs."""
    weights = init / EXPORT_NAME if init.is_dir() else init
    if not weights.is_file():
        return None, []
    sidecar = read_sidecar(weights)
    if sidecar is None:  # an official cpsam file: ViT-L, the config's default
        return weights, []
    model = sidecar.model
    return weights, [f"model.encoder={model.encoder}", f"model.patch_size={model.patch_size}",
                     f"model.image_size={model.image_size}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="your annotated images (layouts above)")
    parser.add_argument("--init", type=Path, required=True, help="starting weights: cpsam, model_cellpose.pt or a run folder")
    parser.add_argument("--out", type=Path, default=Path("finetune_out"), help="output folder")
    parser.add_argument("--config", default="finetune.yaml", help="training config under configs/")
    parser.add_argument("--nproc", type=int, default=1, help="torchrun processes (GPUs, or CPU ranks)")
    parser.add_argument("--minutes", type=float, default=None, help="training time limit (default: none)")
    parser.add_argument("--diameter", default="auto", help="inference diameter: auto, a number, or none")
    parser.add_argument("--workers", type=int, default=2, help="shardgen worker processes")
    parser.add_argument("overrides", nargs="*", help="training overrides, section.field=value")
    args = parser.parse_args(argv)
    data, init, out = args.data.resolve(), args.init.resolve(), args.out.resolve()
    if not data.is_dir():
        parser.error(f"--data {data}: not a folder")
    if not init.exists():
        parser.error(f"--init {init}: no such file or folder (Cellpose's cpsam, a model_cellpose.pt or a run folder)")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    check_pairs(data)
    counts = make_shards(data, out, args.workers)
    write_test_split(out / "shards", out)
    weights, shape = start_weights(init)
    before = evaluate(weights, out, "before", args.diameter)

    per_epoch = min(IMAGES_PER_EPOCH[1], max(IMAGES_PER_EPOCH[0], counts["train"]))
    overrides = [f"model.init_checkpoint={init}", f"data.samples_per_epoch={per_epoch}", *shape, *args.overrides]
    run_dir = out / "run"
    minutes = train(out / "shards", run_dir, args.minutes, args.nproc, overrides, out / "train.log", config=args.config)
    after = evaluate(run_dir / EXPORT_NAME, out, "after", args.diameter)

    result = {
        "ap50_before": None if before is None else before["ap50"],
        "ap50_after": after["ap50"],
        "error_rate_before": None if before is None else before["error_rate"],
        "error_rate_after": after["error_rate"],
        "n_train": counts["train"],
        "n_test": counts["test"],
        "init": str(init),
        "steps": read_sidecar(run_dir / EXPORT_NAME).step,
        "train_minutes": round(minutes, 2),
        "diameter": args.diameter,
        "model": str(run_dir / EXPORT_NAME),
    }
    (out / "finetune.json").write_text(json.dumps(result, indent=1))
    shown = lambda value: "  n/a" if value is None else f"{value:.3f}"  # noqa: E731
    print(f"\n{'':<12}{'AP@0.5':>8}{'err@0.5':>9}\n{'before':<12}{shown(result['ap50_before']):>8}"
          f"{shown(result['error_rate_before']):>9}\n{'after':<12}{shown(result['ap50_after']):>8}"
          f"{shown(result['error_rate_after']):>9}")
    print(f"\n{counts['train']} training / {counts['test']} held-out images, {result['steps']} steps in "
          f"{minutes:.1f} min; model (Cellpose layout): {run_dir / EXPORT_NAME}\nresults: {out / 'finetune.json'}   "
          f"total {(time.time() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
