"""Tests for train.optim: the schedule as a plain function of the step."""

import pytest
import torch

from train.optim import OptimConfig, build_optimizer, learning_rate


def test_paper_schedule():
    # Paper (paper.md 1a): linear warm-up over 10 epochs from 0, constant, /10 for the last 100
    # epochs and /10 again for the last 50, of 2000.
    cfg = OptimConfig()
    steps_per_epoch, epochs = 89, 2000
    lr = lambda epoch: learning_rate(int(epoch * steps_per_epoch), cfg, steps_per_epoch, epochs)  # noqa: E731
    assert lr(0) == 0.0
    assert lr(5) == pytest.approx(2.5e-5)
    assert lr(10) == pytest.approx(5e-5)
    assert lr(1899) == pytest.approx(5e-5)
    assert lr(1900) == pytest.approx(5e-6)
    assert lr(1949) == pytest.approx(5e-6)
    assert lr(1950) == pytest.approx(5e-7)
    assert lr(1999.99) == pytest.approx(5e-7)


def test_schedule_is_monotone_up_then_down():
    cfg = OptimConfig(lr=1.0, warmup_epochs=3, decay=((4, 0.5), (2, 0.5)))
    values = [learning_rate(s, cfg, steps_per_epoch=5, epochs=12) for s in range(60)]
    peak = values.index(1.0)
    assert values[:peak] == sorted(values[:peak]) and values[peak:] == sorted(values[peak:], reverse=True)
    assert values[-1] == pytest.approx(0.25)  # both halvings applied at the end


def test_weight_decay_applies_to_every_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    optimizer = build_optimizer(model, OptimConfig())
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 0.1
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kwargs", [dict(lr=0), dict(weight_decay=-1), dict(grad_clip=0), dict(decay=((10, 0),))])
def test_bad_values_name_the_field(kwargs):
    with pytest.raises(ValueError, match=f"optim.{next(iter(kwargs))}"):
        OptimConfig(**kwargs)
