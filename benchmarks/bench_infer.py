"""Whole-image inference, ``infer.predict``, against Cellpose 4's ``CellposeModel.eval``.

    python -m benchmarks.bench_infer [--size 512] [--repeats 3] [--batch-size 8] [--device cpu]

One ViT-L checkpoint (random weights, seeded: no trained weights can be downloaded here) is
written in Cellpose's cpsam layout and loaded by both. A real Cellpose "cyto" image from
../shared/data (a synthetic one where that folder is absent, as on a lent GPU), cropped (or
tiled) to ``--size`` x ``--size``, is segmented with each one's
default settings (normalisation, 256 x 256 tiles overlapping by 10%, the network, blending,
following the flows, flow-error QC), alternating the variants so that machine load hits them
alike:

* ``cellpose``: ``CellposeModel(pretrained_model=file).eval(image)``, the reference, in its
  default bfloat16 (``use_bfloat16=True``, on every device);
* ``ours``: ``infer.predict.predict`` on ``load_model(file)``, in its default dtype
  (``infer.predict.default_dtype``: bfloat16 on a GPU and on CPUs with bfloat16 instructions);
* ``ours_fp32``: the same in float32, the default on the CPU before 2026-12-07.

Reports the median seconds per image of each, the ratio cellpose / ours, and how far the
outputs agree (relative difference of the flows, AP@0.5 of our masks against Cellpose's). Random
weights make for random flows, so the share of the time spent following them is not that of a
trained model; the network's share is. One JSON line; nothing is asserted.

GPU: ``python -m benchmarks.bench_infer --device cuda --size 2048`` (needs cellpose installed:
the ``reference`` extra; benchmarks/gpu_check.py runs it when it is).
"""

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import SHARED_DATA, alternate, cpu_description
from infer.predict import PredictConfig, load_model, predict
from pipeline.io import read_image
from pipeline.metrics import average_precision
from pipeline.model import CPSAM, ModelConfig
from pipeline.weights import to_cellpose
from pipeline.synthetic import generate


def test_image(size: int, root: Path = SHARED_DATA) -> tuple[np.ndarray, str]:
    """(size, size, 3) float32 and where it comes from: the first Cellpose cyto training image,
    tiled (reflected) to size; without ../shared/data (it does not travel to a lent GPU) a
    synthetic cyto image in the same layout (G cytoplasm, R nucleus, B = 0). The network's time
    does not depend on the content; with random weights the mask step's hardly does."""
    files = sorted((root / "cellpose_cyto" / "train").glob("*_img.png"))
    if not files:
        image = generate("cyto", (size, size), seed=0)[0].astype(np.float32)
        return np.concatenate([image[..., ::-1], np.zeros_like(image[..., :1])], axis=-1), "synthetic cyto"
    image = read_image(files[0]).astype(np.float32)
    reps = (-(-size // image.shape[0]), -(-size // image.shape[1]), 1)
    return np.tile(image, reps)[:size, :size], files[0].name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (median)")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per network call (both)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from cellpose import models  # the reference (the `reference` extra); imported late: slow

    logging.getLogger("cellpose").setLevel(logging.WARNING)
    device = torch.device(args.device)
    image, source = test_image(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cpsam_bench"  # a name without "dino": Cellpose reads it as a SAM model
        torch.manual_seed(0)
        torch.save(to_cellpose(CPSAM(ModelConfig())), path)
        reference = models.CellposeModel(device=device, pretrained_model=str(path))
        ours = load_model(path, device=device)
        ours_fp32 = load_model(path, device=device, dtype=torch.float32)
    cfg = PredictConfig(batch_size=args.batch_size)

    def run_cellpose():
        masks, flows, _ = reference.eval(image, batch_size=args.batch_size, channel_axis=2)
        return masks, flows[1]

    def run_ours(model):
        prediction = predict(model, image, cfg)
        return prediction.masks, prediction.flows

    variants = {"cellpose": run_cellpose, "ours": lambda: run_ours(ours), "ours_fp32": lambda: run_ours(ours_fp32)}
    outputs, times = alternate(variants, args.repeats, device)

    median = {name: statistics.median(t) for name, t in times.items()}
    (cp_masks, cp_flows), (masks, flows) = outputs["cellpose"], outputs["ours"]
    ap50 = float(average_precision(cp_masks, masks, 0.5)[0][0, 0])
    record = {
        "name": "infer", "size": args.size, "image": source, "batch_size": args.batch_size, "repeats": args.repeats,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "dtype_ours": str(next(ours.parameters()).dtype).removeprefix("torch."),
        **{f"seconds_{name}": round(m, 3) for name, m in median.items()},
        **{f"runs_{name}": [round(t, 3) for t in times[name]] for name in variants},
        "ratio": round(median["cellpose"] / median["ours"], 3),
        "ratio_fp32_over_ours": round(median["ours_fp32"] / median["ours"], 3),
        "flows_relative_difference": float(f"{np.linalg.norm(flows - cp_flows) / np.linalg.norm(cp_flows):.2e}"),
        "masks_cellpose": int(cp_masks.max()), "masks_ours": int(masks.max()),
        # None when neither found a mask (random weights rarely pass the flow-error QC).
        "ap50_ours_vs_cellpose": None if np.isnan(ap50) else round(ap50, 4),
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
