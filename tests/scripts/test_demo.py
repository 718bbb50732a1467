"""scripts/demo.py (``make demo``) end to end with a short training time: synthetic shards ->
torchrun on 2 CPU processes -> the benchmark table of the held-out split -> infer on its images
-> figure. Checks that every stage left what the README promises, not how well a 20-second model
segments."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.io import read_image, read_labels
from pipeline.weights import from_cellpose

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_runs_the_whole_chain(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--out", str(out), "--minutes", "0.3",
         "--n-train", "12", "--n-test", "5",
         "loop.log_every=2"],  # a loss record even when a loaded machine runs few steps in 0.3 min
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # 1. Shards, verified.
    assert (out / "shards" / "manifest.parquet").is_file()
    # 2. The run: logs with a validation point, the export in Cellpose's layout with its config.
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records) and any("loss" in r for r in records)
    exported = torch.load(out / "run" / "model_cellpose.pt", map_location="cpu", weights_only=True)
    assert from_cellpose(exported).cfg.encoder == "tiny"
    # 3. The paper's table from the shards' test split, printed, and per kind of image.
    report = json.loads((out / "benchmark" / "benchmark.json").read_text())
    assert report["datasets"]["synthetic"]["images"] == 5 and report["settings"]["split"] == "test"
    assert (out / "benchmark" / "benchmark.md").read_text() in result.stdout
    rows = list(csv.DictReader((out / "benchmark" / "images.csv").open()))
    assert len(rows) == 5 and all(r["status"] == "ok" for r in rows)
    summary = {r["kind"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert int(summary["all"]["images"]) == 5
    assert float(summary["all"]["ap@0.5"]) == pytest.approx(np.mean([float(r["ap@0.5"]) for r in rows]))
    assert float(summary["all"]["ap@0.5"]) == pytest.approx(report["overall"]["ap50"], abs=1e-4)
    assert "AP@0.5" in result.stdout and "all" in result.stdout
    # 4. One mask TIFF and overlay per held-out image, the same size as the image.
    images = sorted((out / "test" / "images").glob("*.tif"))
    assert sorted(p.stem for p in images) == sorted(r["key"] for r in rows)
    for image_path in images:
        masks = read_labels(out / "predictions" / f"{image_path.stem}_masks.tif")
        assert masks.shape == read_image(image_path).shape[:2]
        assert (out / "predictions" / f"{image_path.stem}_outlines.png").is_file()
    # 5. The figure: one panel per kind present, wider than tall.
    figure = read_image(out / "demo.png")
    assert figure.shape[1] > 3 * figure.shape[0] / 2 and figure.shape[2] == 3
