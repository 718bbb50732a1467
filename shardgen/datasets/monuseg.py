"""MoNuSeg 2018 (Kumar et al. 2017): H&E nuclei, one Aperio XML of polygons per 1000x1000 image.

Layout, as the two challenge zips unpack::

    MoNuSeg 2018 Training Data/Tissue Images/TCGA-xx-xxxx-01Z-00-DX1.tif
    MoNuSeg 2018 Training Data/Annotations/TCGA-xx-xxxx-01Z-00-DX1.xml
    MoNuSegTestData/TCGA-xx-xxxx-01Z-00-DX1.tif + .xml (side by side)

Splits: ``train`` (30 images) and ``test`` (14). The training folder's name varies between copies,
so every top-level folder holding ``Tissue Images/`` or ``Annotations/`` is training data, and
its images pair with ``Annotations/<stem>.xml`` of the same folder. Test images pair with
``<stem>.xml`` beside them. An image without its XML and an XML without its image are items,
rejected by ``load``. ``__MACOSX/`` and dot files are skipped.

Tricky bits (datasets.md 2.9):

* Every ``Region`` element is one nucleus; its ``Vertices/Vertex`` carry float ``X`` (column) and
  ``Y`` (row). Polygons are filled with ``shardgen.common.rasterise_polygons``: row = Y,
  col = X, clipped to the image, ids from 1 in document order, later regions over earlier ones
  (torch-em's helper starts at 0 and so merges its first nucleus into the background).
* Regions with fewer than 3 vertices cannot enclose a pixel and are skipped (logged at debug
  level with their number). A region fully covered by later ones disappears from the labels.
  On the two real test images in ``/work/shared/data`` neither happens: 575 + 818 = 1,393 regions,
  all with >= 24 vertices, give 1,393 objects.
* Vertices slightly outside the image (e.g. X = 1000.17 on a 1000-px image) are clipped.

Image: RGB TIFF (a constant alpha channel would be dropped by ``pipeline.io.read_image``).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from pipeline.io import read_image
from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import as_uint_image, found_in, image_files, pair_items, rasterise_polygons

_log = logging.getLogger(__name__)

INFO = DatasetInfo(
    name="monuseg",
    title="MoNuSeg 2018 (Kumar et al. 2017)",
    modality="he",
    channel_names=("red", "green", "blue"),
    splits=("train", "test"),
    layout=(
        "'MoNuSeg 2018 Training Data'/{'Tissue Images'/*.tif, Annotations/*.xml} (train); "
        "MoNuSegTestData/*.tif + *.xml (test)"
    ),
    paper_images=37,
)

TEST_DIR = "MoNuSegTestData"
TRAIN_IMAGE_DIR = "Tissue Images"
TRAIN_ANNOTATION_DIR = "Annotations"
IMAGE_SUFFIXES = (".tif", ".tiff")


def find_items(root: Path, split: str) -> list[Item]:
    root = Path(root)
    train_tops = _train_tops(root)
    if not train_tops and not (root / TEST_DIR).is_dir():
        found = found_in(root)
        raise LayoutError(f"{root}: not a MoNuSeg 2018 folder; expected {INFO.layout}; found {found}")
    if split not in INFO.splits:
        return []
    if split == "test":
        folder = root / TEST_DIR
        return pair_items(root, image_files(folder, IMAGE_SUFFIXES), _xml_files(folder),
                          lambda image: image.with_suffix(".xml"), split)
    items = []
    for top in train_tops:
        annotations = top / TRAIN_ANNOTATION_DIR
        items += pair_items(root, image_files(top / TRAIN_IMAGE_DIR, IMAGE_SUFFIXES), _xml_files(annotations),
                            lambda image, annotations=annotations: annotations / f"{image.stem}.xml", split)
    return items


def _train_tops(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(
        top for top in root.iterdir()
        if top.is_dir() and top.name != "__MACOSX" and not top.name.startswith(".")
        and ((top / TRAIN_IMAGE_DIR).is_dir() or (top / TRAIN_ANNOTATION_DIR).is_dir())
    )


def _xml_files(folder: Path) -> list[Path]:
    return image_files(folder, (".xml",))  # the same listing rules (sorted, no dot files)


def load(root: Path, item: Item) -> Loaded:
    root = Path(root)
    image_rel, xml_rel = item.ref
    if image_rel is None:
        raise ItemError(f"annotation file {xml_rel} has no matching image ({Path(xml_rel).stem}.tif)")
    if xml_rel is None:
        raise ItemError(f"image {image_rel} has no annotation file ({Path(image_rel).stem}.xml)")
    image = as_uint_image(read_image(root / image_rel))
    if image.shape[2] != 3:
        raise ItemError(f"{image_rel}: MoNuSeg images are RGB; got shape {image.shape}")
    polygons = read_regions(root / xml_rel)
    labels, skipped = rasterise_polygons(polygons, image.shape[:2])
    if skipped:
        _log.debug("%s: skipped %d region(s) with fewer than 3 vertices", xml_rel, skipped)
    return Loaded(image=image, labels=labels)


def read_regions(path: Path) -> list[np.ndarray]:
    """Every ``Region``'s vertices as an (n, 2) float array of (x, y), in document order."""
    try:
        document = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as error:
        raise ItemError(f"{path}: cannot parse this annotation XML ({error}); it is truncated or corrupt") from error
    polygons = []
    for number, region in enumerate(document.iter("Region"), start=1):
        vertices = region.find("Vertices")
        points = [] if vertices is None else vertices.findall("Vertex")
        try:
            vertices_xy = [[float(v.get("X")), float(v.get("Y"))] for v in points]
            polygons.append(np.array(vertices_xy, dtype=np.float64).reshape(-1, 2))
        except (TypeError, ValueError) as error:
            raise ItemError(
                f"{path}: region {region.get('Id', number)} has a vertex without numeric X and Y ({error})"
            ) from error
    return polygons
