"""Tests for infer.benchmark on a real shard root built with shardgen in tmp_path.

The model in most tests is ``PeakModel``, a parameter-free network whose output is computed from
the image (flows up the intensity gradient, cell probability from brightness), so that the real
prediction path (normalise, rescale, tile, blend, follow flows) gives real, imperfect masks of the
bright discs the fixture draws: AP is neither 0 nor 1, and the scores can be checked against
``infer.evaluate`` on the same masks. The command line runs with a random tiny CP-SAM export,
under torchrun too.
"""

import csv
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import shardgen.build as build
from infer import benchmark
from infer.benchmark import BenchmarkConfig, score_rows, score_sample, select_rows, share_rows, summarise
from infer.evaluate import evaluate, mean_row, score_masks
from infer.predict import PredictConfig, predict
from pipeline.io import write_labels
from pipeline.model import ModelConfig
from pipeline.weights import build_model, to_cellpose
from pipeline.shards import iter_samples
from shardgen.base import DatasetInfo, Item, Loaded
from shardgen.build import BuildConfig, build_dataset, finalize

REPO = Path(__file__).resolve().parents[2]
# (dataset, split, subset) -> images. "cyto2" is the one dataset paper.md gives a figure for.
COUNTS = {("cyto2", "test", "cyto"): 2, ("cyto2", "test", "cyto2"): 2, ("cyto2", "train", "cyto"): 2,
          ("nuclei", "test", ""): 3}


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


def disc_image(seed: int) -> Loaded:
    """Bright paraboloid discs (radius 6-11 px) on black, uint16, with their labels. Extras that
    make the scores imperfect: a 2 px disc (below min_size 15: a miss), an unlabelled disc (a
    false positive), two discs that touch; every third image has a don't-care region over the
    unlabelled disc."""
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(90, 140)), int(rng.integers(90, 140))
    yy, xx = np.mgrid[:height, :width]
    image = np.zeros((height, width))
    labels = np.zeros((height, width), np.uint16)
    centres = [(25, 25, 9), (25, 48, 8), (60, 30, 11), (70, 70, 7), (30, 80, 6), (80, 20, 2)]
    for index, (y, x, r) in enumerate(centres, 1):
        y, x = y + int(rng.integers(0, 8)), x + int(rng.integers(0, 8))
        inside = (yy - y) ** 2 + (xx - x) ** 2 < r * r
        image[inside] = 1 - ((yy - y) ** 2 + (xx - x) ** 2)[inside] / (r * r) + 0.05
        labels[inside] = index
    unlabelled = (yy - 75) ** 2 + (xx - 48) ** 2 < 36
    image[unlabelled] = 0.8
    ignore = unlabelled if seed % 3 == 0 else None
    return Loaded(image=(image * 60000).astype(np.uint16)[..., None], labels=labels, ignore=ignore,
                  channel_names=("gray",))


def fake_converter(name: str) -> types.SimpleNamespace:
    splits = tuple(sorted({split for (dataset, split, _) in COUNTS if dataset == name}))
    info = DatasetInfo(name=name, title=name, modality="fluorescence", channel_names=("gray",), splits=splits,
                       layout="none")

    def find_items(root, split):
        # Each group's images get their own seeds (group's position in COUNTS x 100 + index).
        return [Item(source=f"{subset}/{i}", split=split, subset=subset, ref=(100 * group + i,))
                for group, ((dataset, item_split, subset), n) in enumerate(sorted(COUNTS.items()))
                if dataset == name and item_split == split for i in range(n)]

    return types.SimpleNamespace(INFO=info, find_items=find_items, load=lambda root, item: disc_image(item.ref[0]))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    real = build.get_converter
    names = {dataset for dataset, _, _ in COUNTS}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build, "get_converter", lambda name: fake_converter(name) if name in names else real(name))
        for name in sorted(names):
            build_dataset(name, out, out, config=BuildConfig(max_samples=2, workers=0), finalize_root=False)
    weights = out.parent / "weights.yaml"
    weights.write_text("cyto2/cyto: 1\n")
    finalize(out, weights)
    return out


class PeakModel(torch.nn.Module):
    """(B, C, T, T) -> (dy, dx, cellprob): 5 x the unit gradient of channel 0 (towards each
    disc's peak, where the flows of a paraboloid disc point) and a logit that is positive where
    the normalised intensity is above 0.02."""

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        intensity = F.pad(tiles[:, :1], (1, 1, 1, 1), mode="replicate")
        dy = (intensity[:, :, 2:, 1:-1] - intensity[:, :, :-2, 1:-1]) / 2
        dx = (intensity[:, :, 1:-1, 2:] - intensity[:, :, 1:-1, :-2]) / 2
        norm = torch.sqrt(dy**2 + dx**2).clamp_min(1e-6)
        cellprob = (tiles[:, :1] - 0.02) * 50
        return torch.cat([5 * dy / norm, 5 * dx / norm, cellprob], dim=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny model, exported as the trainer does: Cellpose layout plus <stem>.json."""
    folder = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    torch.save(to_cellpose(build_model(ModelConfig(encoder="tiny"))), folder / "model_cellpose.pt")
    (folder / "model_cellpose.json").write_text(json.dumps({"model": {"encoder": "tiny"}, "step": 1}))
    return folder / "model_cellpose.pt"


def config(root, **kw) -> BenchmarkConfig:
    return BenchmarkConfig(**({"shards": str(root), "checkpoint": "unused", "batch_size": 4} | kw))


# ------------------------------------------------------------------------------------------------
# Reading the shards (pipeline.shards) and sharing them out
# ------------------------------------------------------------------------------------------------


def test_rows_are_the_test_split_of_every_dataset_sorted(root):
    rows = select_rows(config(root))
    assert [(r["dataset"], r["subset"]) for r in rows] == [("cyto2", "cyto")] * 2 + [("cyto2", "cyto2")] * 2 + [
        ("nuclei", "")] * 3
    assert {r["split"] for r in rows} == {"test"}
    assert [r["dataset"] for r in select_rows(config(root, datasets=("nuclei",), limit=2))] == ["nuclei"] * 2
    with pytest.raises(ValueError, match="livecell.*datasets with that split: cyto2, nuclei"):
        select_rows(config(root, datasets=("livecell",)))
    with pytest.raises(ValueError, match="no samples in split 'val'.*'test', 'train'"):
        select_rows(config(root, split="val"))
    with pytest.raises(FileNotFoundError, match="does not exist; build shards first"):
        select_rows(config(root / "nowhere"))


def test_every_sample_is_read_once_and_a_missing_one_is_named(root):
    rows = select_rows(config(root))
    seen = {row["key"]: sample for row, sample in iter_samples(root, rows)}
    assert set(seen) == {row["key"] for row in rows}
    for row in rows:
        image, labels, _, meta, _ = seen[row["key"]]
        assert meta.key == row["key"] and labels.shape == image.shape[:2] == (row["height"], row["width"])
    ghost = dict(rows[0], key="cyto2-cyto-test-999999")
    results = list(iter_samples(root, [rows[0], ghost]))
    assert [type(s) for _, s in results] == [tuple, ValueError]
    assert "cyto2-cyto-test-999999" in str(results[1][1]) and "not in the tar" in str(results[1][1])
    missing = dict(rows[0], shard="cyto2/none.tar")
    ((_, error),) = iter_samples(root, [missing])
    assert isinstance(error, ValueError) and "the shard is missing" in str(error)


def test_ranks_share_the_samples_disjointly_by_pixels():
    rows = [{"key": str(i), "height": h, "width": 10} for i, h in enumerate([50, 10, 40, 30, 20, 60])]
    shares = [share_rows(rows, rank, 2) for rank in range(2)]
    assert sorted(r["key"] for share in shares for r in share) == sorted(r["key"] for r in rows)
    # Largest first to the lighter rank: 60 -> 0, 50 -> 1, 40 -> 1, 30 -> 0, 20 -> 0, 10 -> 1.
    assert [r["key"] for r in shares[0]] == ["3", "4", "5"] and [r["key"] for r in shares[1]] == ["0", "1", "2"]
    assert share_rows(rows, 0, 1) == rows


# ------------------------------------------------------------------------------------------------
# Scores: equal to infer.evaluate's on the same masks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("diameter", ["true", "none"])
def test_per_image_scores_equal_infer_evaluate_on_the_same_masks(root, tmp_path, diameter):
    cfg = config(root, diameter=diameter)
    rows = score_rows(PeakModel(), select_rows(cfg), cfg, root, show_progress=False)
    assert all(row["status"] == "ok" for row in rows)
    # The same masks, predicted image by image as predict() does, written as files and scored by
    # infer.evaluate (the ignore regions are left out here: see the next test).
    pairs, by_key = [], {}
    (tmp_path / "true").mkdir()
    (tmp_path / "pred").mkdir()
    for manifest_row, (image, labels, _, meta, ignore) in iter_samples(root, select_rows(cfg)):
        rescale = diameter == "true" and meta.diameter > 0
        prediction = predict(PeakModel(), image, PredictConfig(diameter=meta.diameter if rescale else None))
        if ignore is not None:
            prediction = prediction._replace(masks=drop_ignored(prediction.masks, ignore))
        write_labels(tmp_path / "true" / f"{meta.key}_masks.tif", labels)
        write_labels(tmp_path / "pred" / f"{meta.key}_masks.tif", prediction.masks)
        pairs.append((tmp_path / "true" / f"{meta.key}_masks.tif", tmp_path / "pred" / f"{meta.key}_masks.tif"))
        by_key[meta.key] = round(meta.diameter, 2) if rescale else ""
    expected = {Path(row["true"]).name.removesuffix("_masks.tif"): row for row in evaluate(pairs)}
    for row in rows:
        want = expected[row["key"]]
        for name in ("n_true", "n_pred", "ap@0.5", "ap@0.75", "ap@0.9", "tp@0.5", "fp@0.5", "fn@0.5",
                     "error_rate@0.5"):
            assert row[name] == want[name], (row["key"], name)
        assert row["diameter"] == by_key[row["key"]]
    # Real, imperfect masks: the small disc is always missed, the unlabelled one found.
    assert all(0 < row["ap@0.5"] < 1 and row["fn@0.5"] >= 1 for row in rows)


def drop_ignored(masks: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    """Masks without those more than half inside ``ignore`` (written out loop by loop)."""
    kept = masks.copy()
    for mask_id in np.unique(masks[masks > 0]):
        inside = masks == mask_id
        if np.count_nonzero(inside & ignore) > np.count_nonzero(inside) / 2:
            kept[inside] = 0
    return kept


def test_predictions_mostly_in_a_dont_care_region_are_not_false_positives():
    labels = np.zeros((40, 40), np.uint16)
    labels[5:15, 5:15] = 1
    masks = np.zeros_like(labels)
    masks[5:15, 5:15] = 3  # matches the true object
    masks[20:30, 20:30] = 7  # unlabelled, in the don't-care region
    masks[20:30, 32:40] = 9  # unlabelled, only a quarter in it: still a false positive
    ignore = np.zeros(labels.shape, bool)
    ignore[18:32, 18:34] = True
    scored = score_sample(labels, masks, ignore)
    assert (scored["tp@0.5"], scored["fp@0.5"], scored["n_pred"]) == (1, 1, 2)
    assert scored == score_masks(labels, np.where(masks == 7, 0, masks))
    assert score_sample(labels, masks)["fp@0.5"] == 2


def test_table_means_per_dataset_subset_and_overall(root):
    cfg = config(root, diameter="true")
    rows = score_rows(PeakModel(), select_rows(cfg), cfg, root, show_progress=False)
    rows.append(dict(rows[0], key="broken", status="failed", error="damaged"))
    table = summarise(rows)
    assert list(table) == ["cyto2", "cyto2/cyto", "cyto2/cyto2", "nuclei", "overall"]
    for name, members in [("cyto2", [r for r in rows if r["dataset"] == "cyto2"]),
                          ("cyto2/cyto2", [r for r in rows if r["subset"] == "cyto2"]),
                          ("overall", rows)]:
        ok = [r for r in members if r["status"] == "ok"]
        assert table[name]["images"] == len(ok) and table[name]["failed"] == len(members) - len(ok)
        assert table[name]["cells"] == sum(r["n_true"] for r in ok)
        # Every image weighs the same (paper.md 3a: per image, then averaged).
        assert table[name]["ap50"] == pytest.approx(np.mean([r["ap@0.5"] for r in ok]), abs=1e-4)
        assert table[name]["error50"] == pytest.approx(np.mean([r["error_rate@0.5"] for r in ok]), abs=1e-4)
    assert table["cyto2"]["failed"] == 1 and table["nuclei"]["failed"] == 0
    # paper.md 3c: Cellpose-SAM's error rate on the Cellpose test set; no figure for the others.
    assert table["cyto2"]["paper_error50"] == 0.163 and table["nuclei"]["paper_error50"] is None
    markdown = benchmark.format_table(table)
    assert markdown.splitlines()[0].startswith("| group | images |") and "| nuclei | 3 | 0 |" in markdown


def test_table_of_images_without_objects_leaves_the_means_undefined():
    rows = [{"dataset": "d", "subset": "", "key": "a", "status": "ok", "n_true": 0, "n_pred": 0,
             "ap@0.5": math.nan, "ap@0.75": math.nan, "ap@0.9": math.nan, "tp@0.5": 0, "fp@0.5": 0,
             "fn@0.5": 0, "error_rate@0.5": math.nan}]
    table = summarise(rows)
    assert table["d"]["ap50"] is None and table["d"]["error50"] is None
    assert mean_row(rows)["n_true"] == 0


# ------------------------------------------------------------------------------------------------
# Command line, one process and torchrun
# ------------------------------------------------------------------------------------------------


def run_cli(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-m", "infer.benchmark"]
    if nproc > 1:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                  "-m", "infer.benchmark"]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run(prefix + args, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


@pytest.mark.slow
@pytest.mark.distributed
def test_command_line_writes_the_table_and_torchrun_gives_the_same(root, checkpoint, tmp_path):
    common = ["--shards", str(root), "--checkpoint", str(checkpoint), "--batch-size", "4", "--device", "cpu"]
    single = run_cli([*common, "--out", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-3000:]
    report = json.loads((tmp_path / "one" / "benchmark.json").read_text())
    assert set(report["datasets"]) == {"cyto2", "nuclei"} and set(report["subsets"]) == {"cyto2/cyto", "cyto2/cyto2"}
    for entry in report["datasets"].values():
        assert {"ap50", "ap75", "ap90", "error50", "images", "cells", "paper_error50"} <= set(entry)
    assert report["datasets"]["cyto2"]["images"] == 4 and report["overall"]["images"] == 7
    assert report["settings"]["diameter"] == "true" and report["settings"]["world_size"] == 1
    table = (tmp_path / "one" / "benchmark.md").read_text()
    assert table in single.stdout and "| cyto2 | 4 | 0 |" in table
    assert [r["group"] for r in csv.DictReader((tmp_path / "one" / "benchmark.csv").open())][-1] == "overall"

    double = run_cli([*common, "--out", str(tmp_path / "two")], nproc=2)
    assert double.returncode == 0, double.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "benchmark.json").read_text())["settings"]["world_size"] == 2
    one = (tmp_path / "one" / "images.csv").read_text()
    assert (tmp_path / "two" / "images.csv").read_text() == one and len(one.splitlines()) == 8


def test_command_line_usage_errors_exit_2(root, checkpoint, tmp_path, caplog, capsys):
    assert benchmark.main(["--shards", str(root), "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "none.pt: weights file not found" in caplog.text
    assert benchmark.main(["--shards", str(root), "--checkpoint", str(checkpoint), "--datasets", "livecell"]) == 2
    assert "no 'test' samples of livecell" in caplog.text
    for bad in (["--diameter", "17"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit) as stopped:
            benchmark.main(["--shards", str(root), "--checkpoint", str(checkpoint), *bad])
        assert stopped.value.code == 2
    assert "invalid choice: '17'" in capsys.readouterr().err


def test_read_ahead_passes_items_on_raises_the_readers_error_and_stops_early():
    assert list(benchmark._read_ahead(iter(range(10)), depth=2)) == list(range(10))

    def failing():
        yield 1
        raise ValueError("shard unreadable")

    with pytest.raises(ValueError, match="shard unreadable"):
        list(benchmark._read_ahead(failing()))
    # A consumer that stops after one item does not leave the reader blocked on a full queue.
    stream = benchmark._read_ahead(iter(range(100)), depth=1)
    assert next(stream) == 0
    stream.close()
