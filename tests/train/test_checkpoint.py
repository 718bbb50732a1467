"""Tests for train.checkpoint on the CPU, single process, with a small model and optimizer."""

import json

import pytest
import torch

from train.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    RunDirConflict,
    checkpoint_steps,
    config_changes,
    resume_step,
)


class Counter:
    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def make(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def train_a_bit(model, optimizer, steps):
    for i in range(steps):
        loss = model(torch.full((3, 4), float(i))).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_save_then_load_restores_model_and_optimizer_exactly(tmp_path):
    model, optimizer = make(0)
    train_a_bit(model, optimizer, 3)
    counter = Counter()
    counter.value = 7
    Checkpointer(CheckpointConfig(), tmp_path, model, optimizer, {"counter": counter}, config_json='{"a": 1}').save(3)
    meta = json.loads((tmp_path / "checkpoints" / "step_0000003" / "meta.json").read_text())
    assert meta == {"step": 3, "config": {"a": 1}}

    other_model, other_optimizer = make(1)  # different weights and an empty optimizer
    other_counter = Counter()
    step = Checkpointer(CheckpointConfig(), tmp_path, other_model, other_optimizer, {"counter": other_counter}).load()
    assert step == 3 and other_counter.value == 7
    for a, b in zip(model.state_dict().values(), other_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The optimizer state came back too: one more identical step gives identical weights.
    train_a_bit(model, optimizer, 1)
    train_a_bit(other_model, other_optimizer, 1)
    for a, b in zip(model.state_dict().values(), other_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_keeps_the_last_k_and_ignores_unfinished_saves(tmp_path):
    model, optimizer = make(0)
    checkpointer = Checkpointer(CheckpointConfig(keep=2), tmp_path, model, optimizer)
    for step in (10, 20, 30):
        checkpointer.save(step)
    assert checkpoint_steps(tmp_path / "checkpoints") == [20, 30]
    # A save that crashed half-way leaves a .tmp folder without meta.json: never loaded.
    (tmp_path / "checkpoints" / "step_0000040.tmp").mkdir()
    (tmp_path / "checkpoints" / "step_0000050").mkdir()  # no meta.json: incomplete
    assert checkpointer.load() == 30
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 10"):
        checkpointer.load(10)


def test_nothing_to_resume(tmp_path):
    model, optimizer = make(0)
    assert Checkpointer(CheckpointConfig(), tmp_path, model, optimizer).load() is None


def test_should_save_every_n_steps():
    checkpointer = Checkpointer(CheckpointConfig(every=5), "unused", None, None)
    assert [s for s in range(1, 16) if checkpointer.should_save(s)] == [5, 10, 15]
    with pytest.raises(ValueError, match="checkpoint.keep"):
        CheckpointConfig(keep=0)


# ------------------------------------------------------------------------------------------------
# Which step a launch starts at: one run per run directory (issue 18, item 8)
# ------------------------------------------------------------------------------------------------


def saved_run(tmp_path, config: dict, steps=(10, 20)):
    model, optimizer = make(0)
    checkpointer = Checkpointer(CheckpointConfig(), tmp_path, model, optimizer, config_json=json.dumps(config))
    for step in steps:
        checkpointer.save(step)


CONFIG = {"seed": 0, "optim": {"lr": 1e-3}, "loop": {"max_steps": 30, "log_every": 5},
          "checkpoint": {"every": 10, "resume": False}, "data": {"root": "shards", "num_workers": 2}}


def test_a_relaunch_with_the_same_settings_resumes_at_the_newest_checkpoint(tmp_path):
    assert resume_step(tmp_path, json.dumps(CONFIG)) is None  # nothing there: step 0
    saved_run(tmp_path, CONFIG)
    assert resume_step(tmp_path, json.dumps(CONFIG)) == 20
    # How the run is executed, logged and stored may change between launches.
    relaunch = json.loads(json.dumps(CONFIG))
    relaunch["loop"] |= {"max_steps": 60, "log_every": 1}
    relaunch["checkpoint"] |= {"every": 5, "resume": True}
    relaunch["data"]["root"] = "/mnt/elsewhere/shards"
    assert resume_step(tmp_path, json.dumps(relaunch)) == 20


def test_a_launch_with_other_settings_is_refused_naming_the_checkpoint_and_the_choices(tmp_path):
    saved_run(tmp_path, CONFIG)
    other = json.loads(json.dumps(CONFIG))
    other["optim"]["lr"] = 2e-3
    other["data"]["num_workers"] = 4  # changes the batches (train/data.py)
    with pytest.raises(RunDirConflict) as raised:
        resume_step(tmp_path, json.dumps(other))
    message = str(raised.value)
    assert str(tmp_path / "checkpoints" / "step_0000020") in message
    assert "optim.lr: 0.001 -> 0.002" in message and "data.num_workers: 2 -> 4" in message
    assert "--resume" in message and "run_dir=" in message
    # --resume continues it anyway.
    assert resume_step(tmp_path, json.dumps(other), force=True) == 20


def test_config_changes_ignores_options_one_side_lacks():
    newer = json.loads(json.dumps(CONFIG))
    newer["loop"]["eval_every"] = 100  # an option an older checkpoint never had
    assert config_changes(CONFIG, newer) == []
    assert config_changes(CONFIG, newer | {"seed": 1}) == ["seed: 0 -> 1"]
