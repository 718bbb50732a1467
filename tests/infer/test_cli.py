"""Tests for ``python -m infer`` (infer/cli.py): the option list, finding and sharing files, and
end-to-end runs in real subprocesses with a randomly initialised tiny CP-SAM: outputs that Fiji,
napari and PIL open, skip-if-done, --overwrite, a bad file, nothing written outside --out, and
torchrun splitting the files over two ranks."""

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import roifile
import tifffile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from infer import cli
from infer.cli import _find_jobs, _parser, _share
from infer.predict import PredictConfig, load_model, predict
from pipeline.io import read_labels
from pipeline.model import ModelConfig
from pipeline.weights import build_model, to_cellpose
from pipeline.synthetic import generate

REPO = Path(__file__).resolve().parents[2]
# A random tiny model finds masks only with the flow-error check and the size filter off.
MASK_OPTIONS = ["--flow-threshold", "0", "--min-size", "0"]
ALL_OUTPUTS = ["--save-flows", "--save-outlines", "--save-rois"]
# The inputs write_inputs makes (relative to its root) and their sizes; a/bad.tif is corrupt.
GOOD_INPUTS = {"a/x.tif": "200x300", "b/x.png": "120x150", "b/y.npy": "90x300",
               "b/sub/z.jpg": "64x80"}


def run_infer(args, cwd, launcher=(sys.executable, "-m", "infer")):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [*launcher, *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def read_summary(path, input_root) -> dict:
    """summary.csv rows keyed by the input's path relative to ``input_root``."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {Path(row["file"]).relative_to(input_root).as_posix(): row for row in rows}


def snapshot(root: Path, skip: Path | None = None) -> dict:
    """Every file under ``root`` (except under ``skip``) -> (size, mtime_ns)."""
    return {
        path.relative_to(root): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file() and (skip is None or not path.is_relative_to(skip))
    }


def touch(path: Path, content=b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def write_inputs(root: Path) -> None:
    """Real files: a 1-channel TIFF, an RGB PNG, a 2-channel NPY, a JPEG, and a corrupt TIFF."""
    (root / "a").mkdir(parents=True)
    (root / "b" / "sub").mkdir(parents=True)
    tifffile.imwrite(root / "a" / "x.tif", generate("nuclei", (200, 300), seed=0)[0][..., 0])
    Image.fromarray(generate("he", (120, 150), seed=1)[0]).save(root / "b" / "x.png")
    np.save(root / "b" / "y.npy", generate("cyto", (90, 300), seed=2)[0])
    jpeg = Image.fromarray(generate("he", (64, 80), seed=3)[0])
    jpeg.save(root / "b" / "sub" / "z.jpg", quality=90)
    touch(root / "a" / "bad.tif", b"II*\x00 this is not really a TIFF")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny model, exported as the trainer does: Cellpose layout plus <stem>.json."""
    folder = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="tiny"))
    torch.save(to_cellpose(model), folder / "model_cellpose.pt")
    meta = {"model": {"encoder": "tiny"}, "step": 1}
    (folder / "model_cellpose.json").write_text(json.dumps(meta))
    return folder / "model_cellpose.pt"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, checkpoint):
    """One full run with every output asked for; returns (root, result, snapshot before)."""
    root = tmp_path_factory.mktemp("run")
    write_inputs(root / "in")
    (root / "cwd").mkdir()
    before = snapshot(root)
    args = ["../in", "--checkpoint", checkpoint, "--out", "../out", *ALL_OUTPUTS, *MASK_OPTIONS]
    return root, run_infer(args, cwd=root / "cwd"), before


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------


def test_option_list_is_pinned():
    # Every option is a field of InferConfig or PredictConfig; adding one must change this list.
    options = sorted(s for action in _parser()._actions for s in action.option_strings)
    assert options == sorted([
        "-h", "--help", "--checkpoint", "--out", "--glob", "--overwrite", "--no-overwrite",
        "--save-flows", "--no-save-flows", "--save-outlines", "--no-save-outlines", "--save-rois",
        "--no-save-rois", "--save-seg", "--no-save-seg", "--channels", "--device", "--precision", "--diameter", "--augment", "--no-augment",
        "--tile-overlap", "--batch-size", "--normalize", "--no-normalize", "--niter",
        "--cellprob-threshold", "--flow-threshold", "--min-size", "--max-size-fraction",
    ])


def test_options_parse_into_the_configs(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "run", lambda cfg: seen.setdefault("cfg", cfg) and 0)
    cli.main(["a.tif", "dir", "--checkpoint", "m.pt", "--out", "o", "--diameter", "17.5",
              "--augment", "--tile-overlap", "0.2", "--niter", "300", "--channels", "2", "0",
              "--no-normalize", "--precision", "fp32"])
    cfg = seen["cfg"]
    assert cfg.precision == "fp32"
    assert cfg.inputs == ("a.tif", "dir")
    assert (cfg.checkpoint, cfg.out, cfg.channels, cfg.overwrite) == ("m.pt", "o", (2, 0), False)
    p = cfg.predict
    assert (p.diameter, p.augment, p.tile_overlap, p.niter) == (17.5, True, 0.2, 300)
    assert (p.normalize, p.compute_masks) == (False, True)
    help_text = _parser().format_help()
    assert "Typical cell diameter in pixels" in help_text and "50%-overlapping" in help_text


def test_bad_option_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["a.tif", "--checkpoint", "m.pt", "--out", "o", "--tile-overlap", "0.9"])
    assert exit_info.value.code == 2
    assert "tile_overlap must be in [0.05, 0.5]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["a.tif", "--checkpoint", "m.pt", "--out", "o", "--precision", "fp16"])
    assert exit_info.value.code == 2
    assert "precision: one of auto, bf16, fp32; got 'fp16'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["a.tif", "--checkpoint", "m.pt", "--out", "o", "--diameter", "big"])
    assert exit_info.value.code == 2
    assert "argument --diameter: invalid float or auto value: 'big'" in capsys.readouterr().err


def test_diameter_takes_a_number_or_auto(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "run", lambda cfg: seen.append(cfg.predict.diameter) or 0)
    for value in ("auto", "12", "0.5e2"):
        cli.main(["a.tif", "--checkpoint", "m.pt", "--out", "o", "--diameter", value])
    assert seen == ["auto", 12.0, 50.0]


# ------------------------------------------------------------------------------------------------
# Finding and sharing files (in process)
# ------------------------------------------------------------------------------------------------


def relatives(jobs) -> list[str]:
    return [job.relative.as_posix() for job in jobs]


def test_outputs_mirror_folders_below_the_common_folder(tmp_path):
    for name in ["data/a/x.tif", "data/b/x.tif", "data/b/deep/y.png", "other/z.npy"]:
        touch(tmp_path / name)
    out = tmp_path / "out"
    inputs = [tmp_path / "data/a", tmp_path / "data/b", tmp_path / "other/z.npy"]
    jobs = _find_jobs(inputs, out, "*")
    assert relatives(jobs) == ["data/a/x.tif", "data/b/deep/y.png", "data/b/x.tif", "other/z.npy"]
    assert all(job.error is None for job in jobs)
    # One folder: paths below it. One file: its name.
    assert relatives(_find_jobs([tmp_path / "data"], out, "*")) == ["a/x.tif", "b/deep/y.png",
                                                                    "b/x.tif"]
    assert relatives(_find_jobs([tmp_path / "data/a/x.tif"], out, "*")) == ["x.tif"]


def test_inputs_that_would_write_the_same_outputs_fail(tmp_path):
    for name in ["x.tif", "x.png", "y.tif"]:
        touch(tmp_path / "in" / name)
    jobs = {job.relative.name: job for job in _find_jobs([tmp_path / "in"], tmp_path / "o", "*")}
    assert jobs["y.tif"].error is None
    assert "same outputs as" in jobs["x.tif"].error and "x.png" in jobs["x.tif"].error
    assert "x.tif" in jobs["x.png"].error


def test_search_skips_out_hidden_unsupported_labels_and_respects_glob(tmp_path):
    names = ["x.tif", ".hidden.tif", ".git/y.tif", "notes.txt", "out/v.tif", "c/w.TIF",
             "x_masks.png", "y_labels.tif", "x_flows.tif", "x_seg.npy", "x_outlines.png"]
    for name in names:
        touch(tmp_path / "in" / name)
    out = tmp_path / "in" / "out"
    assert relatives(_find_jobs([tmp_path / "in"], out, "*")) == ["c/w.TIF", "x.tif"]
    assert relatives(_find_jobs([tmp_path / "in"], out, "x*")) == ["x.tif"]
    # A file named explicitly is taken whatever its type (and fails later with a clear reason).
    assert relatives(_find_jobs([tmp_path / "in/notes.txt"], out, "*")) == ["notes.txt"]
    assert relatives(_find_jobs([tmp_path / "in/x_masks.png"], out, "*")) == ["x_masks.png"]
    # Outputs beside the images (--out is the folder): the images are found, the outputs not.
    found = relatives(_find_jobs([tmp_path / "in"], tmp_path / "in", "*"))
    assert found == ["c/w.TIF", "out/v.tif", "x.tif"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=0, max_size=25), st.integers(1, 5))
def test_sharing_is_disjoint_complete_and_deterministic(tmp_path_factory, sizes, world_size):
    folder = tmp_path_factory.mktemp("share")
    for i, size in enumerate(sizes):
        touch(folder / f"f{i:02d}.tif", b"x" * size)
    jobs = _find_jobs([folder], folder / "out", "*")
    shares = [_share(jobs, rank, world_size) for rank in range(world_size)]
    names = [job.relative for share in shares for job in share]
    assert sorted(names) == sorted(job.relative for job in jobs) and len(set(names)) == len(names)
    assert shares == [_share(jobs, rank, world_size) for rank in range(world_size)]
    if world_size > 1 and len(sizes) >= world_size:
        # Largest-first greedy: no rank carries more than the lightest one plus the largest file.
        loads = [sum(job.path.stat().st_size for job in share) for share in shares]
        assert max(loads) - min(loads) <= max(sizes)


# ------------------------------------------------------------------------------------------------
# End to end, in subprocesses (and a few in process, where a subprocess adds nothing)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_writes_outputs_that_viewers_open(first_run):
    root, result, _ = first_run
    out = root / "out"
    assert result.returncode == 1, result.stderr  # one bad file
    summary = read_summary(out / "summary.csv", root / "in")
    assert set(summary) == {"a/bad.tif", *GOOD_INPUTS}
    for name, size in GOOD_INPUTS.items():
        row = summary[name]
        assert (row["status"], row["size"], row["error"]) == ("ok", size, "")
        assert float(row["seconds"]) > 0
    for name in GOOD_INPUTS:
        stem = name.rsplit(".", 1)[0]  # outputs mirror the input's folders: out/b/sub/z_masks.tif
        with tifffile.TiffFile(out / f"{stem}_masks.tif") as tif:  # what Fiji and napari read
            assert tif.is_imagej
            masks = tif.asarray()
        assert masks.dtype == np.uint16
        labels = sorted(set(np.unique(masks)) - {0})
        assert len(labels) == int(summary[name]["n_cells"])
        rois = roifile.roiread(out / f"{stem}_rois.zip")
        assert sorted(int(roi.name) for roi in rois) == labels  # one polygon per mask
        with Image.open(out / f"{stem}_outlines.png") as png:
            assert png.mode == "RGB" and png.size == masks.shape[::-1]
        flows = np.load(out / f"{stem}_flows.npy")
        cellprob = np.load(out / f"{stem}_cellprob.npy")
        assert flows.shape == (2, *masks.shape) and cellprob.shape == masks.shape
        assert flows.dtype == cellprob.dtype == np.float32
    assert sum(int(summary[name]["n_cells"]) for name in GOOD_INPUTS) > 0  # ROIs were checked


@pytest.mark.slow
def test_bad_file_gets_one_error_line_and_the_rest_go_on(first_run):
    root, result, _ = first_run
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, result.stderr
    assert "bad.tif" in errors[0] and "TIFF" in errors[0]
    row = read_summary(root / "out" / "summary.csv", root / "in")["a/bad.tif"]
    assert row["status"] == "failed" and "TIFF" in row["error"]
    assert not (root / "out" / "a" / "bad_masks.tif").exists()


@pytest.mark.slow
def test_nothing_is_written_outside_out(first_run):
    root, _, before = first_run
    assert snapshot(root, skip=root / "out") == before  # inputs and cwd untouched
    assert not any((root / "cwd").iterdir())
    temporaries = [p for p in (root / "out").rglob("*") if p.name.startswith(".")]
    assert not temporaries


@pytest.mark.slow
def test_rerun_skips_done_files_and_overwrite_redoes_them(first_run, checkpoint, tmp_path):
    root, _, _ = first_run
    # Work on a copy so the other tests see the first run's files.
    shutil.copytree(root / "in", tmp_path / "in")
    shutil.copytree(root / "out", tmp_path / "out")
    args = ["in", "--checkpoint", checkpoint, "--out", "out", *ALL_OUTPUTS, *MASK_OPTIONS]
    summary_path = tmp_path / "out" / "summary.csv"
    outputs_before = snapshot(tmp_path / "out", skip=summary_path)

    skipped = run_infer(args, cwd=tmp_path)
    assert skipped.returncode == 1  # the bad file still fails
    summary = read_summary(summary_path, tmp_path / "in")
    assert {name: row["status"] for name, row in summary.items()} == {
        "a/bad.tif": "failed", **dict.fromkeys(GOOD_INPUTS, "skipped")}
    first = read_summary(root / "out" / "summary.csv", root / "in")
    assert all(summary[name]["n_cells"] == first[name]["n_cells"] for name in GOOD_INPUTS)
    assert snapshot(tmp_path / "out", skip=summary_path) == outputs_before

    (tmp_path / "in" / "a" / "bad.tif").unlink()
    redone = run_infer([*args, "--overwrite"], cwd=tmp_path)
    assert redone.returncode == 0, redone.stderr
    summary = read_summary(summary_path, tmp_path / "in")
    statuses = {name: row["status"] for name, row in summary.items()}
    assert statuses == dict.fromkeys(GOOD_INPUTS, "ok")
    after = snapshot(tmp_path / "out", skip=summary_path)
    assert after.keys() == outputs_before.keys()
    assert all(after[path][1] != outputs_before[path][1] for path in after)  # all rewritten
    masks = read_labels(tmp_path / "out" / "a" / "x_masks.tif")
    np.testing.assert_array_equal(masks, read_labels(root / "out" / "a" / "x_masks.tif"))


@pytest.mark.slow
def test_missing_checkpoint_fails_before_any_file(tmp_path):
    write_inputs(tmp_path / "in")
    result = run_infer(["in", "--checkpoint", "nowhere/model.pt", "--out", "out"], cwd=tmp_path)
    assert result.returncode == 2
    assert "nowhere/model.pt" in result.stderr and "not found" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_input_or_unloadable_checkpoint_fail_before_any_file(tmp_path, checkpoint, caplog):
    write_inputs(tmp_path / "in")
    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    missing = str(tmp_path / "missing.tif")
    assert cli.main([inputs, missing, "--checkpoint", str(checkpoint), "--out", out]) == 2
    assert "missing.tif" in caplog.text and not Path(out).exists()
    # An image is not a checkpoint: the loader's error names it, and nothing is written.
    image = str(tmp_path / "in" / "a" / "x.tif")
    assert cli.main([inputs, "--checkpoint", image, "--out", out]) == 2
    assert "x.tif" in caplog.records[-1].getMessage() and not Path(out).exists()


def test_unusable_device_is_a_usage_error(tmp_path, checkpoint, caplog):
    write_inputs(tmp_path / "in")
    args = [str(tmp_path / "in"), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")]
    assert cli.main([*args, "--device", "tpu:7"]) == 2
    assert "tpu:7" in caplog.text and not (tmp_path / "o").exists()
    if not torch.cuda.is_available():
        assert cli.main([*args, "--device", "cuda"]) == 2
        assert "no CUDA GPU" in caplog.text


def test_folder_without_images_is_an_error(tmp_path, checkpoint, caplog):
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty"), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")]
    assert cli.main(args) == 2
    assert "no images" in caplog.text


def test_collisions_and_unsupported_files_fail_alone(tmp_path, checkpoint, caplog):
    image = generate("nuclei", (40, 50), seed=5)[0][..., 0]
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "x.tif", image)
    Image.fromarray((image // 256).astype(np.uint8)).save(tmp_path / "in" / "x.png")
    tifffile.imwrite(tmp_path / "in" / "w.tif", image)
    (tmp_path / "notes.txt").write_text("hello")
    status = cli.main([str(tmp_path / "in"), str(tmp_path / "notes.txt"), "--checkpoint",
                       str(checkpoint), "--out", str(tmp_path / "out"), *MASK_OPTIONS])
    assert status == 1
    rows = read_summary(tmp_path / "out" / "summary.csv", tmp_path)
    assert rows["in/w.tif"]["status"] == "ok"
    assert rows["in/x.tif"]["status"] == rows["in/x.png"]["status"] == "failed"
    assert "same outputs" in rows["in/x.tif"]["error"]
    assert rows["notes.txt"]["status"] == "failed"
    assert "unsupported file type" in rows["notes.txt"]["error"]
    assert not (tmp_path / "out" / "in" / "x_masks.tif").exists()
    assert (tmp_path / "out" / "in" / "w_masks.tif").exists()
    error_lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(error_lines) == 3 and all(str(tmp_path) in line for line in error_lines)


def test_streamed_run_writes_what_each_image_gives_alone_in_file_order(tmp_path, checkpoint):
    # Files read ahead by a thread and streamed through predict_stream (tiles pooled across
    # images on a GPU; tests/infer/test_predict.py covers pooling): each image's masks are those
    # of predict() on that image alone, and the summary rows keep the files' order, a failed
    # file in its place.
    folder = tmp_path / "in"
    folder.mkdir()
    images = {f"{i}.tif": generate("nuclei", shape, seed=i)[0][..., 0]
              for i, shape in enumerate([(60, 70), (300, 280), (100, 100), (256, 300), (80, 90)])}
    for name, image in images.items():
        tifffile.imwrite(folder / name, image)
    touch(folder / "2b.tif", b"II*\x00 not a TIFF")
    status = cli.main([str(folder), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
                       "--batch-size", "3", "--precision", "fp32", *MASK_OPTIONS])
    assert status == 1
    with open(tmp_path / "out" / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [Path(row["file"]).name for row in rows] == sorted([*images, "2b.tif"])
    assert [row["status"] for row in rows] == ["ok", "ok", "ok", "failed", "ok", "ok"]
    model = load_model(checkpoint, device="cpu", dtype=torch.float32)
    options = PredictConfig(flow_threshold=0.0, min_size=0, batch_size=3)
    for name, image in images.items():
        expected = predict(model, image, options).masks
        np.testing.assert_array_equal(read_labels(tmp_path / "out" / name.replace(".tif", "_masks.tif")), expected)


def test_auto_diameter_is_estimated_per_image_and_reported(tmp_path, checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    images = {f"{i}.tif": generate("nuclei", shape, seed=i, diameter=diameter)[0][..., 0]
              for i, (shape, diameter) in enumerate([((200, 220), 12.0), ((260, 240), 40.0)])}
    for name, image in images.items():
        tifffile.imwrite(folder / name, image)
    status = cli.main([str(folder), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
                       "--diameter", "auto", "--precision", "fp32", *MASK_OPTIONS])
    assert status == 0
    with open(tmp_path / "out" / "summary.csv", newline="") as fh:
        rows = {Path(row["file"]).name: row for row in csv.DictReader(fh)}
    model = load_model(checkpoint, device="cpu", dtype=torch.float32)
    options = PredictConfig(diameter="auto", flow_threshold=0.0, min_size=0)
    for name, image in images.items():
        expected = predict(model, image, options)
        assert expected.diameter is not None  # the random tiny model finds some masks here
        assert rows[name]["diameter"] == f"{expected.diameter:.2f}"
        np.testing.assert_array_equal(read_labels(tmp_path / "out" / name.replace(".tif", "_masks.tif")), expected.masks)


def test_read_ahead_thread_ends_when_the_consumer_stops(tmp_path):
    files = [tifffile.imwrite(tmp_path / f"{i}.tif", np.full((20, 20), i, np.uint16)) or tmp_path / f"{i}.tif"
             for i in range(20)]
    jobs = [cli._Job(path, Path(path.name)) for path in files]
    config = cli.InferConfig(inputs=(str(tmp_path),), checkpoint="unused", out=str(tmp_path / "out"))
    stream = cli._read_ahead(jobs, config)
    (item, image), _ = next(stream), next(stream)
    assert item.job is jobs[0] and image[0, 0] == 0
    stream.close()  # the consumer stops with the reader blocked on a full queue
    assert not any(t.name == "read-ahead" for t in threading.enumerate())


def test_outputs_beside_the_images_are_not_taken_as_inputs(tmp_path, checkpoint):
    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "x.tif", generate("nuclei", (60, 70), seed=6)[0][..., 0])
    args = [str(folder), "--checkpoint", str(checkpoint), "--out", str(folder), *ALL_OUTPUTS]
    assert cli.main(args) == 0
    assert cli.main(args) == 0  # the second run skips x.tif and sees none of its outputs
    rows = read_summary(folder / "summary.csv", folder)
    assert {name: row["status"] for name, row in rows.items()} == {"x.tif": "skipped"}
    assert not list(folder.glob("*_masks_*"))


def test_save_seg_writes_what_cellpose_loads_as_training_labels(tmp_path, checkpoint):
    # The GUI loop: our <name>_seg.npy beside the image is what Cellpose 4 itself trains from
    # (cellpose.io.load_train_test_data with --mask_filter _seg.npy), with our masks inside.
    io = pytest.importorskip("cellpose.io")
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(2):
        tifffile.imwrite(folder / f"img{index}.tif", generate("nuclei", (80, 96), seed=index)[0][..., 0])
    args = [str(folder), "--checkpoint", str(checkpoint), "--out", str(folder), "--save-seg", *MASK_OPTIONS]
    assert cli.main(args) == 0
    images, labels, names, *_ = io.load_train_test_data(str(folder), mask_filter="_seg.npy")
    assert [Path(name).name for name in names] == ["img0.tif", "img1.tif"]
    for name, label in zip(names, labels):
        ours = read_labels(Path(name).with_name(Path(name).stem + "_masks.tif"))
        np.testing.assert_array_equal(label, ours)
        assert label.max() > 0  # the random model's masks are not all empty: a real comparison
    record = np.load(folder / "img0_seg.npy", allow_pickle=True).item()
    assert record["filename"] == str(folder / "img0.tif")
    assert cli.main(args) == 0  # the second run finds the _seg.npy and skips
    assert read_summary(folder / "summary.csv", folder)["img0.tif"]["status"] == "skipped"


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_splits_files_over_ranks(tmp_path, checkpoint):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this python")
    write_inputs(tmp_path / "in")
    for seed in range(3):  # a few more files, so that both ranks have work
        image = generate("nuclei", (80, 90), seed=10 + seed)[0][..., 0]
        tifffile.imwrite(tmp_path / "in" / f"extra{seed}.tif", image)
    launcher = (str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "infer")
    args = ["in", "--checkpoint", checkpoint, "--out", "out", *MASK_OPTIONS]
    result = run_infer(args, cwd=tmp_path, launcher=launcher)
    assert result.returncode != 0  # the bad file
    with open(tmp_path / "out" / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    files = [row["file"] for row in rows]
    assert len(files) == len(set(files)) == 8  # every file exactly once: the shares are disjoint
    assert files == sorted(files)
    assert [row["status"] for row in rows].count("failed") == 1
    assert not list((tmp_path / "out").glob("summary_rank*.csv"))  # merged and removed
    assert len(list((tmp_path / "out").rglob("*_masks.tif"))) == 7
    # Both ranks had work (the split depends only on the file sizes).
    jobs = _find_jobs([tmp_path / "in"], tmp_path / "out", "*")
    assert all(_share(jobs, rank, 2) for rank in range(2))
