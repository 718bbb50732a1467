"""The fused attention (``ModelConfig(attention="fused")``) against segment-anything's own forward.

    python -m benchmarks.bench_attention [--encoder tiny] [--batch 8] [--repeats 7] [--device cpu]

Times one training step of the whole network, forward and backward (layer drop off, so all run
every block on every sample), for the attention implementations of ``pipeline.model`` (same
parameters: the fused models are loaded from the reference's state dict), in one process,
alternating them so that machine load hits them alike:

* ``sam``: segment-anything's forward (the reference);
* ``fused``: the default, :class:`pipeline.model.RelPosAttention` with the bias folded into the
  extended query and key;
* ``masked``: the same module with ``bias_as_mask`` set, the bias passed as an (N, N) mask.

On a GPU the step runs under bf16 autocast, as the trainer does. Reports the median seconds per
step of each, images/s, the ratio (reference / fused), the peak memory on a GPU, and the relative
difference of the outputs. One JSON line; nothing is asserted.

GPU example (vit_l at the paper's 256x256, where SAM's forward stores (batch, 16, 1024, 1024)
scores in every block):
    python -m benchmarks.bench_attention --encoder vit_l --batch 32 --device cuda
"""

import argparse
import json
import statistics
import time

import torch

from benchmarks.common import cpu_description
from pipeline.model import CPSAM, ModelConfig


def step_seconds(model: CPSAM, x: torch.Tensor, device: torch.device) -> float:
    """Wall time of one forward + backward (bf16 autocast on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(x)
    out.float().square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="tiny", choices=["tiny", "vit_b", "vit_l"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps of each (median)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    variants = ("sam", "fused", "masked")
    models = {}
    for variant in variants:
        attention = "sam" if variant == "sam" else "fused"
        models[variant] = CPSAM(ModelConfig(encoder=args.encoder, attention=attention, layer_drop=0.0))
        if variant != "sam":
            models[variant].load_state_dict(models["sam"].state_dict())
    for block in models["masked"].encoder.blocks:
        block.attn.bias_as_mask = True
    for model in models.values():
        model.to(device).train()
    x = torch.rand(args.batch, 3, 256, 256, device=device)

    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        reference, fused = (models[a](x).float() for a in ("sam", "fused"))
        difference = float((fused - reference).norm() / reference.norm())

    times: dict[str, list[float]] = {variant: [] for variant in models}
    peak: dict[str, float] = {}
    for attention, model in models.items():  # warm-up (kernel selection, allocator)
        step_seconds(model, x, device)
        model.zero_grad(set_to_none=True)
    for _ in range(args.repeats):
        for attention, model in models.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[attention].append(step_seconds(model, x, device))
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                peak[attention] = torch.cuda.max_memory_allocated(device) / 2**30
    median = {a: statistics.median(t) for a, t in times.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    result = {
        "name": "attention_step", "encoder": args.encoder, "batch": args.batch, "device": name,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": args.repeats,
        "seconds_sam": round(median["sam"], 4), "seconds_fused": round(median["fused"], 4),
        "images_per_s_sam": round(args.batch / median["sam"], 2),
        "images_per_s_fused": round(args.batch / median["fused"], 2),
        "ratio": round(median["sam"] / median["fused"], 3),
        "seconds_masked": round(median["masked"], 4),
        "ratio_masked_over_fused": round(median["masked"] / median["fused"], 3),
        "relative_difference": float(f"{difference:.2e}"),
    }
    if peak:
        result |= {f"peak_gib_{variant}": round(gib, 2) for variant, gib in peak.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
