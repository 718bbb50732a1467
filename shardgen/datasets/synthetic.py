"""The embedded default: synthetic labelled images from ``pipeline.synthetic``.

Needs no download, so ``make shards`` (and the demo) run on a fresh clone. The "dataset folder"
is optional: if it holds a ``counts.txt`` with lines ``<split> <n>``, those counts replace the
defaults, and a line ``kinds <kind> ...`` keeps only those kinds. Images cycle through the kinds
(by default all five: nuclei, cyto, phase, he, bacteria); train and test draw from different
seeds, so no test image repeats a training one.
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
    layout="no files needed; optional counts.txt with lines '<split> <n>' and 'kinds <kind> ...'",
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


def _settings(root: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """Image counts per split and the kinds, from ``root/counts.txt`` where it exists."""
    counts, kinds = dict(COUNTS), KINDS
    path = root / "counts.txt"
    if path.is_file():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "kinds":
                unknown = [k for k in parts[1:] if k not in KINDS]
                if len(parts) < 2 or unknown:
                    raise LayoutError(f"{path}:{number}: expected 'kinds <kind> ...' with kinds from {KINDS}; got {line!r}")
                kinds = tuple(parts[1:])
            elif len(parts) != 2 or parts[0] not in COUNTS or not parts[1].isdigit():
                raise LayoutError(f"{path}:{number}: expected '<split> <n>' with split in {tuple(COUNTS)}; got {line!r}")
            else:
                counts[parts[0]] = int(parts[1])
    return counts, kinds


def find_items(root: Path, split: str) -> list[Item]:
    counts, kinds = _settings(root)
    return [
        Item(source=f"{split}/{index:05d}_{kinds[index % len(kinds)]}", split=split, subset="", ref=(index, kinds))
        for index in range(counts.get(split, 0))
    ]


def load(root: Path, item: Item) -> Loaded:
    index, kinds = item.ref
    image, labels, meta = dataset_item(index, kinds, SHAPE, seed=SEEDS[item.split])
    modality, channel_names = _KIND_INFO[meta["kind"]]
    return Loaded(image=image, labels=labels, modality=modality or meta["modality"], channel_names=channel_names)
