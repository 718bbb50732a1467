"""Checkpoints with torch.distributed.checkpoint (DCP): save every N steps and on demand, keep the
last K, resume exactly.

The contract is small (STYLE.md section 5): ``Checkpointer(cfg, run_dir, model, optimizer,
extra)`` with ``save(step)``, ``load(step=None) -> int | None`` and ``close()``. What a resumed run
needs is the model and optimizer state and the step: the learning rate is a function of the step,
and the data stream, augmentation and layer drop are seeded from (seed, rank, step), so no RNG
state has to be carried. ``extra`` objects (anything with ``state_dict``/``load_state_dict``)
are saved too, for whatever else a caller wants to carry.

A run directory holds one run. :func:`resume_step` decides where a launch starts:
at the newest checkpoint when there is one (so torchrun's ``--max-restarts`` and a plain relaunch
after a crash continue the run, as torchtitan does), and never a second run on top of the first:
a launch whose settings differ from the checkpoint's is refused with the choices (``--resume``
continues anyway with the new settings), unless only options that do not change what is
computed differ (:data:`RESUMABLE_CHANGES`).

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
# Options a relaunch may change without becoming another run: how the run is executed, logged
# and stored, not what it computes (prefixes of the dotted names).
RESUMABLE_CHANGES = (
    "run_dir", "checkpoint.", "parallel.", "eval.", "loop.max_steps", "loop.max_minutes", "loop.log_every",
    "loop.val_every", "loop.val_batches", "loop.eval_every", "loop.peak_tflops", "data.root", "data.shard_url",
    "data.prefetch_factor", "data.pin_memory",
)


class RunDirConflict(RuntimeError):
    """The run directory holds checkpoints of a run with other settings."""


def config_changes(saved: dict, current: dict) -> list[str]:
    """``"name: saved -> current"`` for each option that differs and is not resumable.

    Options present on one side only (a newer or older version of the code) are not counted.
    """
    old, new = _flatten(saved), _flatten(current)
    return [
        f"{name}: {old[name]!r} -> {new[name]!r}"
        for name in sorted(old.keys() & new.keys())
        if old[name] != new[name] and not name.startswith(RESUMABLE_CHANGES)
    ]


def _flatten(tree: dict, where: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{where}.{key}" if where else key
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every: int = 1000
    """Save every this many optimizer steps (and at the end, and on SIGTERM/SIGINT)."""
    keep: int = 3
    """Keep the last K checkpoints; older ones are deleted after a successful save."""
    resume: bool = False
    """Continue from the newest checkpoint in <run_dir>/checkpoints even where its settings
    differ from this launch's (the --resume flag). Without it a launch continues a run whose
    checkpoints have the same settings, and refuses one whose settings differ."""

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


def resume_step(run_dir: str | Path, config_json: str, force: bool = False) -> int | None:
    """The step a launch into ``run_dir`` continues from: its newest checkpoint, or None (step 0).

    Raises :class:`RunDirConflict` when the newest checkpoint was written with settings other
    than this launch's (``config_json``, the resolved config) and ``force`` is false. Only reads
    files, so every rank can call it and reach the same answer.
    """
    folder = Path(run_dir) / "checkpoints"
    steps = checkpoint_steps(folder)
    if not steps:
        return None
    newest = folder / f"{_PREFIX}{steps[-1]:07d}"
    saved = json.loads((newest / "meta.json").read_text()).get("config", {})
    changes = config_changes(saved, json.loads(config_json))
    if changes and not force:
        shown = "; ".join(changes[:8]) + (f"; ... ({len(changes)} in all)" if len(changes) > 8 else "")
        raise RunDirConflict(
            f"{run_dir} holds another run: its newest checkpoint {newest} (step {steps[-1]}) was written "
            f"with other settings ({shown}). A run directory holds one run. Either continue that run "
            f"with these settings (--resume), or give this run its own directory (run_dir=...), or "
            f"delete {folder} to start over there."
        )
    if changes and _is_rank0():
        log.warning("resuming %s with changed settings: %s", newest, "; ".join(changes))
    return steps[-1]


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
