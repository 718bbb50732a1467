"""The stages run the way a user runs them, as separate commands: what the demo and the learning
check share.

Training and inference are started as subprocesses (``torchrun ... train/main.py``, ``python -m
infer``, ``python -m infer.benchmark``) so that these scripts exercise the same entry points as
the README, and their output goes to a log file per command under the run's folder.
"""

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from pipeline.io import write_image
from pipeline.shards import iter_samples, read_manifest

REPO = Path(__file__).resolve().parents[1]


# A tqdm counter in a command's output: "12/300 [" (the last one in the log is the latest).
_TQDM_COUNTER = re.compile(rb"(\d+)/(\d+) \[")


def run(command: list[str], log_path: Path, progress: str | None = None) -> None:
    """Run ``command`` from the repository root with its output in ``log_path``; exit on failure
    with the log's last lines. With ``progress`` (a label), the command's own tqdm counter is
    mirrored to a bar on this terminal while it runs."""
    # Small machines: torch's and numba's OpenMP pools must not spin against each other.
    # The repository first, then any PYTHONPATH the caller set (packages carried as wheels).
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        if progress is None:
            process.wait()
        else:
            _mirror_progress(process, log_path, progress)
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace").replace("\r", "\n").strip().splitlines()[-15:]
        sys.exit(f"command failed (exit {process.returncode}): {' '.join(command)}\n"
                 + "\n".join(tail) + f"\n(full output: {log_path})")


def _mirror_progress(process: subprocess.Popen, log_path: Path, label: str) -> None:
    """Until ``process`` ends, show the last tqdm counter its log holds as a bar here."""
    bar = tqdm(desc=label)
    with log_path.open("rb") as log:
        while process.poll() is None:
            time.sleep(1.0)
            counters = _TQDM_COUNTER.findall(log.read())
            if counters:
                done, total = map(int, counters[-1])
                bar.total = total
                bar.update(done - bar.n)
    bar.close()


def train(shards: Path, run_dir: Path, minutes: float | None, nproc: int, overrides: list[str], log_path: Path,
          config: str = "tiny-cpu.yaml") -> float:
    """``torchrun --nproc_per_node=nproc train/main.py --config configs/<config>`` on ``shards``
    until the config's last step or until ``minutes`` (None: no limit) have passed, whichever
    comes first (the trainer then checkpoints and exports ``run_dir/model_cellpose.pt``), with
    its progress shown; returns the minutes it took."""
    limit = [] if minutes is None else [f"loop.max_minutes={minutes}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "train" / "main.py"), "--config", str(REPO / "configs" / config),
               f"run_dir={run_dir}", f"data.root={shards}", *limit, *overrides]
    start = time.time()
    within = "" if minutes is None else f", at most {minutes:g} min"
    print(f"training ({config}{within}) on {nproc} processes (log: {log_path}) ...", flush=True)
    run(command, log_path, progress="train")
    return (time.time() - start) / 60


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Training and validation loss by step, from the run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    found = {
        "train loss": [(r["step"], r["loss"]) for r in records if "loss" in r],
        "validation loss": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
    }
    return {name: values for name, values in found.items() if values}


def infer(images: Path, checkpoint: Path, out: Path, extra: tuple[str, ...] = ()) -> Path:
    """``python -m infer`` on ``images`` into ``out/predictions``, with the outline overlays users
    look at; returns that folder (its summary.csv has the diameter each image was rescaled by)."""
    predictions = out / "predictions"
    run([sys.executable, "-m", "infer", str(images), "--checkpoint", str(checkpoint), "--out", str(predictions),
         "--overwrite", "--save-outlines", *extra], out / "infer.log", progress="infer")
    return predictions


def infer_and_evaluate(images: Path, truth: Path, checkpoint: Path, out: Path, extra: tuple[str, ...] = ()) -> list[dict]:
    """:func:`infer`, then ``python -m infer.evaluate`` against the label files in ``truth``;
    returns the evaluation rows (the last one has ``pred == "mean"``)."""
    predictions = infer(images, checkpoint, out, extra)
    evaluation = out / "evaluation.csv"
    run([sys.executable, "-m", "infer.evaluate", "--true", str(truth), "--pred", str(predictions),
         "--csv", str(evaluation)], out / "evaluate.log")
    return list(csv.DictReader(evaluation.open()))


def benchmark(shards: Path, checkpoint: Path, out: Path, extra: tuple[str, ...] = ()) -> tuple[dict, list[dict]]:
    """``python -m infer.benchmark`` on the shard root's samples into ``out`` (``--split`` and
    ``--diameter`` in ``extra``): the table (``benchmark.json``) and the per-image rows
    (``images.csv``). The markdown table is ``out/benchmark.md``."""
    run([sys.executable, "-m", "infer.benchmark", "--shards", str(shards), "--checkpoint", str(checkpoint),
         "--out", str(out), *extra], out.parent / f"{out.name}.log")
    table = json.loads((out / "benchmark.json").read_text())
    return table, list(csv.DictReader((out / "images.csv").open()))


def export_images(shards: Path, split: str, folder: Path, name: str = "key") -> Path:
    """The images of a shard root's ``split`` as TIFFs ``<folder>/<row[name]>.tif`` (``name`` a
    manifest column: key, or source where sources are plain file names), for ``python -m infer``;
    returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for row, sample in iter_samples(shards, read_manifest(shards, splits=[split])):
        if isinstance(sample, ValueError):
            sys.exit(f"{split} sample unreadable: {sample}")
        write_image(folder / f"{row[name]}.tif", sample[0])
    return folder
