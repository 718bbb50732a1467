"""The trainer's configuration: one dataclass tree, read from YAML, with dotted overrides.

Every component owns its config next to its code (``ModelConfig`` in pipeline/model.py,
``DataConfig`` in train/data.py, ``AugmentConfig`` in train/augment.py, ``OptimConfig`` in
train/optim.py, ``CheckpointConfig`` in train/checkpoint.py, ``ParallelConfig`` in
train/parallelize.py, ``EvalConfig`` in train/evaluation.py); this module only composes them
into :class:`TrainConfig` and adds the options that belong to the loop itself.

A YAML file mirrors the tree (``optim: {lr: 5.0e-5}``). It may name a ``base:`` file (relative
to itself) whose values it then changes, so a variant is a few lines. Command-line overrides are
``section.field=value`` with the value parsed as YAML and checked against the field's type;
unknown sections or fields are errors, never warnings.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.model import ModelConfig
from train.augment import AugmentConfig
from train.checkpoint import CheckpointConfig
from train.data import DataConfig
from train.evaluation import EvalConfig
from train.optim import OptimConfig
from train.parallelize import ParallelConfig


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    global_batch: int = 256
    """Images per optimizer step over all ranks: per-rank batch x ranks x accumulation steps."""
    epochs: int = 2000
    """Length of the run in epochs (the LR schedule is defined in epochs; an epoch is
    data.samples_per_epoch samples)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (a short run); None runs all epochs."""
    max_minutes: float | None = None
    """Stop (with a checkpoint and the export) after this many minutes of training, e.g. inside
    a scheduler's time limit; None means no limit."""
    log_every: int = 10
    """Steps between log lines; host-device syncs for logging happen only then."""
    val_every: int = 500
    """Steps between validation passes on the test-split shards; 0 disables validation."""
    val_batches: int = 8
    """Batches per validation pass (per rank)."""
    eval_every: int = 0
    """Steps between AP evaluations on a fixed subset of the held-out shards (see the eval
    section, train/evaluation.py); 0 disables them."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device for the MFU estimate; None picks a known GPU's value."""

    def __post_init__(self) -> None:
        for name in ("global_batch", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"loop.{name} must be >= 1; got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"loop.eval_every must be >= 0 (0 disables it); got {self.eval_every}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"loop.max_steps must be >= 1 or null; got {self.max_steps}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"loop.max_minutes must be > 0 or null; got {self.max_minutes}")

    def total_steps(self, steps_per_epoch: int) -> int:
        full = self.epochs * steps_per_epoch
        return full if self.max_steps is None else min(full, self.max_steps)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    run_dir: str = "runs/default"
    """Where config.json, metrics.jsonl, tensorboard events and checkpoints go."""
    seed: int = 0
    """Seeds weights, the data stream, augmentation and layer drop (with rank and step)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ------------------------------------------------------------------------------------------------
# Building the tree from plain data, with type checks
# ------------------------------------------------------------------------------------------------


def from_dict(cls, data: dict, where: str = ""):
    """Instantiate dataclass ``cls`` from ``data``, recursively; ValueError names the bad key."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a mapping; got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(_join(where, k) for k in unknown)}; "
            f"{where or 'the top level'} has: {', '.join(sorted(fields))}"
        )
    values = {}
    for name, value in data.items():
        values[name] = _coerce(hints[name], value, _join(where, name))
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where or 'config'}: {error}") from error


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(tp, value, where: str):
    """``value`` checked (and where lossless, converted) against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        real = [option for option in options if option is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own message says what is wrong
            return _coerce(real[0], value, where)
        for option in real:
            try:
                return _coerce(option, value, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {value!r} fits none of {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list; got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ValueError(f"{where} must have {len(args)} entries; got {value!r}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{where} must be one of {typing.get_args(tp)}; got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 5e-5 as a string (it wants 5.0e-5); take the usual float spellings.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string; got {value!r}")
        return value
    if tp is typing.Any:
        return value
    raise ValueError(f"{where}: unsupported option type {tp}")


# ------------------------------------------------------------------------------------------------
# YAML files and overrides
# ------------------------------------------------------------------------------------------------


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ValueError(f"config files include each other: {' -> '.join(map(str, seen + (path,)))}")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(_read_yaml(path.parent / base, seen + (path,)), data)


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(data: dict, override: str) -> dict:
    """``a.b.c=value`` into the nested dict (value parsed as YAML: 5e-5, true, [1, 2], null)."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like section.field=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ValueError(f"override {override!r}: empty name in {dotted!r}")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {key} is not a section")
    node[keys[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """The config from a YAML file (or the defaults), with ``section.field=value`` overrides."""
    data = _read_yaml(Path(path)) if path else {}
    for override in overrides:
        data = apply_override(data, override)
    return from_dict(TrainConfig, data)


def option_names(cls=TrainConfig, where: str = "") -> list[str]:
    """Every dotted option the config accepts (the CLI accepts exactly these)."""
    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        name = _join(where, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            names += option_names(hints[f.name], name)
        else:
            names.append(name)
    return names
