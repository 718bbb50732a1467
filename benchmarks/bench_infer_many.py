"""Many small images: tiles pooled across images (``infer.predict.predict_many``, the default
on a GPU) against one image at a time (``predict`` in a loop; what Cellpose 4's ``eval(list)``
does, and ``predict_many`` on a CPU).

    python -m benchmarks.bench_infer_many [--checkpoint FILE | --encoder vit_l] [--limit 24] [--repeats 3] [--device cpu]

Images: the DSB2018 images in ../shared/data (real nuclei, 256 x 256 to 1024 x 1024, mostly one
or two tiles each), the ``--limit`` smallest; synthetic nuclei of the same sizes where that
folder is absent (on a lent GPU). Model: ``--checkpoint``, a trained
export such as the learning check's ``run/model_cellpose.pt`` (then the mask step does the work
a trained model gives it), or by default a ViT-L with random seeded weights in Cellpose's cpsam
layout (then Cellpose 4 is timed too, ``CellposeModel.eval(list)``, when it is installed).

Variants, alternated so that machine load hits them alike, same model, same settings:

* ``alone``: ``predict`` on each image in turn (each image's tiles in their own batches; what
  ``predict_many`` does by default on a CPU);
* ``pooled``: ``predict_many(..., pool=True, overlap=False)``: tiles of consecutive images share
  batches, the masks follow in the same thread;
* ``pooled_overlap``: ``predict_many(..., pool=True, overlap=True)``: also the masks of one image
  in a worker thread while the network runs on the next (the default on a GPU);
* ``cellpose``: ``CellposeModel.eval(images)`` (random ViT-L only).

Reports the median seconds for the whole set per variant, network calls per variant, the ratio
of each to ``alone``, and that the masks agree with ``alone``'s. One JSON line; nothing asserted.
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
from infer.predict import PredictConfig, load_model, predict, predict_many
from pipeline.io import read_image
from pipeline.model import CPSAM, ModelConfig
from pipeline.weights import to_cellpose
from pipeline.synthetic import generate


def dsb_images(limit: int, root: Path = SHARED_DATA) -> tuple[str, list[np.ndarray]]:
    """Where the images come from, and the ``limit`` smallest DSB2018 images (ties by name) as
    ``read_image`` gives them. Without ../shared/data (it does not travel to a lent GPU):
    synthetic fluorescent nuclei of the smallest DSB images' sizes, 256 x 256 and 256 x 320."""
    files = sorted((root / "dsb2018" / "stage1_train").glob("*/images/*.png"))
    if not files:
        shapes = [(256, 256), (256, 320)]
        return "synthetic nuclei", [generate("nuclei", shapes[i % 2], seed=i)[0] for i in range(limit)]
    images = {f.stem: read_image(f) for f in files}
    names = sorted(images, key=lambda n: (images[n].shape[0] * images[n].shape[1], n))[:limit]
    return "dsb2018", [images[n] for n in names]


class CallCounter:
    """Counts the model's forward calls (a forward pre-hook)."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.calls += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a trained export; default: random weights of --encoder")
    parser.add_argument("--encoder", default="vit_l", choices=["vit_l", "vit_b", "tiny"],
                        help="the random model's variant (Cellpose is timed with vit_l only)")
    parser.add_argument("--limit", type=int, default=24, help="images (the smallest DSB ones)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (median)")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per network call")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.getLogger("cellpose").setLevel(logging.WARNING)
    device = torch.device(args.device)
    source, images = dsb_images(args.limit)
    cfg = PredictConfig(batch_size=args.batch_size)

    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint
        if path is None:
            path = Path(tmp) / "cpsam_bench"  # a name without "dino": Cellpose reads it as SAM
            torch.manual_seed(0)
            # The cpsam layout without a json: load_model reads the variant from the shapes.
            torch.save(to_cellpose(CPSAM(ModelConfig(encoder=args.encoder))), path)
        if args.checkpoint is None and args.encoder == "vit_l":
            try:
                from cellpose import models  # the reference (the `reference` extra)

                reference = models.CellposeModel(device=device, pretrained_model=str(path))
            except ImportError:
                pass
        model = load_model(path, device=device)
    counter = CallCounter(model)

    variants = {
        "alone": lambda: [predict(model, image, cfg) for image in images],
        "pooled": lambda: list(predict_many(model, images, cfg, pool=True, overlap=False)),
        "pooled_overlap": lambda: list(predict_many(model, images, cfg, pool=True, overlap=True)),
    }
    if reference is not None:
        variants["cellpose"] = lambda: reference.eval(images, batch_size=args.batch_size, channel_axis=2)[0]
    calls: dict[str, int] = {}

    def counted(name, fn):
        """fn, recording the network calls of its first (warm-up) run."""
        def run():
            before = counter.calls
            result = fn()
            calls.setdefault(name, counter.calls - before)
            return result
        return run

    variants = {name: counted(name, fn) for name, fn in variants.items()}
    outputs, times = alternate(variants, args.repeats, device)

    median = {name: statistics.median(t) for name, t in times.items()}
    alone_masks = [p.masks for p in outputs["alone"]]
    record = {
        "name": "infer_many", "source": source, "images": len(images), "pixels": int(sum(i.shape[0] * i.shape[1] for i in images)),
        "sizes": sorted({f"{i.shape[0]}x{i.shape[1]}" for i in images}), "batch_size": args.batch_size,
        "repeats": args.repeats, "checkpoint": str(args.checkpoint) if args.checkpoint else f"random {args.encoder}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **{f"seconds_{name}": round(m, 3) for name, m in median.items()},
        **{f"runs_{name}": [round(t, 3) for t in times[name]] for name in variants},
        **{f"ratio_{name}": round(median["alone"] / m, 3) for name, m in median.items() if name != "alone"},
        "network_calls": {name: calls[name] for name in ("alone", "pooled", "pooled_overlap")},
        "masks_found_alone": int(sum(int(m.max()) for m in alone_masks)),
        "masks_equal_pooled": all(
            np.array_equal(a, p.masks) for a, p in zip(alone_masks, outputs["pooled"])
        ),
        "masks_equal_pooled_overlap": all(
            np.array_equal(a, p.masks) for a, p in zip(alone_masks, outputs["pooled_overlap"])
        ),
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
