"""Tests for ``python -m infer.evaluate``: pairing files by name in the layouts the module
documents, per-image and mean AP / error rate against pipeline.metrics, unmatched files listed,
and the CSV."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from infer.evaluate import evaluate, main, mean_row, pair_files, pairing_key
from pipeline.io import write_labels
from pipeline.metrics import average_precision, error_rate
from pipeline.synthetic import generate

REPO = Path(__file__).resolve().parents[2]


def labels(seed, shape=(60, 80)) -> np.ndarray:
    return generate("nuclei", shape, seed=seed)[1].astype(np.uint16)


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        Image.fromarray(array).save(path)
    elif path.suffix == ".npy":
        np.save(path, array)
    else:
        write_labels(path, array)
    return path


def run_evaluate(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "infer.evaluate", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------------
# Pairing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("relative, key", [
    ("x_masks.tif", "x"), ("x_cp_masks.png", "x"), ("x_labels.png", "x"), ("x.tif", "x"),
    ("000_img.png", "000"), ("000_img_masks.tif", "000"), ("a/b/x_image_masks.tif", "a/b/x"),
    ("_masks.tif", "_masks"), ("cell_masks_masks.tif", "cell_masks"), ("x.ome_masks.tif", "x.ome"),
])
def test_pairing_key(relative, key):
    assert pairing_key(Path(relative)) == key


def test_pairing_in_the_documented_layouts(tmp_path):
    true, pred = tmp_path / "true", tmp_path / "pred"
    masks = labels(0)
    image = np.zeros((60, 80), np.uint8)
    # Cellpose's layout: the image beside its _masks file.
    save(true / "cp" / "x.tif", image), save(true / "cp" / "x_masks.tif", masks)
    save(pred / "cp" / "x_masks.tif", masks)
    # Cellpose's dataset names: 000_img.png and 000_masks.png; the CLI writes 000_img_masks.tif.
    save(true / "cp" / "000_img.png", image)
    save(true / "cp" / "000_masks.png", masks.astype(np.uint8))
    save(pred / "cp" / "000_img_masks.tif", masks)
    # A folder of bare label files.
    save(true / "bare" / "y.tif", masks)
    save(pred / "bare" / "y_masks.tif", masks)
    # _labels files, and _masks preferred over _labels for one key.
    save(true / "lab" / "z_labels.npy", masks), save(pred / "lab" / "z_masks.tif", masks)
    save(true / "lab" / "w_labels.tif", masks), save(true / "lab" / "w_masks.tif", masks)
    save(pred / "lab" / "w_masks.tif", masks)
    # Unmatched on both sides; the CLI's other outputs are not predictions.
    save(true / "bare" / "lonely.tif", masks)
    save(pred / "cp" / "orphan_masks.tif", masks)
    save(pred / "cp" / "x_flows.npy", np.zeros((2, 60, 80), np.float32))
    (pred / "summary.csv").write_text("file\n")
    save(pred / "cp" / ".x_masks.tif.tmp.tif", masks)  # hidden: a temporary, left out

    pairing = pair_files(true, pred)
    rel = lambda path, root: path.relative_to(root).as_posix()  # noqa: E731
    assert [(rel(t, true), rel(p, pred)) for t, p in pairing.pairs] == [
        ("bare/y.tif", "bare/y_masks.tif"),
        ("cp/000_masks.png", "cp/000_img_masks.tif"),
        ("cp/x_masks.tif", "cp/x_masks.tif"),
        ("lab/w_masks.tif", "lab/w_masks.tif"),
        ("lab/z_labels.npy", "lab/z_masks.tif"),
    ]
    assert [rel(p, true) for p in pairing.true_only] == ["bare/lonely.tif"]
    assert [rel(p, pred) for p in pairing.pred_only] == ["cp/orphan_masks.tif"]
    assert pairing.ambiguous == []


def test_same_key_twice_is_ambiguous(tmp_path):
    masks = labels(1)
    save(tmp_path / "true" / "v_masks.tif", masks)
    save(tmp_path / "pred" / "v_masks.tif", masks)
    save(tmp_path / "pred" / "v_cp_masks.png", masks.astype(np.uint8))
    pairing = pair_files(tmp_path / "true", tmp_path / "pred")
    assert pairing.pairs == [] and [p.name for p in pairing.true_only] == ["v_masks.tif"]
    assert sorted(p.name for p, _ in pairing.ambiguous) == ["v_cp_masks.png", "v_masks.tif"]
    assert all("same key 'v'" in why for _, why in pairing.ambiguous)


# ------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------


def test_scores_equal_pipeline_metrics(tmp_path):
    pairs, trues, preds = [], [], []
    for seed in range(3):
        masks_true = labels(seed)
        masks_pred = np.roll(masks_true, seed * 2, axis=1)  # shifted: partial overlaps
        masks_pred[:10] = 0  # some objects missed
        true_path = save(tmp_path / f"t{seed}_masks.tif", masks_true)
        pairs.append((true_path, save(tmp_path / f"p{seed}_masks.tif", masks_pred)))
        trues.append(masks_true), preds.append(masks_pred)
    rows = evaluate(pairs)
    ap, tp, fp, fn = average_precision(trues, preds, (0.5, 0.75, 0.9))
    errors, mean_error = error_rate(trues, preds, 0.5)
    for i, row in enumerate(rows):
        assert row["status"] == "ok"
        assert [row["ap@0.5"], row["ap@0.75"], row["ap@0.9"]] == ap[i].tolist()
        assert (row["tp@0.5"], row["fp@0.5"], row["fn@0.5"]) == (tp[i, 0], fp[i, 0], fn[i, 0])
        assert row["n_true"] == tp[i, 0] + fn[i, 0] and row["n_pred"] == tp[i, 0] + fp[i, 0]
        assert row["error_rate@0.5"] == errors[i]
    mean = mean_row(rows)
    assert mean["ap@0.5"] == pytest.approx(ap[:, 0].mean())
    assert mean["error_rate@0.5"] == pytest.approx(mean_error)
    assert 0 < mean["ap@0.5"] < 1 and mean["status"] == "3 scored"


def test_shape_mismatch_and_unreadable_files_fail_with_a_reason(tmp_path):
    good = save(tmp_path / "a_masks.tif", labels(0))
    small = save(tmp_path / "b_masks.tif", labels(0, (30, 40)))
    rgb = tmp_path / "c_masks.png"
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(rgb)
    rows = evaluate([(good, small), (good, rgb)])
    assert [row["status"] for row in rows] == ["failed", "failed"]
    assert "shapes differ" in rows[0]["error"] and "c_masks.png" in rows[1]["error"]


def test_images_without_objects_are_left_out_of_the_means(tmp_path):
    empty = np.zeros((20, 20), np.uint16)
    full = np.pad(np.ones((4, 4), np.uint16), 8)
    pairs = [(save(tmp_path / "e_masks.tif", empty), save(tmp_path / "e2_masks.tif", empty)),
             (save(tmp_path / "f_masks.tif", full), save(tmp_path / "f2_masks.tif", full))]
    rows = evaluate(pairs)
    assert math.isnan(rows[0]["ap@0.5"]) and math.isnan(rows[0]["error_rate@0.5"])
    mean = mean_row(rows)
    assert mean["ap@0.5"] == 1.0 and mean["error_rate@0.5"] == 0.0


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def test_cli_perfect_predictions(tmp_path):
    for seed in range(3):
        save(tmp_path / "true" / f"im{seed}.tif", np.zeros((60, 80), np.uint8))
        save(tmp_path / "true" / f"im{seed}_masks.tif", labels(seed))
        save(tmp_path / "pred" / f"im{seed}_masks.tif", labels(seed))
    args = ["--true", "true", "--pred", "pred", "--csv", "scores/ap.csv"]
    result = run_evaluate(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_csv(tmp_path / "scores" / "ap.csv")
    assert [row["status"] for row in rows] == ["ok"] * 3 + ["3 scored"]
    assert rows[-1]["pred"] == "mean"
    for row in rows:
        assert float(row["ap@0.5"]) == float(row["ap@0.75"]) == float(row["ap@0.9"]) == 1.0
        assert float(row["error_rate@0.5"]) == 0.0
    assert "mean" in result.stdout and "ap@0.5" in result.stdout.splitlines()[0]


def test_cli_lists_unmatched_files_and_fails(tmp_path):
    save(tmp_path / "true" / "a_masks.tif", labels(0))
    save(tmp_path / "true" / "b_masks.tif", labels(1))
    save(tmp_path / "pred" / "a_masks.tif", np.roll(labels(0), 3, axis=0))
    save(tmp_path / "pred" / "c_masks.tif", labels(2))
    true, pred = str(tmp_path / "true"), str(tmp_path / "pred")
    status = main(["--true", true, "--pred", pred, "--csv", str(tmp_path / "s.csv")])
    assert status == 1
    rows = {row["status"]: row for row in read_csv(tmp_path / "s.csv")}
    assert rows["no_prediction"]["true"].endswith("b_masks.tif")
    assert rows["no_ground_truth"]["pred"].endswith("c_masks.tif")
    assert 0 < float(rows["ok"]["ap@0.5"]) < 1  # the matched pair is scored
    assert rows["1 scored"]["pred"] == "mean"


def test_cli_usage_errors(tmp_path, capsys):
    (tmp_path / "true").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["--true", str(tmp_path / "true"), "--pred", str(tmp_path / "nope")])
    assert exit_info.value.code == 2 and "--pred" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--true", str(tmp_path), "--pred", str(tmp_path), "--thresholds", "1.5"])
    # Empty folders: nothing to score is a failure, not a silent success.
    assert main(["--true", str(tmp_path / "true"), "--pred", str(tmp_path / "true")]) == 1


def test_tifffile_reads_what_is_compared(tmp_path):
    # The CLI writes masks with pipeline.io.write_labels; evaluate must read exactly those ids.
    masks = labels(4)
    path = save(tmp_path / "m_masks.tif", masks)
    np.testing.assert_array_equal(tifffile.imread(path), masks)
    (row,) = evaluate([(path, path)])
    assert row["ap@0.9"] == 1.0 and row["n_true"] == len(np.unique(masks)) - 1
