"""Speed and agreement of ``pipeline.dynamics.flows_to_masks`` against Cellpose 4's ``compute_masks``.

    python -m benchmarks.bench_masks [--repeats 5] [--reference-repeats 3] [--sizes 512 2048]
                                     [--noise 0.5] [--flow-threshold 0.4]

Inputs are real Cellpose "cyto" label images from ../shared/data tiled into a mosaic (512^2 with
~125 objects, 2048^2 with ~2000; ``benchmarks/common.py``). Both implementations get the
same ground-truth network outputs: ``dP = 5 * masks_to_flows(labels)`` plus Gaussian noise of sd
``--noise``, and a cellprob logit of +10 inside objects and -10 outside. After one warm-up call
each (numba compilation, torch start-up), ours is timed ``--repeats`` times and Cellpose
``--reference-repeats`` times, and the medians are reported with AP@0.5 between the two outputs
(Cellpose's as the truth). One JSON line per case; nothing is asserted.

Cellpose is called as ``compute_masks(dP, cellprob, niter=200, flow_threshold=..., min_size=15,
device=torch.device("cpu"))``. ``min_size=15`` makes it fill holes and drop small masks as
``flows_to_masks`` does; its default (-1) skips that step, which ``CellposeModel.eval`` then
runs separately.
"""

import argparse
import json
import os
import warnings

import numba
import numpy as np
import torch

from benchmarks.common import CASES, cpu_description, median_seconds, tiled_real_labels
from pipeline.dynamics import flows_to_masks
from pipeline.flows import masks_to_flows
from pipeline.metrics import average_precision

def network_outputs(labels: np.ndarray, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth dP (5 x unit flows, plus noise) and a +-10 cellprob logit, float32."""
    dP = 5 * masks_to_flows(labels)
    if noise:
        dP = dP + np.random.default_rng(0).normal(0, noise, dP.shape).astype(np.float32)
    return dP.astype(np.float32), np.where(labels > 0, 10.0, -10.0).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(CASES), choices=sorted(CASES))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of ours (median)")
    parser.add_argument(
        "--reference-repeats", type=int, default=3,
        help="timed runs of cellpose (median); about 3-4 minutes each at 2048^2 on 2 cores",
    )
    parser.add_argument("--noise", type=float, default=0.5, help="sd of the noise added to dP")
    parser.add_argument("--flow-threshold", type=float, default=0.4, help="0 skips the flow QC")
    args = parser.parse_args()
    import cellpose
    from cellpose import dynamics as cellpose_dynamics

    options = dict(niter=200, flow_threshold=args.flow_threshold, min_size=15)
    cpu = torch.device("cpu")
    # Warm-up on a small case: numba compiles (or loads its cache), torch initialises.
    warm_dP, warm_cellprob = network_outputs(tiled_real_labels(512, CASES[512])[:256, :256], args.noise)
    flows_to_masks(warm_dP, warm_cellprob, **options)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")  # inside compute_masks
    cellpose_dynamics.compute_masks(warm_dP, warm_cellprob, device=cpu, **options)

    for size in args.sizes:
        labels = tiled_real_labels(size, CASES[size])
        dP, cellprob = network_outputs(labels, args.noise)
        load_before = os.getloadavg()[0]
        ours_s, ours_times, ours = median_seconds(
            lambda: flows_to_masks(dP, cellprob, **options), args.repeats
        )
        theirs_s, theirs_times, theirs = median_seconds(
            lambda: cellpose_dynamics.compute_masks(dP, cellprob, device=cpu, **options),
            args.reference_repeats,
        )
        record = {
            "name": "flows_to_masks",
            "size": [size, size],
            "n_objects": int(len(np.unique(labels)) - 1),
            "noise_sigma": args.noise,
            **options,
            "device": cpu_description(),
            "numba_threads": numba.get_num_threads(),
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "versions": {
                "numpy": np.__version__,
                "numba": numba.__version__,
                "torch": torch.__version__,
                "cellpose": getattr(cellpose, "version", "unknown"),
            },
            "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "ours_median_s": round(ours_s, 4),
            "ours_runs_s": [round(t, 4) for t in ours_times],
            "repeats": args.repeats,
            "cellpose_median_s": round(theirs_s, 3),
            "cellpose_runs_s": [round(t, 3) for t in theirs_times],
            "cellpose_repeats": args.reference_repeats,
            "speedup": round(theirs_s / ours_s, 1),
            "ap50_vs_cellpose": round(float(average_precision(theirs, ours, 0.5)[0][0, 0]), 4),
            "identical_to_cellpose": bool(np.array_equal(ours, theirs)),
            "ap50_vs_labels": round(float(average_precision(labels, ours, 0.5)[0][0, 0]), 4),
            "cellpose_ap50_vs_labels": round(float(average_precision(labels, theirs, 0.5)[0][0, 0]), 4),
            "n_masks": [int(ours.max()), int(theirs.max())],
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
