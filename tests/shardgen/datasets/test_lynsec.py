"""LyNSeC converter: fake 'lynsec 1/2/3' folders: (H, W, 5) arrays for _l1 / _l3 (RGB, instance
ids, class) and (H, W, 4) for _l2, as the Zenodo record (8065174) describes the files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shardgen.datasets import lynsec
from tests.shardgen.datasets.helpers import (
    assert_layout_error, assert_load_errors, build_and_read, by_source, n_objects, samples_by_source,
)

SIDE = 64


def _array(n_nuclei: int, seed: int, dtype=np.uint8, channels: int = 4) -> np.ndarray:
    """(SIDE, SIDE, channels): random RGB, then ``n_nuclei`` square nuclei with ids 3, 6, 9, ... in
    channel 3; with 5 channels, a class map in channel 4 (1 / 2 alternating over the nuclei, as
    negative / positive or non-tumour / tumour) that also marks a stray block of background, so
    that reading it as objects would show."""
    rng = np.random.default_rng(seed)
    array = np.zeros((SIDE, SIDE, channels), dtype)
    array[:, :, :3] = rng.integers(0, 256, (SIDE, SIDE, 3))
    for k in range(n_nuclei):
        array[4 + 12 * k : 12 + 12 * k, 4:12, 3] = 3 * (k + 1)
        if channels == 5:
            array[4 + 12 * k : 12 + 12 * k, 4:12, 4] = 1 + k % 2
    if channels == 5:
        array[50:60, 40:60, 4] = 2
    return array


def _channels(rel: str) -> int:
    """5 for *_l1.npy and *_l3.npy, 4 for *_l2.npy (the Zenodo record)."""
    return 4 if rel.endswith("_l2.npy") else 5


FILES = {  # path -> number of nuclei
    "lynsec 1/0_l1.npy": 2,
    "lynsec 1/1_l1.npy": 3,
    "lynsec 2/0_l2.npy": 2,  # in the misaligned range
    "lynsec 2/34_l2.npy": 1,  # last of the misaligned range
    "lynsec 2/35_l2.npy": 4,
    "lynsec 3/2_l3.npy": 1,
    "lynsec 3/10_l3.npy": 2,
}


def _write_dataset(root: Path, dtype=np.uint8) -> dict[str, np.ndarray]:
    arrays = {}
    for seed, (rel, n_nuclei) in enumerate(FILES.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        arrays[rel] = _array(n_nuclei, seed, dtype, _channels(rel))
        np.save(root / rel, arrays[rel])
    # archive debris, not data
    (root / "lynsec 1" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "lynsec 1" / "._0_l1.npy").write_bytes(b"\0\5\26\7")
    (root / "__MACOSX" / "lynsec 1").mkdir(parents=True)
    (root / "__MACOSX" / "lynsec 1" / "._0_l1.npy").write_bytes(b"\0\5\26\7")
    return arrays


def test_find_items_lists_every_file_in_folder_and_number_order(tmp_path):
    _write_dataset(tmp_path)
    items = lynsec.find_items(tmp_path, "all")
    assert [item.source for item in items] == list(FILES)  # 2_l3 before 10_l3
    assert [item.subset for item in items] == ["ihc"] * 2 + ["he"] * 5
    assert {item.split for item in items} == {"all"}


def test_load_splits_rgb_and_labels_and_sets_modality(tmp_path):
    arrays = _write_dataset(tmp_path)
    loaded_sources = []
    for item in lynsec.find_items(tmp_path, "all"):
        if item.source in ("lynsec 2/0_l2.npy", "lynsec 2/34_l2.npy"):
            continue
        loaded = lynsec.load(tmp_path, item)
        array = arrays[item.source]
        assert loaded.image.dtype == np.uint8 and loaded.image.shape == (SIDE, SIDE, 3)
        assert np.array_equal(loaded.image, array[:, :, :3])
        assert np.array_equal(loaded.labels, array[:, :, 3])  # never the class map of channel 4
        assert n_objects(loaded.labels) == FILES[item.source]
        assert array.shape[2] == _channels(item.source)
        assert loaded.modality == ("ihc" if item.source.startswith("lynsec 1/") else "he")
        loaded_sources.append(item.source)
    assert len(loaded_sources) == len(FILES) - 2


@pytest.mark.parametrize("name", ["0_l2.npy", "34_l2.npy"])
def test_misaligned_part_of_lynsec_2_is_rejected_with_the_reason(tmp_path, name):
    _write_dataset(tmp_path)
    item = next(i for i in lynsec.find_items(tmp_path, "all") if i.source == f"lynsec 2/{name}")
    with pytest.raises(ValueError, match=rf"lynsec 2/{name}: labels do not match the image"):
        lynsec.load(tmp_path, item)


def test_float_arrays_become_uint8(tmp_path):
    arrays = _write_dataset(tmp_path, dtype=np.float64)
    item = lynsec.find_items(tmp_path, "all")[0]
    loaded = lynsec.load(tmp_path, item)
    assert loaded.image.dtype == np.uint8
    assert np.array_equal(loaded.image, arrays[item.source][:, :, :3].astype(np.uint8))
    assert len(np.unique(loaded.labels)) == 1 + FILES[item.source]


def test_wrapper_folder_is_accepted(tmp_path):
    _write_dataset(tmp_path / "lynsec")
    items = lynsec.find_items(tmp_path, "all")
    assert items[0].source == "lynsec/lynsec 1/0_l1.npy"
    assert lynsec.load(tmp_path, items[0]).labels.max() == 6


def test_wrong_folder_raises_layout_error(tmp_path):
    (tmp_path / "lynsec1").mkdir()  # no space: not the published name
    assert_layout_error(lynsec.find_items, tmp_path, "all", match="'lynsec 1/'")


def test_corrupt_truncated_and_misshapen_files_are_rejected_by_name(tmp_path):
    _write_dataset(tmp_path)
    (tmp_path / "lynsec 1" / "0_l1.npy").write_bytes(b"garbage")
    truncated = tmp_path / "lynsec 3" / "2_l3.npy"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    np.save(tmp_path / "lynsec 3" / "10_l3.npy", np.zeros((SIDE, SIDE, 3), np.uint8))  # no label channel
    items = by_source(lynsec.find_items(tmp_path, "all"))
    assert len(items) == len(FILES)
    assert_load_errors(lynsec.load, tmp_path, items, {
        "lynsec 1/0_l1.npy": "lynsec 1/0_l1.npy: cannot read",
        "lynsec 3/2_l3.npy": "lynsec 3/2_l3.npy: cannot read",
        "lynsec 3/10_l3.npy": r"lynsec 3/10_l3.npy: expected \(H, W, 5\) \(RGB, instance ids, class\) or \(H, W, 4\)",
    })


def test_fractional_labels_are_rejected(tmp_path):
    _write_dataset(tmp_path, dtype=np.float32)
    array = np.load(tmp_path / "lynsec 1" / "1_l1.npy")
    array[0, 0, 3] = 0.5
    np.save(tmp_path / "lynsec 1" / "1_l1.npy", array)
    with pytest.raises(ValueError, match="lynsec 1/1_l1.npy: channel 3 must hold whole"):
        lynsec.load(tmp_path, lynsec.find_items(tmp_path, "all")[1])


def test_build_end_to_end(tmp_path, shards_dir):
    _write_dataset(tmp_path / "src")
    built = build_and_read("lynsec", tmp_path / "src", shards_dir)
    assert built.summary["written"] == len(FILES) - 2 and built.summary["rejected"] == 2
    samples = samples_by_source(built.samples)
    assert {source: meta.n_cells for source, (_, _, meta) in samples.items()} == {
        source: n for source, n in FILES.items() if source not in ("lynsec 2/0_l2.npy", "lynsec 2/34_l2.npy")
    }
    for _, labels, meta in samples.values():
        assert int(labels.max()) == meta.n_cells
        assert (meta.subset, meta.modality) == (("ihc", "ihc") if meta.source.startswith("lynsec 1/") else ("he", "he"))
    assert sorted(r["source"] for r in built.rejects) == ["lynsec 2/0_l2.npy", "lynsec 2/34_l2.npy"]
    assert all("labels do not match the image" in r["reason"] for r in built.rejects)
