"""train.parallelize on a real one-process gloo group: FSDP2 alone, with activation
checkpointing, and with torch.compile, computes what the plain model computes (forward and
gradients), and the wrapped model still exports to Cellpose's layout with the plain model's
weights. The two-process runs of the whole trainer are in test_main.py."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

from pipeline.model import CPSAM, ModelConfig, to_cellpose
from train.parallelize import ParallelConfig, parallelize, uses_bf16


@pytest.fixture(scope="module")
def mesh():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def plain_model() -> CPSAM:
    torch.manual_seed(0)
    return CPSAM(ModelConfig(encoder="tiny", layer_drop=0.0)).train()


def forward_backward(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(x)
    (out[:, :2].square().mean() + out[:, 2].sigmoid().mean()).backward()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")] = grad
    return out.detach(), grads


@pytest.mark.distributed
@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(ParallelConfig(), id="fsdp"),
        pytest.param(ParallelConfig(activation_checkpointing=True), id="fsdp+activation_checkpointing"),
        pytest.param(ParallelConfig(activation_checkpointing=True, compile=True), id="fsdp+ac+compile",
                     marks=pytest.mark.slow),
    ],
)
def test_wrapped_model_computes_what_the_plain_model_computes(mesh, cfg):
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    reference = plain_model()
    expected_out, expected_grads = forward_backward(reference, x)

    wrapped = parallelize(copy.deepcopy(plain_model()), mesh, cfg)
    if cfg.activation_checkpointing:
        assert all("CheckpointWrapper" in type(getattr(b, "_orig_mod", b)).__name__ for b in wrapped.encoder.blocks)
    if cfg.compile:
        assert all(hasattr(b, "_orig_mod") for b in wrapped.encoder.blocks)
    out, grads = forward_backward(wrapped, x)
    # Compiled kernels reorder float sums; everything else is the same arithmetic.
    tol = dict(rtol=1e-4, atol=1e-5) if cfg.compile else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out, expected_out, **tol)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **tol, msg=name)

    # The export sees through every wrapper: the plain model's weights in Cellpose's layout.
    state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    exported, expected = to_cellpose(state), to_cellpose(plain_model())
    assert exported.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(exported[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.distributed
@pytest.mark.parametrize("pos_embed_init", ["normal", "sincos"])
def test_init_weights_on_the_sharded_model(mesh, pos_embed_init):
    # Initialising after sharding (meta device, to_empty, init_weights) gives each parameter a
    # DTensor of the right values: the sine-cosine table must be distributed, not copied in whole.
    cfg = ModelConfig(encoder="tiny", layer_drop=0.0, pos_embed_init=pos_embed_init)
    with torch.device("meta"):
        model = CPSAM(cfg)
    parallelize(model, mesh, ParallelConfig())
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0) if pos_embed_init == "normal" else None)
    pos_embed = model.encoder.pos_embed
    assert hasattr(pos_embed, "full_tensor")
    full = pos_embed.full_tensor().detach()
    if pos_embed_init == "sincos":
        torch.testing.assert_close(full, CPSAM(cfg).encoder.pos_embed.detach(), rtol=0, atol=0)
    else:
        # trunc_normal_(std=0.02) (its cut is at +-2 absolute, so in effect a normal draw).
        assert 0.018 < float(full.std()) < 0.022 and abs(float(full.mean())) < 0.002
    assert all(torch.isfinite(p.full_tensor()).all() for p in model.parameters())


@pytest.mark.distributed
def test_the_gpus_bf16_policy_runs_on_gloo(mesh):
    # The policy a CUDA run applies (mixed_precision "auto" on a cuda mesh), applied on the CPU:
    # parameters gathered in bf16 for compute, gradients reduced in fp32, fp32 shards kept.
    assert uses_bf16(ParallelConfig(), "cuda") and not uses_bf16(ParallelConfig(), "cpu")
    assert uses_bf16(ParallelConfig(mixed_precision="bf16"), "cpu")
    assert not uses_bf16(ParallelConfig(mixed_precision="fp32"), "cuda")
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    reference = plain_model()
    expected_out, expected_grads = forward_backward(reference, x)
    wrapped = parallelize(copy.deepcopy(plain_model()), mesh, ParallelConfig(mixed_precision="bf16"))
    out, grads = forward_backward(wrapped, x)
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in wrapped.parameters())
    assert all(g.dtype == torch.float32 for g in grads.values())
    # bf16 keeps 8 bits of mantissa: the outputs and gradients agree to about 1%.
    assert float((out.float() - expected_out).norm() / expected_out.norm()) < 0.02
    # Gradients go through every block's bf16 matmuls: taken together they agree to ~10%, while a
    # wrong reduction (bf16 sums, a missing shard) would be off by far more.
    got = torch.cat([grads[name].flatten() for name in sorted(grads)])
    want = torch.cat([expected_grads[name].flatten() for name in sorted(grads)])
    assert float((got - want).norm() / want.norm()) < 0.15
    assert float(torch.nn.functional.cosine_similarity(got, want, dim=0)) > 0.99
    # A few optimizer steps with the trainer's fused AdamW stay finite and move the weights.
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-3, fused=True)
    before = wrapped.out.weight.full_tensor().clone()
    for _ in range(3):
        optimizer.step()
        optimizer.zero_grad()
        forward_backward(wrapped, x)
    after = wrapped.out.weight.full_tensor()
    assert torch.isfinite(after).all() and not torch.equal(before, after)
