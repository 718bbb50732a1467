"""Shard generation cost per image and per worker, shard decoding speed, and the paper's whole
training set extrapolated from both.

    python -m benchmarks.bench_shardgen [--repeats 3] [--cores 16]

1. Generation: every item of each dataset we hold real samples of (../shared/data: Cellpose
   cyto, NeurIPS 2022, MoNuSeg, DSB2018 as ``instance_pngs``) and of the synthetic kinds goes
   through ``shardgen.build.make_sample`` (read, check, renumber, flows, encode) in this process
   with one numba thread, which is what one worker does. Reported per dataset: images/s per
   worker and seconds per megapixel.
2. Decoding: shards of the 512x512 Cellpose images are read back with plain webdataset and
   ``pipeline.shards.decode_sample`` in one process: samples/s per core (goal >= 50).
3. Extrapolation: the paper's image count per dataset times a typical image size (documented
   below; several are assumptions) times the measured seconds per megapixel of the closest real
   layout, divided by ``--cores`` workers: minutes to shard ~22,800 images (goal < 30 on 16).

One JSON line per measurement; nothing is asserted.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import webdataset as wds
from PIL import Image

from benchmarks.common import SHARED_DATA, cpu_description
from pipeline.shards import decode_sample
from shardgen.build import BuildConfig, build_dataset, make_sample
from shardgen.datasets import get_converter

# (converter, folder under ../shared/data) for the real samples we hold.
REAL = [("cyto2", "cellpose_cyto"), ("neurips22", "neurips22"), ("monuseg", "monuseg"), ("instance_pngs", "dsb2018/stage1_train")]

# The paper's image counts (paper.md 1a) and a typical image size in megapixels per dataset, with
# the real layout whose measured cost per megapixel stands in for it. Sizes marked "assumed" are
# not documented in datasets.md.
PAPER = {
    # dataset: (images, megapixels per image, cost taken from)
    "cyto2": (796, 0.25, "cyto2"),  # ~512x512, varied
    "nuclei": (1025, 0.25, "instance_pngs"),  # assumed ~512x512
    "tissuenet": (2601, 0.262, "cyto2"),  # 512x512 train images, whole cells
    "livecell": (3188, 0.366, "cyto2"),  # 704x520
    "omnipose": (392, 0.25, "instance_pngs"),  # assumed
    "yeaz": (245, 0.25, "cyto2"),  # assumed
    "deepbacs": (155, 0.25, "instance_pngs"),  # assumed
    "neurips22": (504, 1.0, "neurips22"),  # variable; 1 MP assumed on average
    "monuseg": (37, 1.0, "monuseg"),  # 1000x1000
    "monusac": (209, 0.5, "monuseg"),  # variable; assumed
    "cryonuseg": (30, 0.262, "monuseg"),  # 512x512
    "nuinsseg": (665, 0.262, "monuseg"),  # 512x512
    "bccd": (1169, 0.307, "cyto2"),  # assumed 640x480, large blood cells
    "cpm": (47, 0.25, "monuseg"),  # assumed
    "tnbc": (50, 0.262, "monuseg"),  # 512x512
    "lynsec": (616, 0.262, "monuseg"),  # assumed 512x512
    "ihc_tma": (231, 0.262, "monuseg"),  # assumed 512x512
    "conic": (3863, 0.0655, "monuseg"),  # 256x256
    "pannuke": (6053, 0.0655, "monuseg"),  # 256x256
}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def generation(name: str, root: Path, repeats: int) -> dict:
    """Median seconds per image of make_sample over every item of every split, and MP/s."""
    converter = get_converter(name)
    items = [item for split in converter.INFO.splits for item in converter.find_items(root, split)]
    make_sample(name, str(root), items[0], "warmup")  # numba compiles or loads its cache
    per_image, megapixels, rejected = [], 0.0, 0
    for index, item in enumerate(items):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = make_sample(name, str(root), item, f"k{index}")
            times.append(time.perf_counter() - start)
        if not hasattr(result, "row"):
            rejected += 1
            continue
        per_image.append(statistics.median(times))
        megapixels += result.row["height"] * result.row["width"] / 1e6
    total = sum(per_image)
    return dict(
        name="shardgen_generation", dataset=name, images=len(per_image), rejected=rejected,
        median_s_per_image=round(statistics.median(per_image), 4),
        images_per_s_per_worker=round(len(per_image) / total, 2),
        s_per_megapixel=round(total / megapixels, 4), megapixels=round(megapixels, 2),
    )


def decoding(tmp: Path, repeats: int) -> dict:
    """Samples/s of one process reading 512x512 Cellpose samples back from real shards."""
    src = tmp / "cyto512"
    (src / "train").mkdir(parents=True)
    for image in sorted((SHARED_DATA / "cellpose_cyto" / "train").glob("*_img.png")):
        mask = image.with_name(image.name.replace("_img", "_masks"))
        if Image.open(image).size == (512, 512):
            (src / "train" / image.name).symlink_to(image)
            (src / "train" / mask.name).symlink_to(mask)
    out = tmp / "shards"
    build_dataset("cyto2", src, out, config=BuildConfig(workers=0))
    urls = sorted(str(p) for p in (out / "cyto2").glob("*.tar"))
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = 0
        for _ in range(10):  # ten passes over the shards per timed run
            n += sum(1 for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False) if decode_sample(raw))
        rates.append(n / (time.perf_counter() - start))
    return dict(name="shardgen_decoding", samples=n, size=[512, 512],
                samples_per_s_per_core=round(statistics.median(rates), 1), repeats=repeats, goal=50)


def extrapolate(costs: dict[str, float], cores: int) -> dict:
    seconds = {d: n * mp * costs[src] for d, (n, mp, src) in PAPER.items()}
    images = sum(n for n, _, _ in PAPER.values())
    return dict(
        name="shardgen_paper_extrapolation", images=images, cores=cores,
        cpu_minutes=round(sum(seconds.values()) / 60, 1),
        wall_minutes=round(sum(seconds.values()) / cores / 60, 1), goal_minutes=30,
        per_dataset_cpu_minutes={d: round(s / 60, 2) for d, s in seconds.items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per image (median)")
    parser.add_argument("--cores", type=int, default=16, help="workers for the extrapolation")
    args = parser.parse_args()
    numba.set_num_threads(1)  # one worker's view
    emit(dict(name="machine", device=cpu_description(), numba_threads=1, numpy=np.__version__, numba=numba.__version__))

    costs = {}
    for name, folder in REAL:
        record = generation(name, SHARED_DATA / folder, args.repeats)
        costs[name] = record["s_per_megapixel"]
        emit(record)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "counts.txt").write_text("train 50\ntest 0\n")
        emit(generation("synthetic", Path(tmp), args.repeats))
        emit(decoding(Path(tmp), args.repeats))
    emit(extrapolate(costs, args.cores))


if __name__ == "__main__":
    main()
