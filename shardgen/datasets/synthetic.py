"""The embedded default: synthetic labelled images from ``pipeline.synthetic``.

Needs no download, so ``make shards`` (and the demo) run on a fresh clone. The "dataset folder"
is optional: if it holds a ``counts.txt`` with lines ``<split> <n>``, those counts replace the
defaults. Images cycle through the five kinds (nuclei, cyto, phase, he, bacteria); train and test
draw from different seeds, so no test image repeats a training one.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.synthetic import KINDS, dataset_item
from shardgen.base import DatasetInfo, Item, LayoutError, Loaded

INFO = DatasetInfo(
    name="synthetic",
    title="Synthetic nuclei, cytoplasm, phase contrast, H&E and bacteria (pipeline.synthetic)",
    modality="mixed",
    channel_names=("main",),
    splits=("train", "test"),
    layout="no files needed; optional counts.txt with lines '<split> <n>'",
)

COUNTS = {"train": 120, "test": 30}
SHAPE = (256, 256)
SEEDS = {"train": 0, "test": 1}
# What each kind's channels hold, in the project's convention, and its modality.
_KIND_INFO = {
    "nuclei": ("fluorescence", ("nucleus",)),
    "cyto": ("fluorescence", ("cytoplasm", "nucleus")),
    "phase": ("phase", ("phase",)),
    "he": ("he", ("red", "green", "blue")),
    "bacteria": (None, ("bacteria",)),  # phase or fluorescence, drawn per image
}


def _counts(root: Path) -> dict[str, int]:
    counts = dict(COUNTS)
    path = root / "counts.txt"
    if path.is_file():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or parts[0] not in COUNTS or not parts[1].isdigit():
                raise LayoutError(f"{path}:{number}: expected '<split> <n>' with split in {tuple(COUNTS)}; got {line!r}")
            counts[parts[0]] = int(parts[1])
    return counts


def find_items(root: Path, split: str) -> list[Item]:
    n = _counts(root).get(split, 0)
    return [
        Item(source=f"{split}/{index:05d}_{KINDS[index % len(KINDS)]}", split=split, subset="", ref=(index,))
        for index in range(n)
    ]


def load(root: Path, item: Item) -> Loaded:
    (index,) = item.ref
    image, labels, meta = dataset_item(index, KINDS, SHAPE, seed=SEEDS[item.split])
    modality, channel_names = _KIND_INFO[meta["kind"]]
    return Loaded(image=image, labels=labels, modality=modality or meta["modality"], channel_names=channel_names)
