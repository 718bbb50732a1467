"""scripts/finetune.py (``make finetune``) end to end on a small Cellpose-style folder: the
folder to shards, the held-out images scored before and after, training from the given export
with configs/finetune.yaml as one plain process, finetune.json. Checks the stages and the
contract, not how well a two-step model segments (docs/BENCHMARKS.md has the learning figures)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from infer.outputs import seg_record, write_seg
from pipeline.model import ModelConfig
from pipeline.synthetic import generate
from pipeline.weights import EXPORT_NAME, build_model, read_export, write_export

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import finetune  # noqa: E402


def run_finetune(*args, timeout=900):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "finetune.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def cellpose_folder(root: Path, n: int = 6) -> Path:
    """``n`` synthetic nucleus images as a Cellpose user keeps them: _img/_masks pairs and, for
    the last one, the GUI's _seg.npy beside a plain image."""
    root.mkdir(parents=True)
    for index in range(n):
        image, labels = generate("nuclei", (96, 112), seed=index)
        if index < n - 1:
            tifffile.imwrite(root / f"{index:03d}_img.tif", image[..., 0])
            tifffile.imwrite(root / f"{index:03d}_masks.tif", labels.astype(np.uint16))
        else:
            tifffile.imwrite(root / f"{index:03d}.tif", image[..., 0])
            zeros = np.zeros((2, *labels.shape), np.float32)
            write_seg(root / f"{index:03d}_seg.npy", seg_record(root / f"{index:03d}.tif", labels, zeros, zeros[0], None))
    return root


@pytest.mark.slow
def test_finetune_runs_every_stage_from_an_export(tmp_path):
    data = cellpose_folder(tmp_path / "data")
    torch.manual_seed(0)
    init_model = build_model(ModelConfig(encoder="tiny"))
    init = tmp_path / "init" / EXPORT_NAME
    init.parent.mkdir()
    write_export(init, init_model.state_dict(), ModelConfig(encoder="tiny"), step=5)
    out = tmp_path / "out"
    result = run_finetune("--data", data, "--init", init, "--out", out, "--workers", "0",
                          "loop.max_steps=2", "loop.val_every=0", "data.num_workers=0", "parallel.mixed_precision=fp32")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary = json.loads((out / "finetune.json").read_text())
    assert {"ap50_before", "ap50_after", "n_train", "n_test"} <= set(summary)
    assert (summary["n_train"], summary["n_test"]) == (5, 1)  # 20% of 6, held out by name
    assert all(0.0 <= summary[key] <= 1.0 for key in ("ap50_before", "ap50_after"))
    assert summary["steps"] == 2 and "AP@0.5" in result.stdout and "before" in result.stdout
    # Trained from the export, in its shape (tiny, from its json): the config says vit_l.
    config = json.loads((out / "run" / "config.json").read_text())
    assert config["model"]["init_checkpoint"] == str(init) and config["model"]["encoder"] == "tiny"
    assert config["data"]["samples_per_epoch"] == 8  # min(800, max(8, 5))
    model, sidecar = read_export(out / "run" / EXPORT_NAME)
    assert sidecar.step == 2 and model.cfg.encoder == "tiny"
    # Step 0 of the warm-up has learning rate 0 and step 1 a tiny one: the weights moved from the
    # export's, and only a little (a fresh random init would be far away).
    start = init_model.state_dict()
    moved = [float((model.state_dict()[k] - start[k]).abs().max()) for k in start if k.startswith("encoder.blocks")]
    assert 0 < max(moved) < 1e-3
    # The held-out image's predictions, before and after.
    assert len(list((out / "before" / "predictions").glob("*_masks.tif"))) == 1
    assert len(list((out / "after" / "predictions").glob("*_masks.tif"))) == 1


def test_folder_without_pairs_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    tifffile.imwrite(data / "lonely.tif", np.zeros((8, 8), np.uint8))
    (data / "notes.txt").write_text("no labels here")
    init = tmp_path / "cpsam"
    init.write_bytes(b"not used")
    with pytest.raises(SystemExit, match="(?s)no usable image/label pairs.*lonely.tif has no labels"):
        finetune.main(["--data", str(data), "--init", str(init), "--out", str(tmp_path / "out")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="(?s)no images or labels found.*an empty folder"):
        finetune.main(["--data", str(empty), "--init", str(init), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "shards").exists()  # nothing was built
