"""DeepBacs converter on miniature copies of the published zip layouts (datasets.md 2.7 fixture)."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from shardgen.datasets import deepbacs
from tests.shardgen.datasets.helpers import (
    assert_layout_error, assert_load_errors, build_and_read, by_source, disc_labels, max_labels, truncate,
)

SHAPE = (36, 40)
MIXED = "DeepBacs_Data_Segmentation_StarDist_MIXED_dataset"
ECOLI = "DeepBacs_Data_Segmentation_E.coli_Brightfield_dataset"
STATIONARY = "DeepBacs_Data_Segmentation_Ecoli_stationary_phase"
AUREUS = "DeepBacs_Data_Segmentation_Staph_Aureus_dataset"
SUBTILIS = "DeepBacs_Data_Segmentation_B.subtilis_FtsZ_dataset"
CENTRES = [(8, 8), (26, 30), (27, 8), (8, 30)]


def write_pair(split_folder: Path, image_dir: str, mask_dir: str, name: str, n_cells: int, binary=False) -> None:
    """A 2-D uint16 image and its label TIF (or a 0/255 binary mask) under the same file name."""
    labels = disc_labels(CENTRES[:n_cells], SHAPE)
    for folder in (image_dir, mask_dir):
        (split_folder / folder).mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(split_folder / image_dir / name, (500 + 800 * (labels > 0)).astype(np.uint16))
    mask = ((labels > 0) * 255).astype(np.uint8) if binary else labels
    tifffile.imwrite(split_folder / mask_dir / name, mask)


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "deepbacs"
    # StarDist MIXED: training/{source,target}, test/{source,target}
    write_pair(root / MIXED / "training", "source", "target", "JE2_01.tif", 3)
    write_pair(root / MIXED / "training", "source", "target", "pos_01.tif", 2)
    write_pair(root / MIXED / "test", "source", "target", "train_05.tif", 1)
    # E. coli BF: train/{brightfield,masks_RoiMap,masks_binary}, test/..., live-cell_data/
    write_pair(root / ECOLI / "train", "brightfield", "masks_RoiMap", "e1.tif", 4)
    write_pair(root / ECOLI / "train", "brightfield", "masks_binary", "e1.tif", 4, binary=True)
    write_pair(root / ECOLI / "test", "brightfield", "masks_RoiMap", "e2.tif", 2)
    (root / ECOLI / "live-cell_data").mkdir()
    tifffile.imwrite(root / ECOLI / "live-cell_data" / "movie.tif", np.zeros((5, *SHAPE), np.uint16))
    # E. coli stationary phase: training/{brightfield,masks}, binary masks here
    write_pair(root / STATIONARY / "training", "brightfield", "masks", "st1.tif", 3, binary=True)
    write_pair(root / STATIONARY / "test", "brightfield", "masks", "st2.tif", 2)
    # S. aureus: {brightfield,fluorescence}_dataset/train/{full_images,patches}/..., test/...
    for kind in ("brightfield", "fluorescence"):
        base = root / AUREUS / f"{kind}_dataset"
        write_pair(base / "train" / "full_images", kind, "masks", "sa1.tif", 4)
        write_pair(base / "train" / "patches", kind, "masks", "sa1_patch0.tif", 1)
        write_pair(base / "test", kind, "masks", "sa2.tif", 2)
    # B. subtilis FtsZ: the same data once per network
    for network in ("StarDist_dataset", "pix2pix_dataset"):
        write_pair(root / SUBTILIS / network / "train", "fluorescence", "masks", "bs1.tif", 3)
        write_pair(root / SUBTILIS / network / "test", "fluorescence", "masks", "bs2.tif", 2)
    (root / SUBTILIS / "pix2pix_dataset" / "Notes_pix2pix.txt").write_text("notes")
    (root / "__MACOSX").mkdir()
    return root


def subset_of(source: str) -> str:
    return source.split("/")[0].replace(".", "_")


TRAIN_SOURCES = [
    (MIXED, f"{MIXED}/training/source/JE2_01.tif", 3),
    (MIXED, f"{MIXED}/training/source/pos_01.tif", 2),
    (SUBTILIS, f"{SUBTILIS}/StarDist_dataset/train/fluorescence/bs1.tif", 3),
    (ECOLI, f"{ECOLI}/train/brightfield/e1.tif", 4),
    (STATIONARY, f"{STATIONARY}/training/brightfield/st1.tif", 3),
    (AUREUS, f"{AUREUS}/brightfield_dataset/train/full_images/brightfield/sa1.tif", 4),
    (AUREUS, f"{AUREUS}/fluorescence_dataset/train/full_images/fluorescence/sa1.tif", 4),
]
DUPLICATE = f"{SUBTILIS}/pix2pix_dataset/train/fluorescence/bs1.tif"
DUPLICATE_MASK = f"{SUBTILIS}/pix2pix_dataset/train/masks/bs1.tif"


def test_find_items_recognises_each_zip_layout(dataset):
    items = deepbacs.find_items(dataset, "train")
    converted = [(i.subset, i.source) for i in items if i.ref[0] == "pair"]
    assert sorted(converted) == sorted((subset_of(source), source) for _, source, _ in TRAIN_SOURCES)
    # subsets are the zip folder names, made safe for WebDataset keys (no dots)
    assert {i.subset for i in items} >= {"DeepBacs_Data_Segmentation_E_coli_Brightfield_dataset", MIXED}
    # the second network folder of B. subtilis is listed, to be rejected; derived folders are not
    assert {i.source for i in items if i.ref[0] == "duplicate"} == {DUPLICATE, DUPLICATE_MASK}
    assert not any(part in i.source for i in items for part in ("masks_binary", "live-cell_data", "patches"))
    # zip folders in name order, then folder order inside each
    assert [i.source for i in deepbacs.find_items(dataset, "test") if i.ref[0] == "pair"] == [
        f"{SUBTILIS}/StarDist_dataset/test/fluorescence/bs2.tif",
        f"{ECOLI}/test/brightfield/e2.tif",
        f"{STATIONARY}/test/brightfield/st2.tif",
        f"{AUREUS}/brightfield_dataset/test/brightfield/sa2.tif",
        f"{AUREUS}/fluorescence_dataset/test/fluorescence/sa2.tif",
        f"{MIXED}/test/source/train_05.tif",
    ]
    assert deepbacs.find_items(dataset, "train") == items  # deterministic


def test_load_gives_gray_image_and_all_objects(dataset):
    by_source = {i.source: i for i in deepbacs.find_items(dataset, "train")}
    modalities = {}
    for subset, source, n_cells in TRAIN_SOURCES:
        loaded = deepbacs.load(dataset, by_source[source])
        assert loaded.image.shape == (*SHAPE, 1) and loaded.image.dtype == np.uint16
        assert len(np.unique(loaded.labels)) - 1 == n_cells, source  # binary masks split too
        modalities[source.split("/")[-2]] = (loaded.modality, loaded.channel_names)
    assert modalities == {
        "source": ("mixed", ("main",)),
        "brightfield": ("brightfield", ("brightfield",)),
        "fluorescence": ("fluorescence", ("fluorescence",)),
    }


def test_duplicates_and_unrecognised_folders_are_rejected_not_dropped(dataset):
    unknown = dataset / "some_other_zip" / "images"
    unknown.mkdir(parents=True)
    tifffile.imwrite(unknown / "u1.tif", np.zeros(SHAPE, np.uint16))
    tifffile.imwrite(dataset / ECOLI / "train" / "stray.tif", np.zeros(SHAPE, np.uint16))
    items = by_source(deepbacs.find_items(dataset, "train"))
    expected = {
        DUPLICATE: "not used; this zip's StarDist_dataset",
        "some_other_zip/images/u1.tif": "unrecognised DeepBacs layout",
        f"{ECOLI}/train/stray.tif": "stray.tif: not in a recognised image/mask folder pair",
    }
    for source, message in expected.items():
        assert items[source].subset == subset_of(source)
        with pytest.raises(ValueError, match=message):
            deepbacs.load(dataset, items[source])


def test_bad_files_are_listed_and_rejected_with_their_name(dataset):
    training = dataset / MIXED / "training"
    (training / "source" / "corrupt.tif").write_bytes(b"II*\x00" + b"\x05" * 40)
    (training / "target" / "corrupt.tif").write_bytes((training / "target" / "JE2_01.tif").read_bytes())
    write_pair(training, "source", "target", "cut.tif", 2)
    truncate(training / "target" / "cut.tif")
    write_pair(training, "source", "target", "lonely.tif", 2)
    (training / "target" / "lonely.tif").unlink()
    write_pair(training, "source", "target", "orphan.tif", 2)
    (training / "source" / "orphan.tif").unlink()
    expected = {
        f"{MIXED}/training/source/corrupt.tif": "corrupt.tif",
        f"{MIXED}/training/source/cut.tif": "cut.tif",
        f"{MIXED}/training/source/lonely.tif": "lonely.tif has no label",
        f"{MIXED}/training/target/orphan.tif": "orphan.tif has no matching image",
    }
    assert_load_errors(deepbacs.load, dataset, by_source(deepbacs.find_items(dataset, "train")), expected)


def test_wrong_folder_raises_layout_error(tmp_path, dataset):
    (tmp_path / "other" / "images").mkdir(parents=True)
    assert_layout_error(deepbacs.find_items, tmp_path / "other", "train", match="no DeepBacs layout recognised")
    # one zip unpacked straight into the dataset folder: say how to fix it
    assert_layout_error(deepbacs.find_items, dataset / ECOLI, "train", match="looks like one unpacked zip")


def test_end_to_end_shards_hold_every_object(dataset, shards_dir):
    built = build_and_read("deepbacs", dataset, shards_dir)
    for image, _, _, _, _ in built.samples:
        assert image.shape == (*SHAPE, 1)
    counts = max_labels(built.samples)
    expected = {source: n for _, source, n in TRAIN_SOURCES}
    expected.update({
        f"{MIXED}/test/source/train_05.tif": 1,
        f"{SUBTILIS}/StarDist_dataset/test/fluorescence/bs2.tif": 2,
        f"{ECOLI}/test/brightfield/e2.tif": 2,
        f"{STATIONARY}/test/brightfield/st2.tif": 2,
        f"{AUREUS}/brightfield_dataset/test/brightfield/sa2.tif": 2,
        f"{AUREUS}/fluorescence_dataset/test/fluorescence/sa2.tif": 2,
    })
    assert counts == expected
    # the unused network folder is in rejects.parquet with its reason, not silently skipped
    assert {r["source"] for r in built.rejects} == {
        DUPLICATE, DUPLICATE_MASK,
        f"{SUBTILIS}/pix2pix_dataset/test/fluorescence/bs2.tif", f"{SUBTILIS}/pix2pix_dataset/test/masks/bs2.tif",
    }
    assert all("StarDist_dataset" in r["reason"] for r in built.rejects)
