"""scripts/learn_check.py: the held-out split and the per-group scores (the training run itself is
measured in docs/BENCHMARKS.md, not tested: it takes 25 minutes)."""

import sys
from pathlib import Path

import pytest

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
    rows = [  # as infer.benchmark's images.csv gives them
        {"source": "a", "status": "ok", "ap@0.5": "0.5"},
        {"source": "b", "status": "ok", "ap@0.5": "1.0"},
        {"source": "c", "status": "ok", "ap@0.5": "0.25"},
        {"source": "d", "status": "failed", "ap@0.5": ""},
    ]
    scores = ap_by_group(rows, {"a": "fluo_gray", "b": "fluo_gray", "c": "color", "d": "color"})
    assert scores == {"color": {"images": 1, "ap50": 0.25}, "fluo_gray": {"images": 2, "ap50": 0.75}}


def test_ap_by_group_names_an_image_missing_from_the_manifest():
    with pytest.raises(KeyError, match="d"):
        ap_by_group([{"source": "d", "status": "ok", "ap@0.5": "0.1"}], {"a": "fluo_gray"})


def test_diameters_pair_the_estimate_with_the_labels_own():
    rows = [{"source": "abcdefghij", "diameter": "12.5", "true_diameter": "11.28"},
            {"source": "klmnopqrst", "diameter": "", "true_diameter": "11.28"}]
    found = diameters(rows)
    assert found == {"abcdefgh": {"estimated": 12.5, "true": 11.28}, "klmnopqr": {"estimated": None, "true": 11.28}}
