"""benchmarks/gpu_check.py: the one prepared run of the GPU checks (run here at the tiny scale)."""

import json
import os
import re
import sys
import time
import tomllib
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import Check, run_all, run_check

REPO = Path(__file__).resolve().parents[2]


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_gpu_wheels_are_the_pinned_versions():
    # `make gpu-wheels` downloads what the device's image lacks; a pin that drifts from
    # pyproject.toml would measure other code than CI tests.
    makefile = (REPO / "Makefile").read_text().replace("\\\n", " ")
    wheels = dict(re.findall(r"([\w-]+)==([\w.]+)", re.search(r"^GPU_WHEELS :=(.*)$", makefile, re.M).group(1)))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = dict(dep.split("==") for dep in project["dependencies"] + project["optional-dependencies"]["reference"])
    shared = {name: version for name, version in wheels.items() if name in pins}
    assert shared == {name: pins[name] for name in shared}
    # Every third-party package the project imports that the image lacks is among them.
    assert {"segment-anything", "webdataset", "fastremap", "zstandard", "imagecodecs", "roifile", "cellpose"} <= set(shared)


def test_a_check_that_runs_past_its_limit_is_killed_with_its_children(tmp_path):
    # torchrun's workers are the check's children: a timeout must not leave them on the GPU.
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n")
    start = time.perf_counter()
    record = run_check(Check("sleepy", _python(code), limit_s=60, min_s=0), limit_s=3, log=tmp_path / "sleepy.log")
    assert time.perf_counter() - start < 30
    assert record["status"] == "timed out after 3 s"
    child = int((tmp_path / "sleepy.log").read_text().split()[0])
    for _ in range(50):  # the kill is asynchronous; the zombie is reaped by init
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{child}/stat").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child process {child} outlived the timeout")


def test_records_results_failures_and_skips(tmp_path):
    lines = []
    checks = [
        Check("ok", _python("import json; print('warming up'); print(json.dumps({'img_s': 181.5}))"), limit_s=30, min_s=0),
        Check("broken", _python("raise SystemExit('no CUDA device')"), limit_s=30, min_s=0),
        Check("too_long", _python("pass"), limit_s=30, min_s=10_000),
    ]
    ok = run_all(checks, tmp_path, deadline=time.perf_counter() + 120, emit=lines.append)
    assert not ok
    by_name = {record["name"]: record for record in lines}
    assert by_name["ok"]["status"] == "passed" and by_name["ok"]["result"] == {"img_s": 181.5}
    assert by_name["broken"]["status"] == "failed (exit 1)"
    assert by_name["broken"]["tail"][-1] == "no CUDA device"  # the reason travels in the record
    assert by_name["too_long"]["status"].startswith("skipped")
    assert (tmp_path / "ok.log").read_text().startswith("warming up")


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_outputs_fit_what_the_device_returns(device):
    # The device tool returns at most 8 files from $OUT: gpu_check.jsonl and one log per check.
    checks = gpu_check.plan(device, Path("shards"))
    assert len(checks) + 1 <= 8
    assert len({c.name for c in checks}) == len(checks)


@pytest.mark.slow
def test_the_whole_run_at_the_tiny_scale(tmp_path):
    # The same script a lent GPU runs, on the CPU with the tiny model: env, the shards, two of
    # the benchmarks and the GPU tests (which skip here).
    code = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--only", "attention", "tests"])
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert code == 0
    assert [r["name"] for r in records] == ["env", "shards", "attention", "tests"]
    assert all(r["status"] == "passed" for r in records)
    assert records[0]["result"]["packages"]["segment-anything"] == "1.0"
    attention = records[2]["result"]
    assert attention["name"] == "attention_step" and attention["relative_difference"] < 1e-4
    assert "skipped" in records[3]["tail"][-1]  # pytest's summary: no CUDA device here
