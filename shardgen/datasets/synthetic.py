"""The embedded default: synthetic labelled images from ``pipeline.synthetic``.

Needs no download, so ``make shards`` (and the demo) run on a fresh clone. The "dataset folder"
is optional: if it holds a ``counts.txt`` with lines ``<split> <n>``, those counts replace the
defaults, and a line ``kinds <kind> ...`` keeps only those kinds. Images cycle through the kinds
(by default all five: nuclei, cyto, phase, he, bacteria); train and test draw from different
seeds, so no test image repeats a training one.

Paper-shaped corpus: lines ``like <dataset>`` and ``scale <s>`` make the folder stand for one of
the paper's training datasets (:data:`PAPER_LIKE`): round(s x its image count) training images
(and a tenth as many test images) of that dataset's typical size, channels, dtype, modality
and object diameters. ``python -m shardgen --dataset synthetic --like paper --scale S --out DIR``
writes one group per paper dataset this way, under the real dataset names, so the paper's
weights.yaml applies (shardgen/weights.py); it exists to measure the loader on the paper's mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.synthetic import KINDS, SyntheticConfig, dataset_item
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


@dataclass(frozen=True)
class PaperDataset:
    """What a synthetic stand-in for one of the paper's datasets looks like."""

    subset: str
    """The group's subset ("" or omnipose's bact_phase / bact_fluor), as the real converter names it."""
    images: int
    """Training images in the paper's table (paper.md 1a; Omnipose's 392 split evenly over its two subsets)."""
    shape: tuple[int, int]
    """Typical (H, W) of one converted image."""
    kind: str
    """pipeline.synthetic kind that draws it (its channels and look)."""
    dtype: type
    """Image dtype the real converter writes."""
    channel_names: tuple[str, ...]
    modality: str
    diameters: tuple[float, float]
    """Range of per-image mean object diameters in pixels (an estimate; see PAPER_LIKE)."""


# The paper's datasets as the converters write them. Image counts: paper.md 1a. Sizes, channels and
# dtypes: datasets.md section 1 and section 2 (cyto2 "varied sizes" and NeurIPS22 "any size" are
# taken at 512 and 1000 px; nuclei, Omnipose, YeaZ, DeepBacs, BCCD, CPM, LyNSeC and IHC TMA sizes
# are unconfirmed there and taken as their common 512 px or their usual camera frame). Diameters are
# estimates from the imaging (40x H&E nuclei ~12-25 px, bacteria ~8-20 px, blood cells ~60-100 px).
PAPER_LIKE: dict[str, PaperDataset] = {
    "cyto2": PaperDataset("", 796, (512, 512), "cyto", np.uint8, ("cytoplasm", "nucleus"), "fluorescence", (20, 60)),
    "nuclei": PaperDataset("", 1025, (512, 512), "nuclei", np.uint16, ("nucleus",), "fluorescence", (15, 40)),
    "tissuenet": PaperDataset("", 2601, (512, 512), "cyto", np.uint16, ("membrane/cytoplasm", "nucleus"),
                              "fluorescence", (10, 25)),
    "livecell": PaperDataset("", 3188, (520, 704), "phase", np.uint8, ("phase",), "phase", (15, 40)),
    "omnipose/bact_phase": PaperDataset("bact_phase", 196, (512, 512), "bacteria", np.uint16, ("main",), "phase",
                                        (8, 20)),
    "omnipose/bact_fluor": PaperDataset("bact_fluor", 196, (512, 512), "bacteria", np.uint16, ("main",),
                                        "fluorescence", (8, 20)),
    "yeaz": PaperDataset("", 245, (512, 512), "phase", np.uint8, ("main",), "brightfield", (20, 40)),
    "deepbacs": PaperDataset("", 155, (1024, 1024), "bacteria", np.uint16, ("main",), "brightfield", (10, 25)),
    "neurips22": PaperDataset("", 504, (1000, 1000), "he", np.uint8, ("red", "green", "blue"), "mixed", (15, 60)),
    "monuseg": PaperDataset("", 37, (1000, 1000), "he", np.uint8, ("red", "green", "blue"), "he", (12, 25)),
    "monusac": PaperDataset("", 209, (512, 512), "he", np.uint8, ("red", "green", "blue"), "he", (12, 25)),
    "cryonuseg": PaperDataset("", 30, (512, 512), "he", np.uint8, ("red", "green", "blue"), "he", (12, 25)),
    "nuinsseg": PaperDataset("", 665, (512, 512), "he", np.uint8, ("red", "green", "blue"), "he", (12, 25)),
    "bccd": PaperDataset("", 1169, (480, 640), "he", np.uint8, ("red", "green", "blue"), "brightfield", (60, 100)),
    "cpm": PaperDataset("", 47, (500, 500), "he", np.uint8, ("red", "green", "blue"), "he", (12, 25)),
    "tnbc": PaperDataset("", 50, (512, 512), "he", np.uint8, ("red", "green", "blue"), "he", (12, 25)),
    "lynsec": PaperDataset("", 616, (512, 512), "he", np.uint8, ("red", "green", "blue"), "he", (12, 25)),
    "ihc_tma": PaperDataset("", 231, (512, 512), "he", np.uint8, ("red", "green", "blue"), "ihc", (12, 25)),
    "conic": PaperDataset("", 3863, (256, 256), "he", np.uint8, ("red", "green", "blue"), "he", (8, 20)),
    "pannuke": PaperDataset("", 6053, (256, 256), "he", np.uint8, ("red", "green", "blue"), "he", (10, 25)),
}


def paper_like_folders(scale: float) -> dict[str, str]:
    """counts.txt contents, per paper dataset name (without subset), that make the synthetic
    converter stand for it at ``scale``; the subsets of one dataset share a folder."""
    if not (isinstance(scale, (int, float)) and 0 < scale <= 100):
        raise ValueError(f"scale must be a number in (0, 100]; got {scale!r}")
    return {name: f"like {name}\nscale {scale}\n" for name in dict.fromkeys(g.split("/")[0] for g in PAPER_LIKE)}


def _like_items(name: str, scale: float, split: str) -> list[Item]:
    items = []
    for position, (group, spec) in enumerate(PAPER_LIKE.items()):
        if group.split("/")[0] != name:
            continue
        train = max(1, round(spec.images * scale))
        count = train if split == "train" else max(1, round(train / 10))
        items += [Item(source=f"{split}/{group.replace('/', '_')}_{index:05d}", split=split, subset=spec.subset,
                       ref=(index, group, position)) for index in range(count)]
    return items


def _load_like(item: Item) -> Loaded:
    index, group, position = item.ref
    spec = PAPER_LIKE[group]
    config = SyntheticConfig(diameter_range=spec.diameters)
    seed = 1000 * position + SEEDS[item.split]
    image, labels, _ = dataset_item(index, (spec.kind,), spec.shape, seed=seed, config=config)
    if image.dtype != spec.dtype:
        if spec.dtype == np.uint8:  # a camera's counts as an 8-bit export: its 99.9th percentile at 255
            top = max(float(np.percentile(image, 99.9)), 1.0)
            image = np.clip(image.astype(np.float32) * (255.0 / top), 0, 255).astype(np.uint8)
        else:
            image = image.astype(np.uint16) * 257
    image = image[..., : len(spec.channel_names)]
    return Loaded(image=image, labels=labels, modality=spec.modality, channel_names=spec.channel_names)


def _settings(root: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """Image counts per split and the kinds, from ``root/counts.txt`` where it exists."""
    counts, kinds = dict(COUNTS), KINDS
    path = root / "counts.txt"
    if path.is_file():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if parts[0] in ("like", "scale"):
                continue  # read by _like
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


def _like(root: Path) -> tuple[str, float] | None:
    """(paper dataset, scale) from ``like`` and ``scale`` lines of root/counts.txt, or None."""
    path = root / "counts.txt"
    if not path.is_file():
        return None
    found = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if parts and parts[0] in ("like", "scale"):
            names = {g.split("/")[0] for g in PAPER_LIKE}
            if len(parts) != 2 or (parts[0] == "like" and parts[1] not in names):
                raise LayoutError(f"{path}:{number}: expected 'like <dataset>' with a dataset from {sorted(names)} "
                                  f"or 'scale <number>'; got {line!r}")
            found[parts[0]] = parts[1]
    if not found:
        return None
    try:
        scale = float(found.get("scale", "1"))
    except ValueError:
        raise LayoutError(f"{path}: scale must be a number; got {found['scale']!r}") from None
    if "like" not in found or not 0 < scale <= 100:
        raise LayoutError(f"{path}: 'scale' needs a 'like <dataset>' line and a value in (0, 100]")
    return found["like"], scale


def find_items(root: Path, split: str) -> list[Item]:
    like = _like(root)
    if like is not None:
        return _like_items(*like, split)
    counts, kinds = _settings(root)
    return [
        Item(source=f"{split}/{index:05d}_{kinds[index % len(kinds)]}", split=split, subset="", ref=(index, kinds))
        for index in range(counts.get(split, 0))
    ]


def load(root: Path, item: Item) -> Loaded:
    if len(item.ref) == 3:
        return _load_like(item)
    index, kinds = item.ref
    image, labels, meta = dataset_item(index, kinds, SHAPE, seed=SEEDS[item.split])
    modality, channel_names = _KIND_INFO[meta["kind"]]
    return Loaded(image=image, labels=labels, modality=modality or meta["modality"], channel_names=channel_names)
