"""scripts/learn_check.py: the held-out split and the per-group scores (the training run itself is
measured in docs/BENCHMARKS.md, not tested: it takes 25 minutes)."""

import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.io import write_labels

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from learn_check import ap_by_group, diameters, split_dsb  # noqa: E402


def write_manifest(root: Path, groups: dict[str, int]) -> None:
    lines = ["image_id,height,width,channels,n_nuclei,appearance_group"]
    for group, count in groups.items():
        lines += [f"{group}{i:02d},256,256,4,10,{group}" for i in range(count)]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")


def test_split_holds_out_every_fourth_image_of_each_group(tmp_path):
    write_manifest(tmp_path, {"fluo_gray": 9, "color": 5, "bright_gray": 1})
    train, held = split_dsb(tmp_path)
    # Sorted ids per group, every 4th from the first: 0, 4, 8 of 9; 0, 4 of 5; the only one of 1.
    assert held == sorted(["fluo_gray00", "fluo_gray04", "fluo_gray08", "color00", "color04", "bright_gray00"])
    assert set(train).isdisjoint(held)
    assert len(train) + len(held) == 15


def test_ap_by_group_averages_images_per_group():
    rows = [
        {"pred": "out/a_masks.tif", "ap@0.5": "0.5"},
        {"pred": "out/b_masks.tif", "ap@0.5": "1.0"},
        {"pred": "out/c_masks.tif", "ap@0.5": "0.25"},
        {"pred": "mean", "ap@0.5": "0.583"},
    ]
    scores = ap_by_group(rows, {"a": "fluo_gray", "b": "fluo_gray", "c": "color"})
    assert scores == {"color": {"images": 1, "ap50": 0.25}, "fluo_gray": {"images": 2, "ap50": 0.75}}


def test_ap_by_group_names_an_image_missing_from_the_manifest():
    with pytest.raises(KeyError, match="d"):
        ap_by_group([{"pred": "out/d_masks.tif", "ap@0.5": "0.1"}], {"a": "fluo_gray"})


def test_diameters_pair_the_estimate_with_the_labels_own(tmp_path):
    labels = np.zeros((60, 60), np.uint16)
    labels[5:15, 5:15], labels[30:40, 30:40] = 1, 2  # 10 x 10 squares: 10 / (sqrt(pi) / 2) px
    write_labels(tmp_path / "abcdefghij_masks.tif", labels)
    write_labels(tmp_path / "klmnopqrst_masks.tif", labels)
    (tmp_path / "summary.csv").write_text(
        "file,size,n_cells,diameter,seconds,status,error\n"
        "/x/abcdefghij.tif,60x60,2,12.50,0.1,ok,\n/x/klmnopqrst.tif,60x60,0,,0.1,ok,\n")
    found = diameters(tmp_path / "summary.csv", tmp_path)
    assert found == {"abcdefgh": {"estimated": 12.5, "true": 11.28}, "klmnopqr": {"estimated": None, "true": 11.28}}
