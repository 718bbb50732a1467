"""Run under torchrun by tests/train/test_main.py: how many samples each rank's FSDP2 model runs
through each block in training steps, with the layer-drop masks the trainer draws.

Writes ``<out>/rank<r>.json``: per step, the batch size each block's forward saw, and the masks.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from pipeline.model import ENCODERS, ModelConfig, build_model
from train.parallelize import ParallelConfig, parallelize
from train.trainer import layer_drop_masks, step_random


def main(out: Path, steps: int = 12, batch: int = 8) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = ModelConfig(encoder="tiny", layer_drop=0.8)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    parallelize(model, init_device_mesh("cpu", (dist.get_world_size(),)), ParallelConfig())
    seen: list[int] = []
    for block in model.encoder.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    record = []
    for step in range(steps):
        seen.clear()
        random = step_random(0, rank, step, 0, torch.device("cpu"))
        drop = layer_drop_masks(cfg, batch, random)
        model(torch.rand(batch, 3, 256, 256), drop=drop).float().mean().backward()
        record.append({"block_batches": list(seen), "drop": drop.int().tolist()})
    assert len(record[0]["block_batches"]) == ENCODERS[cfg.encoder].depth
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
