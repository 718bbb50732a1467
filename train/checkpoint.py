"""Checkpoints with torch.distributed.checkpoint (DCP): save every N steps and on demand, keep the
last K, resume exactly.

The contract is small (STYLE.md section 5): ``Checkpointer(cfg, run_dir, model, optimizer,
extra)`` with ``save(step)``, ``load(step=None) -> int | None`` and ``close()``. What a resumed run
needs is the model and optimizer state and the step: the learning rate is a function of the step,
and the data stream, augmentation and layer drop are seeded from (seed, rank, step), so no RNG
state has to be carried. ``extra`` objects (anything with ``state_dict``/``load_state_dict``)
are saved too, for whatever else a caller wants to carry.

Layout: ``<run_dir>/checkpoints/step_0000100/`` (a DCP folder, sharded across ranks, written
to ``.tmp`` and renamed by rank 0 when every rank has finished, so a crash mid-save never leaves
a folder that looks complete) with ``meta.json`` (step, config) beside the shards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from pipeline import weights
from pipeline.model import CPSAM, ModelConfig

log = logging.getLogger(__name__)

_PREFIX = "step_"


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every: int = 1000
    """Save every this many optimizer steps (and at the end, and on SIGTERM/SIGINT)."""
    keep: int = 3
    """Keep the last K checkpoints; older ones are deleted after a successful save."""
    resume: bool = False
    """Continue from the newest checkpoint in <run_dir>/checkpoints (the --resume flag)."""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"checkpoint.every must be >= 1; got {self.every}")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1; got {self.keep}")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    steps = []
    for path in folder.iterdir():
        if path.is_dir() and path.name.startswith(_PREFIX) and (path / "meta.json").is_file():
            steps.append(int(path.name[len(_PREFIX):]))
    return sorted(steps)


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, run_dir: str | Path, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, extra: dict | None = None, config_json: str = "{}"):
        self.cfg = cfg
        self.folder = Path(run_dir) / "checkpoints"
        self.model = model
        self.optimizer = optimizer
        self.extra = extra or {}
        self.config_json = config_json

    def path(self, step: int) -> Path:
        return self.folder / f"{_PREFIX}{step:07d}"

    def _state(self) -> dict:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        state.update({name: obj.state_dict() for name, obj in self.extra.items()})
        return state

    def should_save(self, step: int) -> bool:
        return step % self.cfg.every == 0

    def save(self, step: int) -> Path:
        """Write the checkpoint of ``step`` (a collective: every rank must call it)."""
        final = self.path(step)
        tmp = final.with_name(final.name + ".tmp")
        if _is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save(self._state(), checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        _barrier()
        if _is_rank0():
            (tmp / "meta.json").write_text(json.dumps({"step": step, "config": json.loads(self.config_json)}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in checkpoint_steps(self.folder)[: -self.cfg.keep]:
                shutil.rmtree(self.path(old), ignore_errors=True)
            log.info("saved checkpoint %s", final)
        _barrier()
        return final

    def load(self, step: int | None = None) -> int | None:
        """Restore the given step (default: the newest); returns it, or None when there is none."""
        steps = checkpoint_steps(self.folder)
        if not steps:
            return None
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.folder}; have {steps}")
        state = self._state()
        dcp.load(state, checkpoint_id=str(self.path(step)), no_dist=not dist.is_initialized())
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=True))
        for name, obj in self.extra.items():
            obj.load_state_dict(state[name])
        log.info("resumed from %s", self.path(step))
        return step

    def close(self) -> None:
        """Nothing is left running (saves are synchronous); kept for the contract."""


def read_init_weights(path: str | Path, model_cfg: ModelConfig) -> dict:
    """The weights a fine-tuning run starts from (``model.init_checkpoint``), as a full state dict.

    ``path`` is a weights file (an official cpsam file or an export: read by
    ``pipeline.weights.read_init_weights``) or a training run's DCP checkpoint: the run folder,
    its ``checkpoints/`` folder (the newest step is used) or one ``step_*`` folder. Of a DCP
    checkpoint only the model is read, on this process alone (no collectives): the optimizer,
    the schedule and the step start afresh. The checkpoint's geometry (its meta.json) must be
    ``model_cfg``'s, and every weight must be present with the model's shape.
    """
    path = Path(path)
    if not path.is_dir():
        return weights.read_init_weights(path, model_cfg)
    step_dir = _newest_step_dir(path)
    saved = json.loads((step_dir / "meta.json").read_text()).get("config", {}).get("model", {})
    geometry = ("encoder", "patch_size", "image_size")
    if any(name in saved and saved[name] != getattr(model_cfg, name) for name in geometry):
        have = ", ".join(f"{name}={saved.get(name)!r}" for name in geometry)
        want = ", ".join(f"{name}={getattr(model_cfg, name)!r}" for name in geometry)
        raise ValueError(
            f"{step_dir}: the init checkpoint is {have}, but the config asks for {want}. Set "
            f"model.encoder / model.patch_size / model.image_size to the checkpoint's."
        )
    # Storage of the right shapes for DCP to fill; random values that are all overwritten.
    target = CPSAM(dataclasses.replace(model_cfg, sam_checkpoint=None, init_checkpoint=None)).state_dict()
    try:
        dcp.load({"model": target}, checkpoint_id=str(step_dir), no_dist=True)
    except Exception as error:  # DCP reports missing keys and shape mismatches as several types
        raise ValueError(f"{step_dir}: cannot read the model weights for {model_cfg.encoder}: {error}") from error
    return dict(target)


def _newest_step_dir(path: Path) -> Path:
    """``path`` if it is one checkpoint, else the newest checkpoint in it or in its checkpoints/."""
    if (path / "meta.json").is_file():
        return path
    for folder in (path / "checkpoints", path):
        steps = checkpoint_steps(folder)
        if steps:
            return folder / f"{_PREFIX}{steps[-1]:07d}"
    found = sorted(p.name for p in path.iterdir())[:10]
    raise FileNotFoundError(
        f"{path}: no training checkpoint here (expected a run folder with checkpoints/{_PREFIX}*/, "
        f"a checkpoints/ folder or one {_PREFIX}* folder with meta.json); found: {found or 'nothing'}"
    )
