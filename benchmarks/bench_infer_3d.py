"""3-D inference, ``infer.predict.predict_volume``, against Cellpose 4's ``eval(do_3D=True)``.

    python -m benchmarks.bench_infer_3d [--shape 8 64 64] [--encoder tiny] [--repeats 3]
                                        [--batch-size 8] [--device cpu]

The same network runs in both: the whole 3-D path around it (normalisation of the volume, the
network on every YX, ZY and ZX plane, tiles batched, flows and cellprob summed, flow following
and mask assembly in 3-D) is what is timed. ``--encoder vit_l`` writes a random ViT-L in
Cellpose's cpsam layout and loads it with ``CellposeModel(pretrained_model=file)`` and
``infer.predict.load_model`` (the real setting: use it on a GPU; on a CPU a ViT-L tile takes
seconds and a 8 x 64 x 64 volume has 136 tiles). ``--encoder tiny`` (the default, for CPUs) puts
the same randomly initialised tiny CP-SAM inside Cellpose's ``CellposeModel`` (its ``eval``
only calls ``net(x)``), so that the pipeline, not the network, dominates. Both in float32 (Cellpose's
``use_bfloat16`` and our ``default_dtype`` would pick different dtypes on this CPU).

The volume: planes of a synthetic nuclei image (``pipeline.synthetic``; the network's time does
not depend on the content). Variants alternate so that machine load hits them alike. Reports the
median seconds of each, the ratio cellpose / ours, how far the summed flows agree, and the mask
counts. One JSON line; nothing is asserted.
"""

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import alternate, cpu_description
from infer.predict import PredictConfig, load_model, predict_volume
from pipeline.metrics import average_precision
from pipeline.model import CPSAM, ModelConfig
from pipeline.weights import build_model, to_cellpose
from pipeline.synthetic import generate


class _AsCellposeNet(torch.nn.Module):
    """Our model as Cellpose's network: ``.device``, ``.dtype``, and an (output, style) pair."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    def forward(self, x):
        # Fewer channels than the model takes are zeros (Cellpose slices the patch embedding).
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, self.model.cfg.in_channels - x.shape[1]))
        return self.model(x), torch.zeros(x.shape[0], 256, device=x.device)


def test_volume(shape: tuple[int, int, int]) -> np.ndarray:
    """(Z, Y, X) float32: planes of synthetic nuclei images (one seed per plane)."""
    depth, height, width = shape
    return np.stack([generate("nuclei", (height, width), seed=z)[0][..., 0] for z in range(depth)]).astype(np.float32)


def _ap50(reference: np.ndarray, masks: np.ndarray) -> float | None:
    ap50 = float(average_precision(reference, masks, 0.5)[0][0, 0])
    return None if np.isnan(ap50) else round(ap50, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(8, 64, 64), metavar=("Z", "Y", "X"))
    parser.add_argument("--encoder", choices=("tiny", "vit_l"), default="tiny")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (median)")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per network call (both)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from cellpose import models  # the reference (the `reference` extra); imported late: slow

    logging.getLogger("cellpose").setLevel(logging.WARNING)
    device = torch.device(args.device)
    volume = test_volume(tuple(args.shape))
    torch.manual_seed(0)
    if args.encoder == "vit_l":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "cpsam_bench"  # no "dino" in the name: Cellpose reads it as SAM
            torch.save(to_cellpose(CPSAM(ModelConfig())), path)
            reference = models.CellposeModel(device=device, pretrained_model=str(path), use_bfloat16=False)
            ours = load_model(path, device=device, dtype=torch.float32)
    else:
        ours = build_model(ModelConfig(encoder="tiny")).to(device).eval()
        reference = models.CellposeModel.__new__(models.CellposeModel)
        reference.net = _AsCellposeNet(ours)
        reference.device, reference.backbone, reference.timing = device, "sam_vitl", False
    cfg = PredictConfig(do_3d=True, batch_size=args.batch_size)

    def run_cellpose():
        masks, flows, _ = reference.eval(volume, do_3D=True, z_axis=0, batch_size=args.batch_size)
        return masks, flows[1]

    def run_ours():
        prediction = predict_volume(ours, volume, cfg)
        return prediction.masks, prediction.flows

    variants = {"cellpose": run_cellpose, "ours": run_ours}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in variants}

    def with_cpu_time(name, fn):
        def timed():
            start = time.process_time()
            result = fn()
            cpu_seconds[name].append(time.process_time() - start)
            return result
        return timed

    outputs, times = alternate({n: with_cpu_time(n, fn) for n, fn in variants.items()}, args.repeats, device)
    median = {name: statistics.median(t) for name, t in times.items()}
    # The first CPU time is the warm-up's (numba compiles there); other engineers' work shares
    # the cores of cpu-2, which inflates wall time but not the process's own CPU time.
    median_cpu = {name: statistics.median(t[1:]) for name, t in cpu_seconds.items()}
    (cp_masks, cp_flows), (masks, flows) = outputs["cellpose"], outputs["ours"]
    depth, height, width = args.shape
    record = {
        "name": "infer_3d", "shape": list(args.shape), "encoder": args.encoder,
        "tiles": depth + height + width, "batch_size": args.batch_size, "repeats": args.repeats,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": "float32",
        **{f"seconds_{name}": round(m, 3) for name, m in median.items()},
        **{f"runs_{name}": [round(t, 3) for t in times[name]] for name in variants},
        "ratio": round(median["cellpose"] / median["ours"], 3),
        **{f"cpu_seconds_{name}": round(m, 3) for name, m in median_cpu.items()},
        "cpu_ratio": round(median_cpu["cellpose"] / median_cpu["ours"], 3),
        "flows_relative_difference": float(f"{np.linalg.norm(flows - cp_flows) / np.linalg.norm(cp_flows):.2e}"),
        "masks_cellpose": int(cp_masks.max()), "masks_ours": int(masks.max()),
        # Random weights give fragmented masks, where 3-D hole filling differs (infer/dynamics.py).
        "ap50_ours_vs_cellpose": _ap50(cp_masks, masks),
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
