"""MoNuSAC 2020 (Verma et al. 2021): H&E nuclei of 4 classes, Aperio XML polygons per image.

Layout, as the two challenge zips unpack::

    MoNuSAC_images_and_annotations/<patient>/<patient>_<k>.{svs,tif,xml}          (train)
    MoNuSAC Testing Data and Annotations/<patient>/<patient>_<k>.{svs,tif,xml}    (test)

``<patient>`` is e.g. ``TCGA-55-1594-01Z-00-DX1``. Splits are told apart by the top folder's name:
lower-cased, with ``_`` and ``-`` read as spaces, a name starting with ``monusac testing data
and annotation`` is ``test`` and one starting with ``monusac images and annotation`` is
``train`` (so the challenge page's spelling ``MoNuSAC_images_and_annotation`` also works). Other
top-level folders are not MoNuSAC and are ignored; ``__MACOSX`` and dot files are skipped.

Items: one per ``<patient>_<k>`` stem that has any of the three files, in patient then stem
order. ``load`` rejects a stem without ``.tif`` with "image missing (convert the .svs)" (some
test ``.tif`` were never made; this converter does not read ``.svs``, which needs OpenSlide), and
one without ``.xml`` with "no annotation file".

Tricky bits (datasets.md 2.10):

* Each ``Annotation`` block is one class, named by its ``Attributes/Attribute`` ``Name``
  (Epithelial, Lymphocyte, Macrophage, Neutrophil; the official notebook's output also shows
  "Macrophages" and "Description"). Every region of a block whose name does not contain
  "Ambiguous" is a nucleus, whatever the name: the Cellpose authors' conversion also kept
  regions of unknown names. Each region gets its own id, from 1 in document order, later
  regions over earlier ones (theirs: one plane per class, then the max, which gives the same
  result since ids grow in document order).
* Regions of ``Ambiguous`` blocks (test set) go to ``Loaded.ignore`` (don't-care pixels), not to
  the labels, as in the authors' test conversion.
* Regions with <= 2 vertices enclose nothing and are skipped; their number is logged at debug
  level per image (``shardgen.datasets.monusac`` logger).
* TIFFs are RGB or RGBA: the first 3 channels are kept (the authors and torch-em do the same).
  Unconfirmed: the official notebook wrote ``.tif`` from OpenSlide's RGBA through
  ``cv2.imwrite``, which takes arrays as BGR(A); if the distributed files were made that way,
  their red and blue are swapped. The stored order is kept, as the authors did.
* The authors cut training images into ~512 px tiles and dropped tiles without nuclei; here each
  image is one sample (cropping belongs to training).

Unconfirmed: image counts (about 209 train / 85 test).
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from pipeline.io import read_image
from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import as_uint_image, found_in, rasterise_polygons

_log = logging.getLogger(__name__)

INFO = DatasetInfo(
    name="monusac",
    title="MoNuSAC 2020 (Verma et al. 2021)",
    modality="he",
    channel_names=("red", "green", "blue"),
    splits=("train", "test"),
    layout=(
        "MoNuSAC_images_and_annotations/<patient>/<patient>_<k>.{svs,tif,xml} (train); "
        "'MoNuSAC Testing Data and Annotations'/<patient>/<patient>_<k>.{svs,tif,xml} (test)"
    ),
    paper_images=209,
)

# Normalised name prefixes of the top folders (see the module docstring).
SPLIT_PREFIXES = (("test", "monusac testing data and annotation"), ("train", "monusac images and annotation"))
SUFFIXES = (".tif", ".xml", ".svs")
AMBIGUOUS = "ambiguous"


def split_of_folder(name: str) -> str | None:
    """The split a top-level folder holds, from its name; None when it is not a MoNuSAC folder."""
    normalised = " ".join(re.sub(r"[_\-]", " ", name).lower().split())
    for split, prefix in SPLIT_PREFIXES:
        if normalised.startswith(prefix):
            return split
    return None


def find_items(root: Path, split: str) -> list[Item]:
    root = Path(root)
    tops = _top_folders(root)
    if not tops:
        found = found_in(root)
        raise LayoutError(f"{root}: not a MoNuSAC 2020 folder; expected {INFO.layout}; found {found}")
    items = []
    for top in (top for top, top_split in tops if top_split == split):
        for patient in sorted(p for p in top.iterdir() if p.is_dir() and not _is_debris(p.name)):
            files: dict[str, dict[str, str]] = {}
            for path in sorted(patient.iterdir()):
                if path.is_file() and not _is_debris(path.name) and path.suffix.lower() in SUFFIXES:
                    files.setdefault(path.stem, {})[path.suffix.lower()] = path.relative_to(root).as_posix()
            for stem, by_suffix in sorted(files.items()):
                ref = tuple(by_suffix.get(suffix) for suffix in SUFFIXES)  # (tif, xml, svs)
                source = next(rel for rel in ref if rel is not None)
                items.append(Item(source=source, split=split, ref=ref))
    return items


def _top_folders(root: Path) -> list[tuple[Path, str]]:
    if not root.is_dir():
        return []
    tops = []
    for path in sorted(root.iterdir()):
        if path.is_dir() and not _is_debris(path.name):
            split = split_of_folder(path.name)
            if split is not None:
                tops.append((path, split))
    return tops


def _is_debris(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def load(root: Path, item: Item) -> Loaded:
    root = Path(root)
    tif_rel, xml_rel, svs_rel = item.ref
    stem = Path(item.source).with_suffix("").as_posix()
    if tif_rel is None:
        if svs_rel is not None:
            raise ItemError(f"{stem}.tif: image missing (convert the .svs); {svs_rel} is there")
        raise ItemError(f"{stem}.tif: image missing (no .tif or .svs; only {xml_rel})")
    if xml_rel is None:
        raise ItemError(f"{tif_rel}: no annotation file ({stem}.xml)")
    # RGBA -> RGB: keep the first 3 channels, whatever the 4th holds.
    image = as_uint_image(read_image(root / tif_rel, channels=[0, 1, 2]))
    nuclei, ambiguous = read_annotations(root / xml_rel)
    labels, skipped = rasterise_polygons(nuclei, image.shape[:2])
    ignore_ids, skipped_ambiguous = rasterise_polygons(ambiguous, image.shape[:2])
    if skipped or skipped_ambiguous:
        _log.debug("%s: skipped %d region(s) with <= 2 vertices", xml_rel, skipped + skipped_ambiguous)
    ignore = ignore_ids > 0
    return Loaded(image=image, labels=labels, ignore=ignore if ignore.any() else None)


def read_annotations(path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(nucleus polygons, ambiguous polygons) of a MoNuSAC XML, each an (n, 2) array of (x, y)."""
    try:
        document = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as error:
        raise ItemError(f"{path}: cannot parse this annotation XML ({error}); it is truncated or corrupt") from error
    nuclei, ambiguous = [], []
    for annotation in document.iter("Annotation"):
        attribute = annotation.find("Attributes/Attribute")
        name = "" if attribute is None else attribute.get("Name", "")
        target = ambiguous if AMBIGUOUS in name.lower() else nuclei
        for number, region in enumerate(annotation.findall("Regions/Region"), start=1):
            vertices = region.find("Vertices")
            points = [] if vertices is None else vertices.findall("Vertex")
            try:
                target.append(np.array([[float(v.get("X")), float(v.get("Y"))] for v in points]).reshape(-1, 2))
            except (TypeError, ValueError) as error:
                raise ItemError(
                    f"{path}: region {region.get('Id', number)} of {name or 'an unnamed'} block has a vertex "
                    f"without numeric X and Y ({error})"
                ) from error
    return nuclei, ambiguous
