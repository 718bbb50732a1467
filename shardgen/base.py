"""The contract every converter in ``shardgen/datasets/`` follows.

A converter is a module with three names:

``INFO: DatasetInfo``
    What the dataset is, what its channels hold, which splits it publishes, and its layout in
    one line (``--list`` prints it; layout errors quote it).

``find_items(root: Path, split: str) -> list[Item]``
    Cheap listing of everything in ``root`` (the dataset folder as downloaded and unpacked) that
    belongs to ``split``, in a deterministic order. One item per image the sample will come
    from (a file, a frame of a stack, or a row of an array file). Nothing is dropped here: an
    image without its label file, or a label file without its image, is still an item, and
    ``load`` raises for it so it lands in ``rejects.parquet`` with the reason. Raises
    :class:`LayoutError` when ``root`` does not look like the dataset at all.

``load(root: Path, item: Item) -> Loaded``
    Read one item in a worker process: the image in the project's channel order and its
    instance labels. Raises :class:`ItemError` (or any exception) to reject the item; the
    message becomes the reject reason, so say what is wrong with which file. Never reads a whole
    multi-image array into memory: memory-map ``.npy`` files and read one slice.

The shared writer (``shardgen.build``) does the rest: checks, renumbering, flows, encoding.

Project channel convention (also in the README): fluorescence puts the main stain (cytoplasm,
membrane, or the only channel) in channel 0 and the nuclear stain in channel 1; colour
brightfield (H&E, IHC, blood smears) stays RGB; grayscale is (H, W, 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Modalities a converter may declare (the manifest's ``modality`` column).
MODALITIES = ("fluorescence", "phase", "brightfield", "he", "ihc", "mixed")


class LayoutError(FileNotFoundError):
    """The folder given as a dataset's source does not have the dataset's published layout."""


class ItemError(ValueError):
    """One source item cannot become a sample; the message is the reject reason."""


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    name: str
    """Converter name: ``--dataset`` value, folder name under ``make shards DATA_ROOT``."""
    title: str
    """Human name and citation, e.g. "Cellpose cyto2 (Stringer et al. 2021)"."""
    modality: str
    """Default modality of the images (items may override it in :class:`Loaded`)."""
    channel_names: tuple[str, ...]
    """What each channel of a loaded image holds, in the project's channel order."""
    splits: tuple[str, ...]
    """Splits as published, e.g. ("train", "test"); ("all",) when there is no official split."""
    layout: str
    """The expected folder layout in one line, quoted in errors and by ``--list``."""
    paper_images: int | None = None
    """Images the paper reports for this dataset (for the default sampling weights)."""

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"{self.name}: modality must be one of {MODALITIES}; got {self.modality!r}")
        if not 1 <= len(self.channel_names) <= 3:
            raise ValueError(f"{self.name}: 1 to 3 channel names; got {self.channel_names}")


@dataclass(frozen=True, kw_only=True)
class Item:
    """One future sample: where it comes from and how the converter finds it again."""

    source: str
    """The item relative to the dataset folder: ``train/001_img.png`` or ``X.npz[17]``."""
    split: str
    subset: str = ""
    """A part of the dataset that can carry its own sampling weight ("" for none)."""
    ref: tuple = field(default_factory=tuple)
    """Converter-specific, picklable: relative paths, indices. Only ``load`` reads it."""


@dataclass(kw_only=True)
class Loaded:
    """What ``load`` returns for one item."""

    image: np.ndarray
    """(H, W, C) uint8 or uint16, C in 1..3, channels in the project's order."""
    labels: np.ndarray
    """(H, W) integer instance labels, 0 = background; ids need not be consecutive."""
    ignore: np.ndarray | None = None
    """(H, W) bool "don't care" mask, or None."""
    modality: str | None = None
    """Overrides ``INFO.modality`` for this item (e.g. LyNSeC: IHC or H&E by folder)."""
    channel_names: tuple[str, ...] | None = None
    """Overrides ``INFO.channel_names`` for this item."""
