"""FSDP2, activation checkpointing and torch.compile, applied to the single-device model from
outside (STYLE.md section 1; torchtitan's parallelize.py is the pattern).

Order matters: activation checkpointing wraps each transformer block first, then compile, then
``fully_shard`` per block and at the root, so every block's parameters are gathered just before
its forward (and again for its backward) and freed after. On CUDA the parameters compute in
bf16 and gradients are reduced in fp32; on the CPU (gloo) everything stays fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    mixed_precision: bool = True
    """bf16 compute with fp32 gradient reduction on CUDA (ignored on the CPU, which runs fp32)."""
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

    mp_policy = None
    if cfg.mixed_precision and mesh.device_type == "cuda":
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mesh": mesh, "reshard_after_forward": cfg.reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in blocks:
        fully_shard(block, **kwargs)
    # The root holds the patch embedding, position embedding, neck and readout.
    fully_shard(model, **kwargs)
    return model
