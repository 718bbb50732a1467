"""Speed and agreement of ``pipeline.flows.masks_to_flows`` against Cellpose 4.

    python -m benchmarks.bench_flows [--repeats 5] [--reference-repeats 3] [--sizes 512 2048]

Inputs are real Cellpose "cyto" label images from ../shared/data tiled into a mosaic (512^2 with
~125 objects, 2048^2 with ~2000). After one warm-up call (numba compilation), each version is
timed ``--repeats`` times and the median is reported. Cellpose's ``masks_to_flows_gpu`` on the
CPU is timed in the same run when ``cellpose`` is importable, and the mean cosine between the two
flow fields inside objects is reported. The NumPy reference is timed at 512^2 only (it loops in
Python). One JSON line per case; nothing is asserted.
"""

import argparse
import json

import numba
import numpy as np

from benchmarks.common import CASES, cpu_description, median_seconds, tiled_real_labels
from pipeline.flows import _masks_to_flows_reference, masks_to_flows

def cellpose_flows():
    """Cellpose's flow function on the CPU, or None when cellpose is not installed."""
    try:
        import torch
        from cellpose.dynamics import masks_to_flows_gpu
    except ImportError:
        return None, None
    import cellpose

    def run(labels):
        return masks_to_flows_gpu(labels, device=torch.device("cpu"))[0]

    return run, getattr(cellpose, "version", "unknown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(CASES), choices=sorted(CASES))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of ours (median)")
    parser.add_argument("--reference-repeats", type=int, default=3, help="timed runs of cellpose (median)")
    args = parser.parse_args()

    reference_fn, cellpose_version = cellpose_flows()
    for size in args.sizes:
        labels = tiled_real_labels(size, CASES[size])
        masks_to_flows(labels)  # warm-up: numba compiles (or loads its cache) here
        ours_s, _, ours = median_seconds(lambda: masks_to_flows(labels), args.repeats)
        record = {
            "name": "masks_to_flows",
            "size": [size, size],
            "n_objects": int(len(np.unique(labels)) - 1),
            "device": cpu_description(),
            "numba_threads": numba.get_num_threads(),
            "versions": {"numpy": np.__version__, "numba": numba.__version__, "cellpose": cellpose_version},
            "ours_median_s": round(ours_s, 4),
            "repeats": args.repeats,
        }
        if size <= 512:
            ref_s, _, ref = median_seconds(lambda: _masks_to_flows_reference(labels), 1)
            record["numpy_reference_s"] = round(ref_s, 3)
            record["numpy_reference_equal"] = bool(np.array_equal(ref, ours))
        if reference_fn is not None:
            theirs_s, _, theirs = median_seconds(lambda: reference_fn(labels), args.reference_repeats)
            cosine = (ours.astype(np.float64) * theirs).sum(axis=0)[labels > 0]
            record.update(
                cellpose_median_s=round(theirs_s, 3),
                cellpose_repeats=args.reference_repeats,
                speedup=round(theirs_s / ours_s, 1),
                mean_cosine_inside=round(float(cosine.mean()), 5),
                fraction_cosine_below_0_9=round(float((cosine < 0.9).mean()), 5),
            )
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
