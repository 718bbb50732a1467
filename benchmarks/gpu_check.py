"""Issue 4's GPU figures in one prepared run, sized for a lent H100/H200.

    python -m benchmarks.gpu_check --out DIR [--budget 480] [--only NAME ...] [--device cuda]

A lent GPU comes with about 15 minutes of device time for a whole session, start-up included,
and at most 10 minutes per command, so the checks run as one command that fits in 8 minutes and
leaves time to run it again. The device's image has PyTorch but not the rest of this project's
dependencies; those travel as wheels, which ``make gpu-wheels`` downloads into ``.whl/`` here.
On the device tool (docs/BENCHMARKS.md, "GPU checks"):

    python3 -m pip install -q --no-index --no-deps .whl/*.whl &&
    PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out $OUT      (carry: .whl)

The checks, most needed first; each runs as a subprocess with its own time limit, cut to what is
left of ``--budget`` seconds, and is skipped (and recorded as skipped) when less than its minimum
is left:

    env        Python, torch, CUDA, the GPU and the project's packages: read in this process
    shards     synthetic training shards, built once for the three benchmarks that read them
    train      bench_train: the real trainer, configs/paper.yaml (ViT-L, bf16, 256 x 256) on one
               GPU, per-rank batch 32, 60 steps (goal: >= 280 img/s per H100, about 50% MFU)
    attention  bench_attention: ViT-L forward + backward at batch 32, the fused attention
               against segment-anything's own forward (the reference)
    augment    bench_augment: the GPU-side augmentation against the step it feeds, batch 32
    infer      bench_infer: a 2048 x 2048 image through infer.predict and through Cellpose 4's
               CellposeModel.eval (the reference), same ViT-L weights, batch 32
    infer_many bench_infer_many: 64 small images, tiles pooled across images and masks beside
               the network, against one image at a time and Cellpose 4's eval(list), batch 32
    tests      pytest -m gpu: the tests that need a CUDA device
    compile    bench_train as ``train`` with parallel.compile=true

Writes ``DIR/gpu_check.jsonl`` (one record per check: name, status, seconds, the command, and the
benchmark's JSON result when it printed one) and ``DIR/<name>.log`` (each check's output), and
prints each record as it comes. Exit status 1 if a check that ran failed or timed out.

``--device cpu`` runs the same checks at the tiny scale (the tiny model, a few steps), to check
this script on a machine without a GPU; its figures mean nothing.
"""

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.bench_train import make_shards, python_path

REPO = Path(__file__).resolve().parents[1]
# The packages whose versions the env record lists (the device's image brings its own torch).
PACKAGES = ("torch", "torchvision", "numpy", "numba", "segment-anything", "webdataset", "fastremap",
            "zstandard", "pyarrow", "imagecodecs", "tifffile", "roifile", "cellpose")


@dataclass(frozen=True)
class Check:
    """One subprocess: ``command`` run from the repository root, stopped after ``limit_s``."""

    name: str
    command: list[str]
    limit_s: float
    min_s: float
    """Skip the check when less than this is left of the budget (it could not finish)."""


def plan(device: str, shards: Path) -> list[Check]:
    """The checks after ``env`` and ``shards``, in the order they run."""
    module = [sys.executable, "-m"]
    data = ["--shards", str(shards)]
    if device == "cuda":
        # The paper's per-GPU batch. 64 would not fit an H100 for sure: the tensors autograd keeps
        # for ViT-L at 256 x 256 in bf16 come to about 1.2 GiB per image with the fused attention
        # (counted on the CPU; 1.8 GiB with segment-anything's), before the optimizer's 4.9 GB.
        train = ["--config", "configs/paper.yaml", "--nproc", "1", "--steps", "60", *data,
                 "model.sam_checkpoint=null", "data.batch_size=32", "loop.global_batch=32", "data.num_workers=8"]
        attention = ["--encoder", "vit_l", "--batch", "32", "--repeats", "5", "--device", "cuda"]
        augment = ["--config", "configs/paper.yaml", "--device", "cuda", *data,
                   "model.sam_checkpoint=null", "data.batch_size=32", "loop.global_batch=32"]
        infer = ["--device", "cuda", "--size", "2048", "--batch-size", "32"]
        infer_many = ["--device", "cuda", "--limit", "64", "--batch-size", "32"]
    else:
        train = ["--config", "configs/tiny-cpu.yaml", "--nproc", "1", "--steps", "8", *data,
                 "data.batch_size=2", "loop.global_batch=2", "data.num_workers=0"]
        attention = ["--encoder", "tiny", "--batch", "2", "--repeats", "2", "--device", "cpu"]
        augment = ["--config", "configs/tiny-cpu.yaml", "--device", "cpu", "--batches", "4", "--repeats", "2",
                   *data, "data.batch_size=2", "loop.global_batch=2"]
        infer = ["--device", "cpu", "--size", "256", "--repeats", "1"]  # ViT-L: about 2 minutes here
        infer_many = ["--device", "cpu", "--encoder", "tiny", "--limit", "4", "--repeats", "1"]
    return [
        Check("train", [*module, "benchmarks.bench_train", *train], limit_s=240, min_s=90),
        Check("attention", [*module, "benchmarks.bench_attention", *attention], limit_s=120, min_s=40),
        Check("augment", [*module, "benchmarks.bench_augment", *augment], limit_s=120, min_s=40),
        Check("infer", [*module, "benchmarks.bench_infer", *infer], limit_s=150, min_s=60),
        Check("infer_many", [*module, "benchmarks.bench_infer_many", *infer_many], limit_s=120, min_s=45),
        Check("tests", [*module, "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
              limit_s=120, min_s=30),
        Check("compile", [*module, "benchmarks.bench_train", *train, "parallel.compile=true"], limit_s=300, min_s=150),
    ]


def environment() -> dict:
    """What the figures were measured with."""
    record = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                   "multiprocessors": props.multi_processor_count}
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None  # reported, not fatal: the check that needs it fails with the reason
    return record | {"packages": versions}


def last_json(text: str) -> dict | None:
    """The last line of ``text`` that parses as a JSON object (the benchmarks print one)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_check(check: Check, limit_s: float, log: Path) -> dict:
    """Run one check, its output to ``log``; stop its whole process group at the limit.

    torchrun starts worker processes of its own, so the check gets a session of its own and a
    timeout kills the group, not just the parent.
    """
    env = dict(os.environ, PYTHONPATH=python_path())
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(check.command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=limit_s)
            status = "passed" if returncode == 0 else f"failed (exit {returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = f"timed out after {limit_s:.0f} s"
    record = {"name": check.name, "status": status, "seconds": round(time.perf_counter() - start, 1),
              "command": " ".join(check.command)}
    text = log.read_text(errors="replace")
    result = last_json(text)
    if result is not None:
        record["result"] = result
    # The reason, where the device's reply shows only the end of the output: the last lines
    # (pytest's summary for the tests; the traceback of a failure).
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    if result is None or status != "passed":
        record["tail"] = lines[-1 if status == "passed" else -12 :]
    return record


def run_all(checks: list[Check], out: Path, deadline: float, emit) -> bool:
    """Run ``checks`` in order within ``deadline`` (a perf_counter time); True if none failed."""
    ok = True
    for check in checks:
        left = deadline - time.perf_counter()
        if left < check.min_s:
            emit({"name": check.name, "status": f"skipped ({left:.0f} s of the budget left, needs {check.min_s:.0f})"})
            continue
        record = run_check(check, min(check.limit_s, left), out / f"{check.name}.log")
        ok &= record["status"] == "passed"
        emit(record)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.jsonl and the logs")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all checks together")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these checks only (env always runs)")
    args = parser.parse_args(argv)
    deadline = time.perf_counter() + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "gpu_check.jsonl"
    results.write_text("")

    def emit(record: dict) -> None:
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    env = environment()
    emit({"name": "env", "status": "passed", "result": env})
    if args.device == "cuda" and not env["cuda_available"]:
        emit({"name": "env", "status": "failed (no CUDA device visible to torch; use --device cpu to check the script)"})
        return 1

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        # Progress bars only; not kept, as the device returns at most 8 files (the jsonl, 7 logs).
        with open(os.devnull, "w") as log, contextlib.redirect_stderr(log):
            shards = make_shards(Path(tmp), n_train=128)
        emit({"name": "shards", "status": "passed", "seconds": round(time.perf_counter() - start, 1)})
        checks = [c for c in plan(args.device, shards) if not args.only or c.name in args.only]
        missing = {
            "tests": None if (REPO / "tests").is_dir() else "no tests/ here: the Docker image ships without them",
            "infer": None if importlib.util.find_spec("cellpose") else "cellpose, the reference, is not installed",
        }
        for name, reason in missing.items():
            if reason and any(c.name == name for c in checks):
                emit({"name": name, "status": f"skipped ({reason})"})
                checks = [c for c in checks if c.name != name]
        ok = run_all(checks, args.out, deadline, emit)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
