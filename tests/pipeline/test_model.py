"""Tests for pipeline.model: shapes, the pixel-shuffle readout, layer drop, fused attention,
FLOPs and parameter counts; parity with Cellpose 4's ``cellpose.vit.CPSAM``. Weight files (SAM,
Cellpose, the export): tests/pipeline/test_weights.py."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention as SamAttention
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.model import (
    CPSAM,
    ModelConfig,
    RelPosAttention,
    flops_per_image,
    sample_layer_drop,
    sincos_pos_embed,
)
from pipeline.weights import from_cellpose, to_cellpose

TINY = ModelConfig(encoder="tiny")


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a random value, so zero-initialised tables (relative and absolute
    positions) and unit norms take part in comparisons. W2 and the diameters are left alone."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in ("W2", "diam_labels", "diam_mean"):
                continue
            noise = torch.randn(param.shape, generator=generator)
            is_norm_weight = name.endswith(("norm1.weight", "norm2.weight"))
            if is_norm_weight or ".neck.1.weight" in name or ".neck.3.weight" in name:
                param.copy_(1 + 0.1 * noise)
            elif "rel_pos" in name or "pos_embed" in name:
                param.copy_(0.2 * noise)
            else:
                param.copy_(0.02 * noise)
    return model


def tiny_model(seed: int = 0, **overrides) -> CPSAM:
    torch.manual_seed(seed)
    return randomise(CPSAM(ModelConfig(encoder="tiny", **overrides)), seed)


def images(batch: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand((batch, channels, 256, 256), generator=torch.Generator().manual_seed(seed))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ------------------------------------------------------------------------------------------------
# Config and shapes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"encoder": "vit_h"}, "encoder"),
        ({"layer_drop": 1.5}, "layer_drop"),
        ({"layer_drop": -0.1}, "layer_drop"),
        ({"in_channels": 4}, "in_channels"),
        ({"in_channels": 0}, "in_channels"),
        ({"image_size": 250}, "multiple of patch_size"),
        ({"patch_size": 8.0}, "patch_size"),
        ({"attention": "flash"}, "attention"),
        ({"pos_embed_init": "learned"}, "pos_embed_init"),
        ({"init_checkpoint": 3}, "init_checkpoint must be a path"),
        ({"sam_checkpoint": "sam.pth", "init_checkpoint": "cpsam"}, "sam_checkpoint=null"),
    ],
)
def test_config_rejects_bad_fields(fields, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**fields)


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_output_shape_and_zero_padding(channels):
    three = tiny_model().eval()
    model = CPSAM(ModelConfig(encoder="tiny", in_channels=channels)).eval()
    model.load_state_dict(three.state_dict())
    x = images(2, channels)
    with torch.no_grad():
        out = model(x)
        padded = three(F.pad(x, (0, 0, 0, 0, 0, 3 - channels)))
    assert out.shape == (2, 3, 256, 256) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Fewer channels are the same as zeros in the missing (last) ones.
    torch.testing.assert_close(out, padded, rtol=0, atol=0)


def test_forward_rejects_bad_input():
    model = CPSAM(TINY).eval()
    with pytest.raises(ValueError, match=r"\(B, 3, 256, 256\)"):
        model(torch.zeros(1, 1, 256, 256))
    with pytest.raises(ValueError, match="256x256"):
        model(torch.zeros(1, 3, 128, 128))
    with pytest.raises(TypeError, match="float"):
        model(torch.zeros(1, 3, 256, 256, dtype=torch.uint8))


def test_structure_matches_the_paper():
    # paper.md 2a: 8x8 patches, 32x32 tokens, global attention everywhere, SAM's table shapes.
    with torch.device("meta"):
        model = CPSAM(ModelConfig())
    encoder = model.encoder
    assert encoder.patch_embed.proj.weight.shape == (1024, 3, 8, 8)
    assert encoder.patch_embed.proj.stride == (8, 8) and encoder.patch_embed.proj.bias is not None
    assert encoder.pos_embed.shape == (1, 32, 32, 1024)
    for index, block in enumerate(encoder.blocks):
        assert block.window_size == 0
        rows = 127 if index in (5, 11, 17, 23) else 27
        assert block.attn.rel_pos_h.shape == block.attn.rel_pos_w.shape == (rows, 64)
    assert model.out.weight.shape == (192, 256, 1, 1) and model.out.bias.shape == (192,)
    tiny_rows = [block.attn.rel_pos_h.shape[0] for block in CPSAM(TINY).encoder.blocks]
    assert tiny_rows == [27, 127]  # the tiny model exercises both kinds of table


def test_init_weights_is_reproducible_and_materialises_meta():
    with torch.device("meta"):
        model = CPSAM(TINY)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(1))
    again = CPSAM(TINY)
    again.init_weights(torch.Generator().manual_seed(1))
    for (name, value), other in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(value, other), name
        assert torch.isfinite(value).all(), name
    assert float(model.diam_mean) == float(model.diam_labels) == 30.0
    assert not model.encoder.blocks[0].attn.rel_pos_h.any()  # SAM's zero init
    assert 0 < model.encoder.pos_embed.std() < 0.03


def mae_sincos_2d(grid_size: int, dim: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed (facebookresearch/mae, util/pos_embed.py), restated in
    NumPy from its definition: grid = meshgrid(w, h), so the first half of the channels encodes
    grid[0] (the column) and the second grid[1] (the row); each half is [sin(p w), cos(p w)]
    with w_k = 1 / 10000 ** (k / (dim / 4)). Returns (grid_size ** 2, dim), row-major tokens."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")

    def half(positions):
        angles = positions.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([half(cols), half(rows)], axis=1)


def test_sincos_pos_embed_is_maes_table():
    table = sincos_pos_embed(32, 32, 64)
    expected = mae_sincos_2d(32, 64)
    np.testing.assert_allclose(table.reshape(32 * 32, 64).numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(4, 4, 30)


def test_pos_embed_init_sincos_starts_from_the_table():
    model = CPSAM(dataclasses.replace(TINY, pos_embed_init="sincos"))
    torch.testing.assert_close(model.encoder.pos_embed[0], sincos_pos_embed(32, 32, 64))
    model.init_weights(torch.Generator().manual_seed(3))  # re-init keeps the table
    torch.testing.assert_close(model.encoder.pos_embed[0], sincos_pos_embed(32, 32, 64))
    assert model.encoder.pos_embed.requires_grad  # a starting point, trained like SAM's


# ------------------------------------------------------------------------------------------------
# Readout: W2 as conv_transpose2d is PixelShuffle(8)
# ------------------------------------------------------------------------------------------------


def test_pixel_shuffle_is_cellposes_w2():
    w2 = to_cellpose(CPSAM(TINY))["W2"]
    assert w2.shape == (192, 3, 8, 8)
    readout = torch.randn(2, 192, 4, 5)
    expected = F.conv_transpose2d(readout, w2, stride=8)
    assert torch.equal(F.pixel_shuffle(readout, 8), expected)
    # paper.md 2a: readout channel c*64 + a*8 + b -> output channel c at pixel (8i + a, 8j + b).
    for c, a, b, i, j in [(0, 0, 0, 0, 0), (1, 3, 5, 2, 1), (2, 7, 7, 3, 4), (2, 0, 6, 1, 3)]:
        one_hot = torch.zeros(1, 192, 4, 5)
        one_hot[0, c * 64 + a * 8 + b, i, j] = 1.0
        shuffled = F.pixel_shuffle(one_hot, 8)
        assert shuffled[0, c, 8 * i + a, 8 * j + b] == 1.0 and shuffled.sum() == 1.0


def test_model_output_is_readout_through_w2():
    model = tiny_model().eval()
    captured = {}
    model.out.register_forward_hook(lambda module, args, output: captured.update(readout=output))
    with torch.no_grad():
        out = model(images(1))
    w2 = to_cellpose(model)["W2"]
    assert torch.equal(out, F.conv_transpose2d(captured["readout"], w2, stride=8))


# ------------------------------------------------------------------------------------------------
# Layer drop
# ------------------------------------------------------------------------------------------------


def test_layer_drop_schedule_is_linear_per_block():
    depth, layer_drop, samples = 24, 0.4, 20000
    drop = sample_layer_drop(samples, depth, layer_drop, torch.Generator().manual_seed(0))
    assert drop.shape == (samples, depth) and drop.dtype == torch.bool
    expected = torch.linspace(0, layer_drop, depth)
    frequency = drop.float().mean(0)
    tolerance = 4 * torch.sqrt(expected * (1 - expected) / samples) + 1e-9
    assert (frequency - expected).abs().le(tolerance).all(), (frequency, expected)
    assert not drop[:, 0].any()
    # Per sample: rows differ (not one draw per batch).
    assert len({tuple(row.tolist()) for row in drop[:64]}) > 32
    # Same generator state, same masks.
    again = sample_layer_drop(samples, depth, layer_drop, torch.Generator().manual_seed(0))
    assert torch.equal(drop, again)


def test_eval_mode_never_drops():
    model = tiny_model(layer_drop=1.0).eval()
    plain = CPSAM(ModelConfig(encoder="tiny", layer_drop=0.0)).train()
    plain.load_state_dict(model.state_dict())
    x = images(2)
    with torch.no_grad():
        first = model(x, torch.Generator().manual_seed(0))
        second = model(x, torch.Generator().manual_seed(1))
        no_drop = plain(x)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, no_drop, rtol=0, atol=0)


def masked_reference(model: CPSAM, x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Cellpose's way: every block on every sample, then keep the input where dropped."""
    tokens = model.encoder.patch_embed(x) + model.encoder.pos_embed
    for index, block in enumerate(model.encoder.blocks):
        mask = drop[:, index].float().view(-1, 1, 1, 1)
        tokens = tokens * mask + block(tokens) * (1 - mask)
    return F.pixel_shuffle(model.out(model.encoder.neck(tokens.permute(0, 3, 1, 2))), 8)


def test_skipping_dropped_samples_equals_masking():
    model = tiny_model(layer_drop=0.6).train()
    x = images(8)
    drop = sample_layer_drop(8, 2, 0.6, torch.Generator().manual_seed(5))
    assert drop[:, 1].any() and not drop[:, 1].all()  # a mixed batch at the last block
    batch_sizes = []
    for block in model.encoder.blocks:
        block.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    with torch.no_grad():
        skipped = model(x, torch.Generator().manual_seed(5))
        masked = masked_reference(model, x, drop)
    # Each block ran on exactly the samples that keep it.
    assert batch_sizes[:2] == (~drop).sum(0).tolist()
    # Not bitwise: a block on 3 samples may round differently from one on 8 (BLAS blocking).
    torch.testing.assert_close(skipped, masked, rtol=1e-5, atol=1e-5)


def test_default_generator_is_torch_manual_seed():
    model = tiny_model(layer_drop=0.6).train()
    x = images(4)
    with torch.no_grad():
        torch.manual_seed(11)
        first = model(x)
        torch.manual_seed(11)
        second = model(x)
        torch.manual_seed(11)
        drop = sample_layer_drop(4, 2, 0.6)
        masked = masked_reference(model, x, drop)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, masked, rtol=1e-5, atol=1e-5)


def test_fully_dropped_block_still_runs_forward_and_backward():
    # layer_drop=1: the last block is dropped for every sample.
    model = tiny_model(layer_drop=1.0).train()
    calls = []
    for index, block in enumerate(model.encoder.blocks):
        block.register_forward_pre_hook(lambda module, args, index=index: calls.append(index))
    x = images(2)
    out = model(x, torch.Generator().manual_seed(0))
    out.square().mean().backward()
    assert calls == [0, 1]  # every block is called (FSDP hooks), dropped or not
    last = model.encoder.blocks[-1]
    for name, param in last.named_parameters():
        assert param.grad is not None, name  # its backward ran, so a reduce-scatter would too
        assert not param.grad.any(), name  # and it contributed nothing
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        masked = masked_reference(model, x, torch.tensor([[False, True], [False, True]]))
    torch.testing.assert_close(out.detach(), masked, rtol=1e-5, atol=1e-5)


def test_layer_drop_gradients_match_masking():
    model = tiny_model(layer_drop=0.6).train()
    x = images(6)
    drop = sample_layer_drop(6, 2, 0.6, torch.Generator().manual_seed(2))
    model(x, torch.Generator().manual_seed(2)).square().mean().backward()
    skipped = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    masked_reference(model, x, drop).square().mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(skipped[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_layer_drop_generator_must_be_cpu():
    class FakeGenerator:
        device = torch.device("cuda", 0)

    with pytest.raises(ValueError, match="CPU"):
        sample_layer_drop(2, 4, 0.4, FakeGenerator())


# ------------------------------------------------------------------------------------------------
# Fused attention: the same function as segment-anything's Attention
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["masked", "extended"])
@pytest.mark.parametrize("table_side, grid", [(14, (32, 32)), (64, (32, 32)), (14, (6, 9)), (8, (8, 8))])
def test_fused_attention_equals_sams(table_side, grid, path):
    # The reference is segment-anything's Attention.forward (scores, add_decomposed_rel_pos,
    # softmax, values) on the same parameters: SAM's windowed (27-row) and global (127-row)
    # tables interpolated to the grid, a non-square grid, and a table that needs no interpolation.
    # Both ways of passing the bias: the extended query and key (the default) and the (N, N)
    # mask (RelPosAttention.bias_as_mask).
    dim, heads = 64, 2
    torch.manual_seed(0)
    sam = SamAttention(dim, num_heads=heads, qkv_bias=True, use_rel_pos=True, input_size=(table_side, table_side))
    fused = RelPosAttention(dim, num_heads=heads, qkv_bias=True, use_rel_pos=True, input_size=(table_side, table_side))
    with torch.no_grad():
        sam.rel_pos_h.normal_(0, 0.5)
        sam.rel_pos_w.normal_(0, 0.5)
    fused.load_state_dict(sam.state_dict())
    fused.bias_as_mask = path == "masked"
    assert list(fused.state_dict()) == list(sam.state_dict())
    x = torch.randn(3, *grid, dim, generator=torch.Generator().manual_seed(1))
    x_sam, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, got = sam(x_sam), fused(x_fused)
    assert got.shape == expected.shape == x.shape
    assert relative_error(got, expected) < 1e-5
    # The bias must matter for the comparison to mean anything.
    assert relative_error(expected, sam_without_rel_pos(sam, x)) > 0.05
    upstream = torch.randn_like(expected)
    (expected * upstream).sum().backward()
    (got * upstream).sum().backward()
    assert relative_error(x_fused.grad, x_sam.grad) < 1e-5
    for (name, p_sam), p_fused in zip(sam.named_parameters(), fused.parameters()):
        assert relative_error(p_fused.grad, p_sam.grad) < 1e-4, name


def sam_without_rel_pos(sam: nn.Module, x: torch.Tensor) -> torch.Tensor:
    ablated = SamAttention(x.shape[-1], num_heads=sam.num_heads, qkv_bias=True)
    ablated.qkv, ablated.proj = sam.qkv, sam.proj
    with torch.no_grad():
        return ablated(x)


def test_fused_model_equals_sam_attention_model():
    # Whole network, training mode with layer drop off: outputs and parameter gradients.
    reference = tiny_model(attention="sam", layer_drop=0.0).train()
    fused = CPSAM(ModelConfig(encoder="tiny", layer_drop=0.0)).train()
    fused.load_state_dict(reference.state_dict())
    assert all(isinstance(block.attn, RelPosAttention) for block in fused.encoder.blocks)
    assert not any(isinstance(block.attn, RelPosAttention) for block in reference.encoder.blocks)
    x = images(2)
    expected, got = reference(x), fused(x)
    assert relative_error(got, expected) < 1e-5
    expected.square().mean().backward()
    got.square().mean().backward()
    grads = dict(reference.named_parameters())
    for name, param in fused.named_parameters():
        assert relative_error(param.grad, grads[name].grad) < 1e-4, name


# ------------------------------------------------------------------------------------------------
# Parity with Cellpose 4 on Cellpose's own weights (loading and export: tests/pipeline/test_weights.py)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.reference
def test_parity_with_cellpose_cpsam():
    vit = pytest.importorskip("cellpose.vit")
    # The expected outputs are Cellpose 4.2.1.1's CPSAM forward on its own weights (random,
    # with the zero-initialised position tables randomised too so they take part).
    torch.manual_seed(0)
    reference = randomise(vit.CPSAM(), seed=1).eval()
    state = reference.state_dict()
    model = from_cellpose(state)
    x = images(1)
    with torch.no_grad():
        expected = reference(x)[0]
        got = model(x)
    error = relative_error(got, expected)
    assert error < 1e-4, error
    # Training mode: both draw the layer-drop masks from the default CPU generator in the same
    # way, so the same seed drops the same blocks; seed 3 drops some of the 24 blocks.
    reference.train()
    model.train()
    torch.manual_seed(3)
    assert sample_layer_drop(1, 24, 0.4).any()
    with torch.no_grad():
        torch.manual_seed(3)
        expected_train = reference(x)[0]
        torch.manual_seed(3)
        got_train = model(x)
    assert relative_error(got_train, expected_train) < 1e-4
    assert relative_error(expected_train, expected) > 1e-3  # the drop did change the output
    # Export loads back into Cellpose strictly, unchanged.
    exported = to_cellpose(model)
    assert list(exported) == list(state)
    assert all(torch.equal(exported[k], state[k]) for k in state)
    reference.load_state_dict(exported, strict=True)


# ------------------------------------------------------------------------------------------------
# FLOPs and parameter counts
# ------------------------------------------------------------------------------------------------


def counted_flops(model: CPSAM, batch: int) -> int:
    # Count on SAM's attention forward: flops_per_image is the network's arithmetic, while the
    # fused forward does more (its extended head width) for less memory traffic.
    assert model.cfg.attention == "sam", "count FLOPs on ModelConfig(attention='sam')"
    device = model.out.weight.device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(batch, 3, 256, 256, device=device))
    return counter.get_total_flops()


def test_flops_match_flop_counter():
    tiny = ModelConfig(encoder="tiny", attention="sam")
    assert counted_flops(CPSAM(tiny).eval(), 2) == 2 * flops_per_image(TINY) == 2 * flops_per_image(tiny)
    # vit_l on the meta device: the counter needs shapes only.
    with torch.device("meta"):
        vit_l = CPSAM(ModelConfig(attention="sam")).eval()
    assert counted_flops(vit_l, 1) == flops_per_image(ModelConfig())
    assert 7.2e11 < flops_per_image(ModelConfig()) < 7.3e11


def counted_non_block_flops(cfg: ModelConfig) -> int:
    """Patch embedding, neck and readout, counted on a copy with the blocks removed."""
    with torch.device("meta"):
        model = CPSAM(dataclasses.replace(cfg, attention="sam")).eval()
    model.encoder.blocks = nn.ModuleList()
    return counted_flops(model, 1)


def test_flops_with_skipped_blocks():
    cfg = ModelConfig()
    full = flops_per_image(cfg)
    outside = counted_non_block_flops(cfg)
    # Block i runs with probability 1 - 0.4 i / 23: 0.8 of the 24 blocks on average.
    expected = outside + (full - outside) * (1 - 0.4 / 2)
    assert math.isclose(flops_per_image(cfg, skip_dropped=True), expected, rel_tol=1e-12)
    assert flops_per_image(ModelConfig(layer_drop=0.0), skip_dropped=True) == full


def test_vit_l_parameter_counts():
    # paper.md 2a (measured on Cellpose's CPSAM): encoder 304,542,720 incl. the neck (852,992),
    # readout 49,344, W2 36,864 and two diameter scalars, 304,628,930 in all.
    with torch.device("meta"):
        model = CPSAM(ModelConfig())

    def count(tensors):
        return sum(t.numel() for t in tensors)

    assert count(model.encoder.parameters()) == 304_542_720
    assert count(model.encoder.neck.parameters()) == 852_992
    assert count(model.out.parameters()) == 49_344
    assert count(model.parameters()) == 304_592_064  # all trainable
    assert count(model.buffers()) == 2  # diam_labels, diam_mean; W2 is not stored
    exported = to_cellpose(model)
    assert exported["W2"].numel() == 36_864
    assert count(exported.values()) == 304_628_930


def test_tiny_model_learns():
    # The tiny config is meant for the demo, so it must be able to fit something: one image of
    # discs on a 64-pixel grid, with the disc mask as cellprob target and flows pointing to each
    # disc's centre. The flows depend on where a pixel sits in its disc, so matching them needs
    # the position embeddings and attention, not just the output biases.
    torch.manual_seed(0)
    model = CPSAM(TINY).train()
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    discs = ((yy % 64 - 32) ** 2 + (xx % 64 - 32) ** 2 < 20**2).float()
    x = discs.expand(1, 3, 256, 256)
    flows = torch.stack([-(yy % 64 - 32) / 20, -(xx % 64 - 32) / 20]) * discs
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        out = model(x, generator)
        flow_loss = F.mse_loss(out[:, :2], flows[None])
        prob_loss = F.binary_cross_entropy_with_logits(out[:, 2], discs[None])
        optimizer.zero_grad()
        (flow_loss + prob_loss).backward()
        optimizer.step()
    # Baselines: predicting zero flow everywhere, and a constant cellprob at the disc fraction.
    zero_flow = F.mse_loss(torch.zeros_like(flows), flows)
    fraction = discs.mean()
    constant_prob = -(fraction * fraction.log() + (1 - fraction) * (1 - fraction).log())
    assert flow_loss < 0.7 * zero_flow, (flow_loss, zero_flow)  # 0.042 vs 0.075 when written
    assert prob_loss < 0.3 * constant_prob, (prob_loss, constant_prob)  # 0.081 vs 0.617
