"""Tests for train.evaluation: AP during training on a fixed subset of real test shards.

The model is the parameter-free ``PeakModel`` of tests/infer/test_benchmark.py (flows up the
intensity gradient), on its disc images, so that the masks are real and imperfect. The values are
checked against the same images scored one by one, and 2 ranks (gloo, real processes) against 1;
the trainer run checks that metrics.jsonl gets the AP per dataset.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.dynamics import flows_to_masks
from pipeline.metrics import average_precision, error_rate, remove_ignored_masks
from pipeline.shards import group_key, read_manifest
from tests.infer.test_benchmark import PeakModel, root  # noqa: F401 -- root is the shard fixture
from train.augment import AugmentConfig, augment
from train.config import TrainConfig, load_config
from train.data import DataConfig, build_val_loader
from train.evaluation import EvalConfig, evaluate_ap

REPO = Path(__file__).resolve().parents[2]


def config(root, **eval_options) -> TrainConfig:
    return TrainConfig(data=DataConfig(root=str(root)), eval=EvalConfig(**({"images_per_group": 2} | eval_options)))


def in_process_group(rank: int, world: int, store: str, fn, *args):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        return fn(*args)
    finally:
        dist.destroy_process_group()


def _rank_main(rank: int, world: int, store: str, root: str, out: str) -> None:
    values = in_process_group(rank, world, store, evaluate_ap, PeakModel(), config(root), torch.device("cpu"))
    Path(f"{out}.{rank}").write_text(json.dumps(values))


def test_config_is_checked():
    with pytest.raises(ValueError, match="eval.images_per_group"):
        EvalConfig(images_per_group=0)
    with pytest.raises(ValueError, match="eval.splits"):
        EvalConfig(splits=())
    with pytest.raises(ValueError, match="loop.eval_every"):
        load_config(REPO / "configs" / "tiny-cpu.yaml", ["loop.eval_every=-1"])
    assert load_config(REPO / "configs" / "tiny-cpu.yaml", ["eval.images_per_group=3"]).eval.images_per_group == 3


def test_values_are_the_per_image_means_of_the_subset(root, tmp_path):
    values = in_process_group(0, 1, str(tmp_path / "store"), evaluate_ap, PeakModel(), config(root),
                              torch.device("cpu"))
    # The same images (the first 2 by key of each group), each scored alone.
    rows = read_manifest(root, splits=["test"])
    expected: dict[str, list] = {}
    batches = build_val_loader(DataConfig(root=str(root), val_limit=2, batch_size=1, num_workers=0), 0, 1)
    for batch in batches:
        augmented = augment(batch, AugmentConfig(), None, train=False)
        output = PeakModel()(augmented.images)[0].numpy()
        masks = remove_ignored_masks(flows_to_masks(output[:2], output[2]), (augmented.weight[0] == 0).numpy())
        labels = augmented.labels[0].numpy()
        ap, _, _, _ = average_precision(labels, masks)
        expected.setdefault(batch.datasets[0], []).append((ap[0], error_rate(labels, masks)[0][0]))
    assert sorted(expected) == sorted({group_key(r["dataset"], r["subset"]) for r in rows})
    expected["all"] = [score for scores in list(expected.values()) for score in scores]
    for group, scores in expected.items():
        assert values[f"images/{group}"] == len(scores)
        assert values[f"ap50/{group}"] == pytest.approx(np.mean([s[0][0] for s in scores]))
        assert values[f"ap90/{group}"] == pytest.approx(np.mean([s[0][2] for s in scores]))
        assert values[f"error50/{group}"] == pytest.approx(np.mean([s[1] for s in scores]))
    # Real, imperfect masks: every disc found at IoU 0.5 here (rescaled to diameter 30), not at 0.9.
    assert values["ap50/all"] > 0.5 and values["ap90/all"] < 0.5 and values["seconds"] > 0


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_give_the_values_of_one(root, tmp_path):
    one = in_process_group(0, 1, str(tmp_path / "store1"), evaluate_ap, PeakModel(), config(root), torch.device("cpu"))
    mp.spawn(_rank_main, args=(2, str(tmp_path / "store2"), str(root), str(tmp_path / "values")), nprocs=2)
    for rank in range(2):
        two = json.loads(Path(f"{tmp_path / 'values'}.{rank}").read_text())
        assert set(two) == set(one)
        for key, value in one.items():
            if key != "seconds":
                assert two[key] == pytest.approx(value) or (math.isnan(value) and math.isnan(two[key])), key


@pytest.mark.slow
@pytest.mark.distributed
def test_trainer_logs_ap_per_dataset(root, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train" / "main.py"), "--config", str(REPO / "configs" / "tiny-cpu.yaml"),
               f"run_dir={run_dir}", f"data.root={root}", "loop.max_steps=4", "loop.eval_every=2",
               "eval.images_per_group=1", "checkpoint.every=1000", "data.batch_size=2", "loop.global_batch=4",
               "data.num_workers=0"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "ap50/all" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    for record in evaluations:
        assert {"ap50/cyto2/cyto", "ap50/nuclei", "error50/all", "ap90/all"} <= set(record)
        assert record["images/all"] == 3 and 0 <= record["ap50/all"] <= 1
    assert (run_dir / "tensorboard").is_dir()
