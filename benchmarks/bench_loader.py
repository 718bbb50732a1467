"""The training loader's whole CPU path on a shard root: throughput per core, bytes, host memory, mix.

    python -m benchmarks.bench_loader --config configs/paper.yaml [data.root=DIR ...] [--ranks R]
        [--workers W] [--batches N] [--json FILE]

Each of the ``R`` ranks (a process of its own, rank r of world size R, as under torchrun) builds
the real training loader of the config (``train.data.build_train_loader``: tar files read by
webdataset, decoding, the DataLoader's worker processes and shared memory, pinning where CUDA
exists) and takes ``N`` batches after a warm-up batch (the workers' start-up), copying each to
the GPU where there is one, as the training step receives it. Reported:

* ``samples_per_s_per_core``: samples over the CPU seconds (user + system) of the rank process
  and its loader workers during the timed batches: the cores the loader needs, however busy the
  machine is (wall time would count the other jobs sharing the cores).
* ``device_bytes_per_sample``: bytes of the batch's tensors per sample (what crosses to the device).
* ``host_peak_gib_per_rank``: the largest, over ranks and over time (sampled every 20 ms), of the
  rank's and its workers' private and file memory (Pss_Anon + Pss_File) plus its share (1 / R)
  of the growth of the machine's shared memory since start (Shmem in /proc/meminfo: the batches
  in flight between workers and rank). Other jobs' shared memory on the machine would count too.
* ``freq_pvalue``: chi-square test of the per-group sample counts against the loader's weights
  (weights.yaml renormalised); groups expected fewer than 5 times are pooled into one bin.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import resource
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from benchmarks.common import cpu_description
from train.config import load_config

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_SAMPLE_PERIOD_S = 0.02


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                found += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return found


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime
    except OSError:
        return 0.0


def _private_bytes(pid: int) -> int:
    """Pss_Anon + Pss_File of a process (shared memory is counted machine-wide instead)."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith(("Pss_Anon:", "Pss_File:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


def _shmem_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


class _MemoryWatch:
    """Samples the rank's and its workers' memory in a thread; ``peak`` is the largest sum seen."""

    def __init__(self, world: int):
        self.world = world
        self.pid = os.getpid()
        self.shmem_start = _shmem_bytes()
        self.peak = 0
        self.cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.cpu = time.thread_time()  # the watch's own CPU, left out of the loader's
            pids = [self.pid, *_children(self.pid)]
            shared = max(0, _shmem_bytes() - self.shmem_start) / self.world  # this rank's share
            used = sum(_private_bytes(p) for p in pids) + shared
            self.peak = max(self.peak, used)
            time.sleep(_SAMPLE_PERIOD_S)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _process_cpu(watch: _MemoryWatch, workers: list[int]) -> tuple[float, float]:
    """CPU seconds of this rank (less the memory watch's thread) and of its workers."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime - watch.cpu, sum(_cpu_seconds(w) for w in workers)


def _tensor_bytes(batch) -> int:
    return sum(getattr(batch, f.name).nbytes for f in dataclasses.fields(batch)
               if isinstance(getattr(batch, f.name), torch.Tensor))


def run_rank(cfg_path: str, overrides: list[str], rank: int, world: int, batches: int, results) -> None:
    """One rank: build the loader, warm up, time ``batches`` batches; put a dict on ``results``."""
    from train import data  # the loader under test

    cfg = load_config(cfg_path, overrides)
    watch = _MemoryWatch(world)
    kwargs = {}
    if "augment" in data.build_train_loader.__code__.co_varnames:
        kwargs["augment"] = cfg.augment  # the loader that cuts windows needs the geometry
    loader = data.build_train_loader(cfg.data, rank, world, **kwargs)
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else None
    next(loader)  # workers start, buffers fill
    workers = _children(os.getpid())
    cpu0, wall0 = _process_cpu(watch, workers), time.perf_counter()
    counts: Counter = Counter()
    nbytes = samples = 0
    for _ in range(batches):
        batch = next(loader)
        if device is not None:
            batch.to(device)
            torch.cuda.synchronize(device)
        nbytes += _tensor_bytes(batch)
        samples += len(batch)
        counts.update(batch.datasets)
    workers = sorted(set(workers) | set(_children(os.getpid())))
    cpu1 = _process_cpu(watch, workers)
    rank_cpu, workers_cpu = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    wall = time.perf_counter() - wall0
    peak = watch.stop()
    host = data.loader_host_bytes(cfg.data) if hasattr(data, "loader_host_bytes") else None
    weights = loader.weights
    loader.close()
    results.put(dict(rank=rank, samples=samples, cpu_s=rank_cpu + workers_cpu, rank_cpu_s=rank_cpu,
                     workers_cpu_s=workers_cpu, wall_s=wall, bytes=nbytes, peak=peak,
                     counts=dict(counts), weights=weights, host_bound=host))


def chi_square(counts: dict[str, int], weights: dict[str, float]) -> tuple[float, dict]:
    """p-value of the counts against the weights; groups expected < 5 times are pooled."""
    total = sum(counts.values())
    observed, expected, pooled_o, pooled_e = [], [], 0, 0.0
    for group, weight in weights.items():
        if weight * total >= 5:
            observed.append(counts.get(group, 0))
            expected.append(weight * total)
        else:
            pooled_o += counts.get(group, 0)
            pooled_e += weight * total
    if pooled_e > 0:
        observed.append(pooled_o)
        expected.append(pooled_e)
    if len(observed) < 2:
        return 1.0, dict(bins=len(observed))
    expected = np.array(expected) * total / sum(expected)
    result = stats.chisquare(observed, expected)
    return float(result.pvalue), dict(bins=len(observed), statistic=float(result.statistic))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_loader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training config YAML (its data and augment sections)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=DIR")
    parser.add_argument("--ranks", type=int, default=1, help="ranks to run at once, each rank r of world R")
    parser.add_argument("--workers", type=int, help="data.num_workers (default: the config's)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per rank, after one warm-up batch")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    cfg = load_config(args.config, overrides)
    context = mp.get_context("spawn")  # a rank's own loader workers are its children, as under torchrun
    results = context.Queue()
    ranks = [context.Process(target=run_rank, args=(args.config, overrides, r, args.ranks, args.batches, results))
             for r in range(args.ranks)]
    for process in ranks:
        process.start()
    outcomes = [results.get() for _ in ranks]
    for process in ranks:
        process.join()
    samples = sum(o["samples"] for o in outcomes)
    counts: Counter = Counter()
    for outcome in outcomes:
        counts.update(outcome["counts"])
    pvalue, test = chi_square(dict(counts), outcomes[0]["weights"])
    report = dict(
        config=args.config,
        overrides=overrides,
        root=cfg.data.root,
        ranks=args.ranks,
        workers=cfg.data.num_workers,
        batch_size=cfg.data.batch_size,
        batches=args.batches,
        machine=torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_description(),
        samples_per_s_per_core=samples / sum(o["cpu_s"] for o in outcomes),
        samples_per_s_wall_per_rank=float(np.mean([o["samples"] / o["wall_s"] for o in outcomes])),
        device_bytes_per_sample=sum(o["bytes"] for o in outcomes) / samples,
        host_peak_gib_per_rank=max(o["peak"] for o in outcomes) / 2**30,
        host_bound_gib_per_rank=({k: v / 2**30 for k, v in outcomes[0]["host_bound"].items()}
                                 if outcomes[0]["host_bound"] else None),
        cpu_s_rank_and_workers=[(o["rank_cpu_s"], o["workers_cpu_s"]) for o in outcomes],
        freq_pvalue=pvalue,
        freq_test=test,
        counts=dict(sorted(counts.items())),
        weights=outcomes[0]["weights"],
    )
    summary = {k: report[k] for k in ("samples_per_s_per_core", "samples_per_s_wall_per_rank",
                                        "device_bytes_per_sample", "host_peak_gib_per_rank", "freq_pvalue",
                                        "cpu_s_rank_and_workers")}
    print(json.dumps(summary, indent=1))
    if report["host_bound_gib_per_rank"]:
        print("configured bound per rank (GiB):", {k: round(v, 3) for k, v in report["host_bound_gib_per_rank"].items()})
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
