"""benchmarks.bench_loader: the chi-square of the mix, and one short real run on a small root."""

import json

import pytest

from benchmarks import bench_loader


def test_chi_square_accepts_the_weights_and_rejects_another_mix():
    weights = {"a": 0.5, "b": 0.3, "c": 0.2, "rare": 0.0001}
    assert bench_loader.chi_square({"a": 500, "b": 300, "c": 200}, weights)[0] > 0.5
    assert bench_loader.chi_square({"a": 300, "b": 500, "c": 200}, weights)[0] < 1e-6
    # A group expected fewer than 5 times is pooled with the others like it, not tested alone.
    assert bench_loader.chi_square({"a": 500, "b": 300, "c": 199, "rare": 1}, weights)[1]["bins"] == 4


@pytest.mark.slow
def test_a_short_run_reports_the_issue_s_figures(tmp_path):
    from shardgen.build import build_dataset

    src = tmp_path / "src"
    src.mkdir()
    (src / "counts.txt").write_text("train 8\ntest 1\n")
    build_dataset("synthetic", src, tmp_path / "shards")
    out = tmp_path / "loader.json"
    bench_loader.main(["--config", "configs/tiny-cpu.yaml", f"data.root={tmp_path / 'shards'}",
                       "data.batch_size=2", "--workers", "1", "--batches", "3", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["samples_per_s_per_core"] > 0 and 0 <= report["freq_pvalue"] <= 1
    # tiny-cpu's crop is 256 px and the synthetic images 256 px: a window is at most the image.
    assert 0 < report["device_bytes_per_sample"] <= 256 * 256 * 15 + 2048
    assert 0 < report["host_peak_gib_per_rank"] < 8
    assert sum(report["counts"].values()) == 6
