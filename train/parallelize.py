"""FSDP2, activation checkpointing and torch.compile, applied to the single-device model from
outside (STYLE.md section 1; torchtitan's parallelize.py is the pattern).

Order matters: activation checkpointing wraps each transformer block first, then compile, then
``fully_shard`` per block and at the root, so every block's parameters are gathered just before
its forward (and again for its backward) and freed after. On CUDA the parameters compute in
bf16 and gradients are reduced in fp32; on the CPU (gloo) everything stays fp32 unless
``mixed_precision: bf16`` asks for the GPU's policy there too (how the tests run the GPU path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """"bf16": parameters cast to bf16 for compute, gradients reduced in fp32 (FSDP2's
    MixedPrecisionPolicy); "fp32": no casts; "auto": bf16 on CUDA, fp32 on the CPU (where bf16
    matmuls are emulated on most processors). "bf16" on the CPU runs the GPU's policy over gloo."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, ~30% more compute."""
    compile: bool = False
    """torch.compile each transformer block (dynamic batch, because layer drop varies it)."""
    reshard_after_forward: bool = True
    """Free gathered parameters after each block's forward (ZeRO-3); False keeps them (ZeRO-2)."""


def parallelize(model: torch.nn.Module, mesh: DeviceMesh, cfg: ParallelConfig) -> torch.nn.Module:
    """Shard ``model`` (a ``pipeline.model.CPSAM``) over ``mesh``; returns the same module."""
    blocks = model.encoder.blocks
    for index, block in enumerate(blocks):
        if cfg.activation_checkpointing:
            block = checkpoint_wrapper(block)
        if cfg.compile:
            block = torch.compile(block, dynamic=True)
        blocks[index] = block

    kwargs = {"mesh": mesh, "reshard_after_forward": cfg.reshard_after_forward}
    if uses_bf16(cfg, mesh.device_type):
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, **kwargs)
    # The root holds the patch embedding, position embedding, neck and readout.
    fully_shard(model, **kwargs)
    return model


def uses_bf16(cfg: ParallelConfig, device_type: str) -> bool:
    """Whether :func:`parallelize` applies the bf16 policy on a mesh of ``device_type``."""
    return cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device_type == "cuda")
