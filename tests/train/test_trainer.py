"""train.trainer on the CPU, the way a GPU run would use it (issue 18).

The first CUDA step used to stop in layer drop: the trainer handed one generator, made on the
training device, to both the augmentation and the model, whose layer drop draws on the CPU. No
CUDA device is needed to check what each consumer receives: ``step_random`` is asked for its
generators with a recording constructor. The host-device syncs of a step are counted with a
dispatch mode over real steps of the real trainer (FSDP2 on a one-process gloo group, real
shards, a DataLoader worker): data-dependent ops on device tensors are what makes the host wait
for a GPU.
"""

import json
import math
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import train.augment
import train.trainer
from pipeline.model import ENCODERS, forward_flops_parts, sample_layer_drop
from train.config import load_config
from train.trainer import (
    PEAK_BF16_TFLOPS,
    Trainer,
    _open_metrics,
    peak_bf16_tflops,
    process_group_options,
    step_random,
)

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------
# Generators of a CUDA run (item 1)
# ------------------------------------------------------------------------------------------------


class RecordingGenerator:
    """Stands in for torch.Generator's constructor: records the device asked for and returns a
    real CPU generator (a CUDA one cannot be made without a GPU)."""

    def __init__(self):
        self.asked = []

    def __call__(self, device):
        self.asked.append(torch.device(device))
        return torch.Generator()


def test_a_cuda_run_draws_augmentation_on_the_gpu_and_layer_drop_on_the_cpu():
    recorder = RecordingGenerator()
    random = step_random(seed=0, rank=3, step=7, micro=1, device=torch.device("cuda", 3), generator=recorder)
    assert recorder.asked == [torch.device("cuda", 3), torch.device("cpu"), torch.device("cpu")]
    # What each consumer then receives: the CPU generators go to layer drop, which accepts them
    # (it refuses any generator that is not on the CPU: the crash of today's code).
    drop = sample_layer_drop(4, 24, 0.4, random.layer_drop, random.drop_counts)
    assert drop.shape == (4, 24) and drop.device.type == "cpu"

    class CudaGenerator:
        device = torch.device("cuda", 3)

    with pytest.raises(ValueError, match="CPU"):
        sample_layer_drop(4, 24, 0.4, CudaGenerator())


def test_step_generators_are_seeded_by_seed_rank_step_and_micro_batch():
    def draws(*key):
        random = step_random(*key, device=torch.device("cpu"))
        return [torch.rand(4, generator=g) for g in (random.augment, random.layer_drop, random.drop_counts)]

    base = draws(0, 1, 5, 0)
    for a, b in zip(base, draws(0, 1, 5, 0)):
        assert torch.equal(a, b)
    # The counts' generator is the same on every rank; the others are not.
    other_rank = draws(0, 2, 5, 0)
    assert torch.equal(base[2], other_rank[2])
    assert not torch.equal(base[0], other_rank[0]) and not torch.equal(base[1], other_rank[1])
    for key in ((1, 1, 5, 0), (0, 1, 6, 0), (0, 1, 5, 1)):
        assert all(not torch.equal(a, b) for a, b in zip(base, draws(*key)))
    # The three purposes never share a stream.
    assert not torch.equal(base[0], base[1]) and not torch.equal(base[1], base[2])


def test_process_group_binds_nccl_to_the_local_gpu():
    assert process_group_options(cuda=True, local_rank=5) == {"backend": "nccl", "device_id": torch.device("cuda", 5)}
    assert process_group_options(cuda=False, local_rank=5) == {"backend": "gloo"}


def test_peak_table_tells_the_products_apart():
    # Dense bf16 tensor-core peaks from NVIDIA's data sheets; names as torch.cuda.get_device_name gives them.
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4  # SXM5
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H100 NVL") == 835.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.4
    assert peak_bf16_tflops("NVIDIA GH200 480GB") == 989.4
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("NVIDIA A10G") == 70.0 and peak_bf16_tflops("NVIDIA A10") == 125.0
    assert peak_bf16_tflops("NVIDIA L4") == 121.0 and peak_bf16_tflops("NVIDIA L40S") == 362.0
    assert peak_bf16_tflops("Tesla T4") is None
    assert all(tflops > 0 for _, tflops in PEAK_BF16_TFLOPS)


# ------------------------------------------------------------------------------------------------
# Layer drop without stragglers (item 4)
# ------------------------------------------------------------------------------------------------


def test_shared_counts_keep_each_blocks_drop_rate_and_choose_samples_per_rank():
    depth, rate, batch, trials = 24, 0.4, 8, 3000
    expected = torch.linspace(0, rate, depth)
    frequency = torch.zeros(depth)
    pairs = torch.zeros(())
    for trial in range(trials):
        ranks = [sample_layer_drop(batch, depth, rate, torch.Generator().manual_seed(1000 * r + trial),
                                   torch.Generator().manual_seed(trial)) for r in range(2)]
        # Every rank runs each block on the same number of samples ...
        assert torch.equal(ranks[0].sum(0), ranks[1].sum(0))
        frequency += ranks[0].float().mean(0)
        pairs += (ranks[0][:, -1] & ranks[0][:, -2]).float().mean()
    frequency /= trials
    # ... and each sample still drops block i with probability i / (depth - 1) * rate.
    tolerance = 4 * torch.sqrt(expected * (1 - expected) / (trials * batch)) + 1e-9
    assert (frequency - expected).abs().le(tolerance).all(), (frequency, expected)
    assert not frequency[0]
    # Drops of two blocks are independent for a sample: P(both) = p_a p_b.
    both = float(pairs / trials)
    assert abs(both - float(expected[-1] * expected[-2])) < 0.02, both
    # Which samples drop a block differs between ranks (drawn per rank).
    a = sample_layer_drop(batch, depth, rate, torch.Generator().manual_seed(1), torch.Generator().manual_seed(9))
    b = sample_layer_drop(batch, depth, rate, torch.Generator().manual_seed(2), torch.Generator().manual_seed(9))
    assert not torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# metrics.jsonl of a relaunched run (item 8)
# ------------------------------------------------------------------------------------------------


def test_metrics_keep_only_the_rows_up_to_where_the_launch_starts(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "val_loss": 1.0}] + [{"step": s, "loss": 1.0 / s} for s in range(1, 16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 16, "lo')  # cut by a crash
    with _open_metrics(path, start_step=10) as handle:
        handle.write(json.dumps({"step": 11, "loss": 0.5}) + "\n")
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == list(range(0, 12))
    with _open_metrics(path, start_step=None):
        pass
    assert path.read_text() == ""  # a launch from step 0 starts anew


# ------------------------------------------------------------------------------------------------
# The real trainer, in one process: host syncs per step (item 3) and MFU (item 6)
# ------------------------------------------------------------------------------------------------

# Ops whose result the host must read (a device-to-host sync on a GPU), or whose output shape
# depends on the data (nonzero and friends read a count back before they can allocate).
SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "_unique2", "unique_dim",
            "unique_consecutive", "equal", "allclose", "item", "repeat_interleave", "nonzero_static"}


class SyncCounter(TorchDispatchMode):
    """Records data-dependent ops on device tensors, keyed by the trainer's step at the time.

    Some draws live on the host by design: the layer-drop masks and which samples are degraded
    (drawn on the CPU so that the host knows the per-block sample counts and the degraded
    samples without asking the device); ops whose tensor inputs all derive from them are host
    work and not counted. On this CPU run the device is the CPU too, so host tensors are told
    apart by where they come from: draws from the host generators, and what is computed only
    from them.
    """

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer
        self.host: dict[int, torch.Tensor] = {}
        self.syncs: list[tuple[int, str]] = []

    def mark_host(self, tensor):
        self.host[id(tensor)] = tensor

    def host_function(self, function):
        """``function`` run unobserved, its tensor outputs marked as host tensors."""

        def run(*args, **kwargs):
            with _disable_current_modes():
                out = function(*args, **kwargs)
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.mark_host(t)
            return out

        return run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_host = bool(tensors) and all(id(t) in self.host for t in tensors)
        name = func._overloadpacket.__name__
        boolean_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))
        if (name in SYNC_OPS or boolean_index) and not on_host:
            self.syncs.append((self.trainer.step, name))
        out = func(*args, **kwargs)
        if on_host:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.mark_host(t)
        return out


@pytest.fixture
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_a_step_syncs_the_host_once_outside_log_and_checkpoint_steps(shards, tmp_path, process_group, monkeypatch):
    log_every, steps = 4, 9
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", [
        f"data.root={shards}", f"run_dir={tmp_path / 'run'}", f"loop.max_steps={steps}",
        f"loop.log_every={log_every}", "loop.val_every=0", "checkpoint.every=1000", "data.num_workers=1",
        "data.batch_size=2", "loop.global_batch=4",  # two micro-batches per step
        "model.layer_drop=0.5", "loop.peak_tflops=1.0",
    ])
    trainer = Trainer(cfg)
    counter = SyncCounter(trainer)
    # The host's own draws: the layer-drop masks and which samples are degraded.
    monkeypatch.setattr(train.trainer, "sample_layer_drop", counter.host_function(sample_layer_drop))
    monkeypatch.setattr(train.augment, "_draw_degraded", counter.host_function(train.augment._draw_degraded))
    try:
        with counter:
            trainer.train()
    finally:
        trainer.close()
    per_step = Counter(step for step, _ in counter.syncs)
    # Ops while trainer.step == k: the log/checkpoint work of step k, then step k + 1's
    # agreement and train_step. Steps 4 and 8 log, step 9 logs and checkpoints.
    quiet = [k for k in range(steps) if k % log_every and k != steps]
    assert quiet == [1, 2, 3, 5, 6, 7]
    for k in quiet:
        assert per_step[k] == 1, (k, [s for s in counter.syncs if s[0] == k])
    assert all(name == "_local_scalar_dense" for step, name in counter.syncs if step in quiet)

    # MFU counts the model FLOPs that ran: the layer-drop masks of the logged steps give them
    # exactly (forward x 3), over the window's training time and the peak of 1 TFLOP/s.
    outside, block = forward_flops_parts(cfg.model)
    depth = ENCODERS[cfg.model.encoder].depth
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "mfu" in r}
    assert sorted(logged) == [4, 8, 9]
    for end, start in ((4, 0), (8, 4), (9, 8)):
        flops = 0.0
        for step in range(start, end):
            for micro in range(2):
                random = step_random(cfg.seed, 0, step, micro, torch.device("cpu"))
                drop = sample_layer_drop(2, depth, cfg.model.layer_drop, random.layer_drop, random.drop_counts)
                flops += 3 * (2 * outside + int((~drop).sum()) * block)
        record = logged[end]
        seconds = record["step_seconds"] * (end - start)
        assert record["mfu"] == pytest.approx(flops / seconds / 1e12, rel=1e-6)
        assert math.isfinite(record["loss"])
