"""Tests for train.config: YAML files with a base, typed dotted overrides, unknown options."""

from pathlib import Path

import numpy as np
import pytest

from train.config import TrainConfig, apply_override, load_config, option_names
from train.data import steps_per_epoch
from train.optim import learning_rate

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.decay and cfg.loop.global_batch % cfg.data.batch_size == 0


@pytest.mark.parametrize("name, steps, decayed", [("learn-check.yaml", 4800, 640), ("demo.yaml", 1200, 160)])
def test_cpu_run_configs_have_the_steps_their_comments_state(name, steps, decayed):
    # The demo and the learning check run a fixed number of steps on 2 ranks with no gradient
    # accumulation; their comments (and docs/BENCHMARKS.md) quote these counts.
    cfg = load_config(REPO / "configs" / name)
    assert cfg.data.batch_size * 2 == cfg.loop.global_batch
    per_epoch = steps_per_epoch(cfg.data, world_size=2)
    total = cfg.loop.total_steps(per_epoch)
    assert total == steps
    rates = [learning_rate(step, cfg.optim, per_epoch, cfg.loop.epochs) for step in range(total)]
    assert rates.count(cfg.optim.lr / 10) == decayed and max(rates) == cfg.optim.lr


def test_paper_config_is_the_papers_recipe():
    # paper.md 1a: ViT-L, layer drop 0.4, AdamW lr 5e-5 wd 0.1, 10 warm-up epochs, /10 for the
    # last 100 and again for the last 50 of 2000 epochs, batch 256.
    cfg = load_config(REPO / "configs" / "paper.yaml")
    assert (cfg.model.encoder, cfg.model.layer_drop) == ("vit_l", 0.4)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_epochs) == (5e-5, 0.1, 10)
    assert cfg.optim.decay == ((100, 0.1), (50, 0.1))
    assert (cfg.loop.epochs, cfg.loop.global_batch) == (2000, 256)
    assert cfg.data.batch_size * 8 == 256  # 8 GPUs, no accumulation


def test_finetune_config_is_cellposes_recipe():
    # paper.md 1f / cellpose 4.2.1.1 train_seg's defaults: AdamW lr 1e-5, wd 0.1, 100 epochs,
    # zoom 0.75-1.25, no intensity augmentation; its per-epoch rates are
    #   LR = linspace(0, lr, 10) ++ lr * ones(90); for 99 < epochs <= 300: LR[:-50] then ten
    #   blocks of 5 epochs, each half the last.
    cfg = load_config(REPO / "configs" / "finetune.yaml")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.loop.epochs) == (1e-5, 0.1, 100)
    assert cfg.model.sam_checkpoint is None and cfg.model.init_checkpoint and cfg.model.encoder == "vit_l"
    low, high = cfg.augment.zoom_log2_range
    assert 2**low == pytest.approx(0.75, abs=2e-4) and 2**high == pytest.approx(1.25, abs=2e-4)
    assert cfg.augment.degrade_prob == cfg.augment.invert_prob == cfg.augment.brightness_sigma == 0
    cellpose = list(np.linspace(0, 1e-5, 10)) + [1e-5] * 40
    for _ in range(10):
        cellpose += [cellpose[-1] / 2] * 5
    ours = [learning_rate(epoch, cfg.optim, steps_per_epoch=1, epochs=100) for epoch in range(100)]
    # Cellpose's warm-up reaches lr at epoch 9 (linspace's end point), ours at epoch 10.
    np.testing.assert_allclose(ours[10:], cellpose[10:], rtol=1e-12)
    assert ours[0] == 0 and ours[-1] == pytest.approx(1e-5 / 1024)
    # Runs unchanged on 1, 2, 4 and 8 ranks: the global batch splits into whole micro-batches.
    assert all(cfg.loop.global_batch % (cfg.data.batch_size * ranks) == 0 for ranks in (1, 2, 4, 8))


def test_overrides_are_typed(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml",
                      ["optim.lr=5e-5", "loop.max_steps=7", "model.sam_checkpoint=null",
                       "optim.decay=[[3, 0.5]]", "parallel.compile=true", "run_dir=" + str(tmp_path)])
    assert cfg.optim.lr == 5e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.loop.max_steps == 7 and cfg.model.sam_checkpoint is None
    assert cfg.optim.decay == ((3.0, 0.5),) and cfg.parallel.compile is True
    assert cfg.run_dir == str(tmp_path)


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rate=1", "unknown option"),
    ("optimizer.lr=1", "unknown option"),
    ("loop.max_steps=lots", "must be an integer"),
    ("parallel.compile=maybe", "true or false"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("optim.lr", "section.field=value"),
])
def test_bad_overrides_name_the_option(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(REPO / "configs" / "tiny-cpu.yaml", [override])


def test_a_variant_names_its_base(tmp_path):
    (tmp_path / "variant.yaml").write_text(f"base: {REPO / 'configs' / 'tiny-cpu.yaml'}\noptim:\n  lr: 2.0e-4\n")
    cfg = load_config(tmp_path / "variant.yaml")
    base = load_config(REPO / "configs" / "tiny-cpu.yaml")
    assert cfg.optim.lr == 2e-4 and cfg.optim.decay == base.optim.decay and cfg.model == base.model


def test_missing_and_circular_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="include each other"):
        load_config(tmp_path / "a.yaml")


def test_every_option_can_be_overridden():
    names = option_names()
    assert "optim.lr" in names and "model.encoder" in names and "loop.max_steps" in names
    assert len(names) == len(set(names))
    for name in names:
        data = apply_override({}, f"{name}=null")
        node = data
        for key in name.split(".")[:-1]:
            node = node[key]
        assert name.split(".")[-1] in node


def test_resolved_config_round_trips_through_json():
    import json

    cfg = load_config(REPO / "configs" / "paper.yaml")
    from train.config import from_dict

    assert from_dict(TrainConfig, json.loads(cfg.to_json())) == cfg
