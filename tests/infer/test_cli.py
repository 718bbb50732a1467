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
    """The last run's summary.csv rows keyed by the input's path relative to ``input_root``."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows = [row for row in rows if row["run_started"] == rows[-1]["run_started"]]  # runs append
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
        "--recursive", "--no-recursive", "--look-one-level-down", "--no-look-one-level-down",
        "--save-png", "--no-save-png", "--channel-axis", "--z-axis", "--plane",
        "--norm-percentile", "--exclude-on-edges", "--no-exclude-on-edges",
        "--do-3d", "--no-do-3d", "--anisotropy", "--flow3d-smooth", "--stitch-threshold",
        # Cellpose's spellings (hidden from the help, listed in its epilog):
        *cli.CELLPOSE_FLAGS.keys() - {"--diameter", "--niter", "--augment", "--anisotropy"},
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
    stream = cli._read_ahead(jobs, cli._Run(config, settings={}, run_started="now"))
    ((item, plane), image), _ = next(stream), next(stream)
    assert item.job is jobs[0] and plane is None and image[0, 0] == 0
    stream.close()  # the consumer stops with the reader blocked on a full queue
    assert not any(t.name == "read-ahead" for t in threading.enumerate())
    # A failure of the reader itself reaches the consumer instead of leaving it waiting.
    stream = cli._read_ahead(jobs, "not a run")
    with pytest.raises(AttributeError):
        next(stream)


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


# ------------------------------------------------------------------------------------------------
# Cellpose's habits: its flag names, search depth, reruns with other settings, stacks
# ------------------------------------------------------------------------------------------------


def test_cellpose_flag_names_parse_as_ours(monkeypatch):
    # Flags as cellpose/cli.py (4.2.1) spells them, read as Cellpose reads them: --diameter 0 is
    # Cellpose 3's "estimate it", --niter 0 the automatic 200 / rescale, --min_size -1 keeps all.
    seen = {}
    monkeypatch.setattr(cli, "run", lambda cfg: seen.setdefault("cfg", cfg) and 0)
    cli.main(["--dir", "d1", "--image_path", "x.tif", "--pretrained_model", "m.pt", "--savedir", "o",
              "--img_filter", "_img", "--look_one_level_down", "--channel_axis", "0", "--z_axis", "1",
              "--diameter", "0", "--flow_threshold", "0.3", "--cellprob_threshold", "-1.5",
              "--min_size", "-1", "--niter", "0", "--batch_size", "4", "--no_norm",
              "--norm_percentile", "2", "98", "--exclude_on_edges", "--save_png", "--save_flows",
              "--save_outlines", "--save_rois"])
    cfg = seen["cfg"]
    assert (cfg.inputs, cfg.checkpoint, cfg.out, cfg.glob) == (("d1", "x.tif"), "m.pt", "o", "*_img.*")
    assert (cfg.look_one_level_down, cfg.channel_axis, cfg.z_axis) == (True, 0, 1)
    assert cfg.save_png and cfg.save_flows and cfg.save_outlines and cfg.save_rois
    p = cfg.predict
    assert (p.diameter, p.flow_threshold, p.cellprob_threshold, p.min_size, p.niter) == ("auto", 0.3, -1.5, -1, None)
    assert (p.batch_size, p.normalize, p.norm_percentile, p.exclude_on_edges) == (4, False, (2.0, 98.0), True)
    # Our spellings of the same values give the same config.
    seen.clear()
    cli.main(["d1", "x.tif", "--checkpoint", "m.pt", "--out", "o", "--glob", "*_img.*",
              "--look-one-level-down", "--channel-axis", "0", "--z-axis", "1", "--diameter", "0",
              "--flow-threshold", "0.3", "--cellprob-threshold", "-1.5", "--min-size", "-1",
              "--niter", "0", "--batch-size", "4", "--no-normalize", "--norm-percentile", "2", "98",
              "--exclude-on-edges", "--save-png", "--save-flows", "--save-outlines", "--save-rois"])
    assert seen["cfg"] == cfg
    assert "--flow_threshold = --flow-threshold" in " = ".join(_parser().format_help().split())
    seen.clear()
    cli.main(["x.tif", "--pretrained_model", "m.pt", "--savedir", "o", "--use_gpu", "--do_3D",
              "--anisotropy", "2.5", "--flow3D_smooth", "1.5"])
    assert seen["cfg"].device == "cuda"
    assert (seen["cfg"].predict.do_3d, seen["cfg"].predict.anisotropy, seen["cfg"].predict.flow3d_smooth) == (True, 2.5, 1.5)


def test_cellpose_flags_that_disagree_or_are_missing_are_usage_errors(capsys):
    for args, message in [
        (["a.tif", "--savedir", "o"], "required: --checkpoint (or --pretrained_model)"),
        (["a.tif", "--pretrained_model", "m.pt"], "required: --out (or --savedir)"),
        (["a.tif", "--checkpoint", "m", "--out", "o", "--img_filter", "_a", "--glob", "b*"], "--img_filter and --glob"),
        (["--checkpoint", "m", "--out", "o"], "name at least one image"),
        (["a.tif", "--checkpoint", "m", "--out", "o", "--save_txt"], "unrecognized arguments: --save_txt"),
        (["a.tif", "--checkpoint", "m", "--out", "o", "--do_3D", "--stitch_threshold", "0.5"], "pick one"),
        (["a.tif", "--checkpoint", "m", "--out", "o", "--do_3D", "--plane", "1"], "plane picks one"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(args)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_search_depth_and_files_named_like_outputs(tmp_path):
    for name in ["x.tif", "a/y.tif", "a/b/z.tif", "x_cp_masks.png", "x_seg.npy", "x_flows.tif"]:
        touch(tmp_path / "in" / name)
    folder, out = tmp_path / "in", tmp_path / "out"
    assert relatives(_find_jobs([folder], out, "*", depth=0)) == ["x.tif"]  # Cellpose's default
    assert relatives(_find_jobs([folder], out, "*", depth=1)) == ["a/y.tif", "x.tif"]  # one level down
    assert relatives(_find_jobs([folder], out, "*")) == ["a/b/z.tif", "a/y.tif", "x.tif"]
    # Named on the command line, a masks file is taken and fails with the reason (never run).
    (job,) = _find_jobs([folder / "x_cp_masks.png"], out, "*")
    assert "named like a mask or an output" in job.error and "_masks.png" in job.error


def test_unusable_out_is_a_usage_error_before_the_model_loads(tmp_path, checkpoint, caplog, monkeypatch):
    write_inputs(tmp_path / "in")
    loads = []
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: loads.append(1))
    image = tmp_path / "in" / "a" / "x.tif"
    touch(tmp_path / "file")
    for out, message in [(tmp_path / "file", "is a file"), (image, "is a file"),
                         (tmp_path / "file" / "sub", "cannot be created")]:
        assert cli.main([str(image), "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
        assert message in caplog.records[-1].getMessage()
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert cli.main([str(image), "--checkpoint", str(checkpoint), "--out", str(locked / "o")]) == 2
        assert "not writable" in caplog.records[-1].getMessage()
    assert loads == []


def test_rerun_with_other_settings_redoes_and_summary_keeps_earlier_runs(tmp_path, checkpoint, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        tifffile.imwrite(folder / f"{i}.tif", generate("nuclei", (80, 90), seed=i)[0][..., 0])
    args = [str(folder), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
            "--precision", "fp32", *MASK_OPTIONS]
    caplog.set_level("INFO", logger="infer")
    assert cli.main(args) == 0
    assert cli.main(args) == 0  # same settings: skipped
    assert cli.main([*args, "--cellprob-threshold", "2.0"]) == 0  # other settings: redone
    with open(tmp_path / "out" / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["status"] for row in rows] == ["ok", "ok", "skipped", "skipped", "ok", "ok"]
    assert len({row["run_started"] for row in rows}) >= 2 and all(row["run_started"] for row in rows)
    settings = [json.loads(row["settings"]) for row in rows]
    assert [s["cellprob_threshold"] for s in settings] == [0.0] * 4 + [2.0] * 2
    assert settings[0]["checkpoint"] == str(checkpoint.resolve())
    assert rows[2]["n_cells"] == rows[0]["n_cells"] and rows[2]["size"] == "80x90"
    assert "cellprob_threshold 0.0 -> 2.0" in caplog.text
    # The masks file holds the settings that made it (Fiji: Image > Show Info).
    from pipeline.io import read_labels_info
    info = json.loads(read_labels_info(tmp_path / "out" / "0_masks.tif"))
    assert info["settings"]["cellprob_threshold"] == 2.0
    last = [r.getMessage() for r in caplog.records][-1]
    assert "2 images in" in last and "2 done, 0 skipped, 0 failed" in last


def test_an_old_summary_layout_keeps_its_rows(tmp_path, checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "x.tif", generate("nuclei", (60, 70), seed=4)[0][..., 0])
    (tmp_path / "out").mkdir()
    old = "file,size,n_cells,diameter,seconds,status,error\n/old/y.tif,10x10,3,,0.1,ok,\n"
    (tmp_path / "out" / "summary.csv").write_text(old)
    assert cli.main([str(folder), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["file"] for row in rows] == ["/old/y.tif", str(folder / "x.tif")]
    assert rows[0]["settings"] == "" and rows[1]["settings"]


@pytest.mark.parametrize("axes", ["TYX", "ZYX"])
def test_stacks_are_segmented_plane_by_plane_into_a_label_stack(tmp_path, checkpoint, axes):
    planes = np.stack([generate("nuclei", (70, 90), seed=s)[0][..., 0] for s in range(3)])
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "s.tif", planes, imagej=True, metadata={"axes": axes})
    args = [str(folder), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
            "--precision", "fp32", "--save-flows", *MASK_OPTIONS]
    assert cli.main(args) == 0
    model = load_model(checkpoint, device="cpu", dtype=torch.float32)
    options = PredictConfig(flow_threshold=0.0, min_size=0)
    expected = [predict(model, plane, options) for plane in planes]
    with tifffile.TiffFile(tmp_path / "out" / "s_masks.tif") as tif:
        assert tif.is_imagej and tif.series[0].axes == axes  # Fiji opens it as a stack
        masks = tif.asarray()
    np.testing.assert_array_equal(masks, np.stack([e.masks for e in expected]))
    flows = np.load(tmp_path / "out" / "s_flows.npy")
    assert flows.shape == (2, 3, 70, 90)  # (dy, dx) per plane, as Cellpose's dP
    np.testing.assert_allclose(flows[:, 1], expected[1].flows, atol=1e-5)
    with open(tmp_path / "out" / "summary.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["size"] == "3x70x90" and int(row["n_cells"]) == sum(len(np.unique(e.masks)) - 1 for e in expected)
    assert cli.main(args) == 0  # done: skipped
    # --plane picks one plane: 2-D masks, into another folder.
    assert cli.main([*args[:4], str(tmp_path / "one"), *args[5:], "--plane", "2"]) == 0
    np.testing.assert_array_equal(read_labels(tmp_path / "one" / "s_masks.tif"), expected[2].masks)


def test_a_plain_tiff_of_five_channels_takes_channel_axis_and_channels(tmp_path, checkpoint, caplog):
    channels = np.stack([generate("nuclei", (60, 80), seed=s)[0][..., 0] for s in range(5)])
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "five.tif", channels)  # 5 pages: a stack by the file's look
    args = [str(folder), "--checkpoint", str(checkpoint), "--precision", "fp32", *MASK_OPTIONS]
    assert cli.main([*args, "--out", str(tmp_path / "o1"), "--channel-axis", "0", "--channels", "4", "0"]) == 0
    model = load_model(checkpoint, device="cpu", dtype=torch.float32)
    expected = predict(model, channels[[4, 0]].transpose(1, 2, 0), PredictConfig(flow_threshold=0.0, min_size=0))
    np.testing.assert_array_equal(read_labels(tmp_path / "o1" / "five_masks.tif"), expected.masks)
    # Without --channels: 5 channels is too many, and the message names the flags.
    assert cli.main([*args, "--out", str(tmp_path / "o2"), "--channel-axis", "0"]) == 1
    assert "--channels" in caplog.text and "five.tif" in caplog.text


def test_exclude_on_edges_drops_masks_touching_the_border(tmp_path, checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "x.tif", generate("nuclei", (120, 140), seed=8)[0][..., 0])
    args = [str(folder), "--checkpoint", str(checkpoint), "--precision", "fp32", *MASK_OPTIONS]
    assert cli.main([*args, "--out", str(tmp_path / "all"), "--save-png"]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "inner"), "--exclude-on-edges"]) == 0
    from infer.predict import remove_edge_masks
    every = read_labels(tmp_path / "all" / "x_masks.tif")
    np.testing.assert_array_equal(read_labels(tmp_path / "inner" / "x_masks.tif"), remove_edge_masks(every))
    np.testing.assert_array_equal(read_labels(tmp_path / "all" / "x_masks.png"), every)


@pytest.mark.slow  # the 3-D mask kernels compile on first use (~40 s on cpu-2)
@pytest.mark.parametrize("mode", [["--do-3d"], ["--stitch_threshold", "0.3"]])
def test_do_3d_and_stitching_write_one_3d_label_volume(tmp_path, checkpoint, mode):
    volume = np.stack([generate("nuclei", (48, 56), seed=s)[0][..., 0] for s in range(4)])
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "v.tif", volume, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(folder / "flat.tif", volume[0])
    args = [str(folder), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
            "--precision", "fp32", "--save-flows", *MASK_OPTIONS, *mode]
    assert cli.main(args) == 1  # the 2-D image fails with its reason, the volume is done
    model = load_model(checkpoint, device="cpu", dtype=torch.float32)
    options = PredictConfig(flow_threshold=0.0, min_size=0, do_3d=mode == ["--do-3d"],
                            stitch_threshold=0.0 if mode == ["--do-3d"] else 0.3)
    expected = predict(model, volume, options)
    with tifffile.TiffFile(tmp_path / "out" / "v_masks.tif") as tif:
        assert tif.is_imagej and tif.series[0].axes == "ZYX"
        np.testing.assert_array_equal(tif.asarray(), expected.masks)
    assert np.load(tmp_path / "out" / "v_flows.npy").shape == expected.flows.shape
    rows = read_summary(tmp_path / "out" / "summary.csv", folder)
    assert rows["v.tif"]["status"] == "ok" and rows["v.tif"]["size"] == "4x48x56"
    assert rows["flat.tif"]["status"] == "failed" and "2-D image" in rows["flat.tif"]["error"]
