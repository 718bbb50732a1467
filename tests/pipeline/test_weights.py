"""Tests for pipeline.weights: SAM's checkpoints adapted to CP-SAM, Cellpose's cpsam layout in
and out (Cellpose 4's own CPSAM as the reference), the export and its json, fine-tuning starts."""

import dataclasses
import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch import nn

from pipeline.model import CPSAM, ENCODERS, ModelConfig
from pipeline.weights import (
    EXPORT_NAME,
    build_model,
    from_cellpose,
    load_sam_encoder,
    read_export,
    read_init_weights,
    read_sam_encoder,
    read_sidecar,
    sidecar_path,
    to_cellpose,
    unwrap_state_dict,
    write_export,
)
from tests.pipeline.test_model import images, randomise, relative_error, tiny_model

TINY = ModelConfig(encoder="tiny")


# ------------------------------------------------------------------------------------------------
# SAM checkpoints
# ------------------------------------------------------------------------------------------------


def sam_encoder(name: str) -> ImageEncoderViT:
    """An image encoder exactly as segment_anything's build_sam makes it (1024 input, 16x16
    patches, 14x14 windows), at the sizes of ENCODERS[name]."""
    spec = ENCODERS[name]
    return ImageEncoderViT(
        img_size=1024,
        patch_size=16,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=4,
        out_chans=spec.neck_dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=14,
        global_attn_indexes=spec.global_attn_indexes,
    )


@pytest.fixture(scope="module")
def tiny_sam_checkpoint(tmp_path_factory):
    """A SAM checkpoint in SAM's own key layout, for the tiny encoder."""
    torch.manual_seed(0)
    encoder = randomise(sam_encoder("tiny"), seed=3)
    state = {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}
    state["mask_decoder.iou_prediction_head.layers.0.weight"] = torch.randn(4, 4)
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(state, path)
    return path, encoder.state_dict()


def test_load_sam_encoder_adapts_patch_and_position_embeddings(tiny_sam_checkpoint):
    path, sam = tiny_sam_checkpoint
    model = CPSAM(TINY)
    readout_before = model.out.weight.clone()
    load_sam_encoder(model, path)
    ours = model.encoder.state_dict()
    # paper.md 2a: every second tap of the 16x16 kernel, no rescaling, bias kept.
    subsampled = sam["patch_embed.proj.weight"][:, :, ::2, ::2]
    assert torch.equal(ours["patch_embed.proj.weight"], subsampled)
    assert torch.equal(ours["patch_embed.proj.bias"], sam["patch_embed.proj.bias"])
    # The 64x64 grid with stride 2 -> 32x32.
    assert torch.equal(ours["pos_embed"], sam["pos_embed"][:, ::2, ::2])
    for key, value in sam.items():
        if key not in ("patch_embed.proj.weight", "pos_embed"):
            assert torch.equal(ours[key], value), key  # tables keep SAM's shapes (27 and 127 rows)
    assert torch.equal(model.out.weight, readout_before)  # the readout is not SAM's


def test_build_model_loads_the_configured_sam_checkpoint(tiny_sam_checkpoint):
    path, sam = tiny_sam_checkpoint
    model = build_model(ModelConfig(encoder="tiny", sam_checkpoint=str(path)))
    assert torch.equal(model.encoder.blocks[1].attn.rel_pos_h, sam["blocks.1.attn.rel_pos_h"])
    with torch.device("meta"):  # nothing to load into: the trainer loads after materialising
        assert build_model(ModelConfig(encoder="tiny", sam_checkpoint=str(path))).out.weight.is_meta


@pytest.mark.parametrize("attention", ["sam", "fused"])
def test_sam_encoder_in_our_forward_matches_sam_blocks(tiny_sam_checkpoint, attention):
    # Our forward with SAM's weights equals SAM's own modules run at the paper's geometry:
    # bit for bit with SAM's attention forward, to float rounding with the fused one.
    path, sam = tiny_sam_checkpoint
    model = CPSAM(ModelConfig(encoder="tiny", attention=attention)).eval()
    load_sam_encoder(model, path)
    reference = sam_encoder("tiny")
    reference.load_state_dict(sam)
    for block in reference.blocks:
        block.window_size = 0
    x = images(1)
    with torch.no_grad():
        weight = reference.patch_embed.proj.weight[:, :, ::2, ::2]
        tokens = F.conv2d(x, weight, reference.patch_embed.proj.bias, stride=8).permute(0, 2, 3, 1)
        tokens = tokens + reference.pos_embed[:, ::2, ::2]
        for block in reference.blocks:
            tokens = block(tokens)
        expected = F.pixel_shuffle(model.out(reference.neck(tokens.permute(0, 3, 1, 2))), 8)
        if attention == "sam":
            assert torch.equal(model(x), expected)
        else:
            assert relative_error(model(x), expected) < 1e-5


def test_sam_checkpoint_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "sam_vit_l_0b3195.pth"
    with pytest.raises(FileNotFoundError, match="nowhere/sam_vit_l_0b3195.pth"):
        load_sam_encoder(CPSAM(TINY), missing)


def test_sam_checkpoint_of_another_variant(tmp_path):
    # Only the tensors that name the variant: a vit_b patch embedding and 12 blocks.
    vit_b = tmp_path / "sam_vit_b.pth"
    torch.save(
        {
            "image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
            "image_encoder.blocks.11.norm1.weight": torch.zeros(768),
        },
        vit_b,
    )
    with torch.device("meta"):
        vit_l = CPSAM(ModelConfig())
    with pytest.raises(ValueError, match=r"vit_b \(embed_dim 768, depth 12\).*model is vit_l"):
        load_sam_encoder(vit_l, vit_b)
    with pytest.raises(ValueError, match=r"vit_b.*model is tiny"):
        load_sam_encoder(CPSAM(TINY), vit_b)


def test_sam_checkpoint_with_bad_geometry(tiny_sam_checkpoint):
    path, _ = tiny_sam_checkpoint
    with pytest.raises(ValueError, match="position embedding"):  # 64 is not a multiple of 28
        read_sam_encoder(path, ModelConfig(encoder="tiny", image_size=224))
    with pytest.raises(ValueError, match="patch-embedding kernel"):
        read_sam_encoder(path, ModelConfig(encoder="tiny", patch_size=5, image_size=160))


def test_not_a_sam_checkpoint(tmp_path):
    model = CPSAM(TINY)
    cellpose_file = tmp_path / "cpsam_tiny.pth"
    torch.save(to_cellpose(model), cellpose_file)
    with pytest.raises(ValueError, match="from_cellpose"):
        load_sam_encoder(model, cellpose_file)
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not a SAM checkpoint"):
        load_sam_encoder(model, other)
    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(ValueError, match="not a SAM checkpoint"):
        load_sam_encoder(model, tensor_file)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_sam_encoder(model, garbage)
    broken = tmp_path / "broken.pth"
    state = {f"image_encoder.{k}": v for k, v in sam_encoder("tiny").state_dict().items()}
    del state["image_encoder.blocks.1.mlp.lin2.bias"]
    torch.save(state, broken)
    with pytest.raises(ValueError, match=r"missing: encoder.blocks.1.mlp.lin2.bias"):
        load_sam_encoder(model, broken)


# ------------------------------------------------------------------------------------------------
# Cellpose checkpoints
# ------------------------------------------------------------------------------------------------


def test_to_cellpose_layout_and_round_trip():
    model = tiny_model().eval()
    exported = to_cellpose(model)
    assert list(exported)[:3] == ["diam_labels", "diam_mean", "W2"]
    assert list(exported)[3:5] == ["encoder.pos_embed", "encoder.patch_embed.proj.weight"]
    assert list(exported)[-2:] == ["out.weight", "out.bias"]
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in exported.values())
    loaded = from_cellpose(exported)
    assert not loaded.training and loaded.cfg == ModelConfig(encoder="tiny")
    for key, value in to_cellpose(loaded).items():
        assert torch.equal(value, exported[key]), key
    x = images(2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_diameters_round_trip():
    model = CPSAM(TINY)
    model.diam_labels.fill_(17.5)
    exported = to_cellpose(model)
    assert float(exported["diam_labels"]) == 17.5 and float(exported["diam_mean"]) == 30.0
    assert float(from_cellpose(exported).diam_labels) == 17.5


def test_wrapper_prefixes_are_removed():
    model = tiny_model()
    exported = to_cellpose(model)
    # DDP's "module." (Cellpose's own loader strips it), compile's "_orig_mod.", FSDP1 and
    # activation checkpointing wrappers.
    wrapped = {f"module._orig_mod.{k}": v for k, v in exported.items()}
    assert torch.equal(from_cellpose(wrapped).out.weight, model.out.weight)
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for index, block in enumerate(model.encoder.blocks):
        model.encoder.blocks[index] = checkpoint_wrapper(block)
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    for key, value in to_cellpose(compiled).items():
        assert torch.equal(value, exported[key]), key
    # The checkpoint wrapper hides its prefix from state_dict() but not from named_parameters().
    named = dict(compiled.named_parameters()) | dict(compiled.named_buffers())
    assert any("_checkpoint_wrapped_module" in k for k in named)
    for key, value in to_cellpose(named).items():
        assert torch.equal(value, exported[key]), key
    fsdp1 = unwrap_state_dict({"_fsdp_wrapped_module.encoder._fsdp_wrapped_module.pos_embed": 1})
    assert fsdp1 == {"encoder.pos_embed": 1}
    with pytest.raises(ValueError, match="two tensors for 'out.bias'"):
        unwrap_state_dict({"out.bias": 1, "module.out.bias": 2})


def test_from_cellpose_refuses_bad_checkpoints():
    exported = to_cellpose(CPSAM(TINY))
    without_w2 = {k: v for k, v in exported.items() if k != "W2"}
    with pytest.raises(ValueError, match="no W2"):
        from_cellpose(without_w2)
    with pytest.raises(ValueError, match="W2"):
        from_cellpose(exported | {"W2": torch.ones_like(exported["W2"])})
    with pytest.raises(ValueError, match="CP-DINO"):
        from_cellpose(exported | {"encoder.cls_token": torch.zeros(1, 1, 64)})
    with pytest.raises(ValueError, match="unexpected: encoder.extra"):
        from_cellpose(exported | {"encoder.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing: encoder.neck.1.bias"):
        from_cellpose({k: v for k, v in exported.items() if k != "encoder.neck.1.bias"})
    with pytest.raises(ValueError, match="readout has 64 channels"):
        from_cellpose(exported | {"out.weight": torch.zeros(64, 64, 1, 1)})
    with pytest.raises(ValueError, match="encoder='tiny'.*encoder='vit_l'"):
        from_cellpose(exported, ModelConfig(encoder="vit_l"))
    # A config with the checkpoint's shape supplies the rest.
    cfg = ModelConfig(encoder="tiny", layer_drop=0.1)
    assert from_cellpose(exported, cfg).cfg.layer_drop == 0.1


def test_to_cellpose_of_a_bfloat16_model_is_float32():
    model = tiny_model()
    exported = to_cellpose(model.to(torch.bfloat16))
    assert all(v.dtype == torch.float32 for v in exported.values())
    assert torch.equal(exported["out.weight"], model.out.weight.float())


@pytest.mark.reference
def test_vit_l_layout_matches_cellpose():
    vit = pytest.importorskip("cellpose.vit")
    # Built on the meta device: keys, order and shapes, no storage. The expected layout is
    # Cellpose 4.2.1.1's own CPSAM state_dict (paper.md 2b: 350 tensors).
    with torch.device("meta"):
        reference = vit.CPSAM()
        ours = CPSAM(ModelConfig())
    expected = reference.state_dict()
    exported = to_cellpose(ours)
    assert len(exported) == 350
    assert list(exported) == list(expected)
    assert all(exported[k].shape == expected[k].shape for k in expected)
    reference.load_state_dict(exported, strict=True, assign=True)
    assert from_cellpose(to_cellpose(ours)).cfg == ModelConfig()


# ------------------------------------------------------------------------------------------------
# The export (weights + json) and fine-tuning starts
# ------------------------------------------------------------------------------------------------


def test_export_round_trips_with_its_json(tmp_path):
    cfg = ModelConfig(encoder="tiny", in_channels=1, layer_drop=0.1, sam_checkpoint="sam_vit_l.pth")
    model = tiny_model(in_channels=1, layer_drop=0.1)
    path = tmp_path / EXPORT_NAME
    write_export(path, model.state_dict(), cfg, step=12)
    assert sidecar_path(path) == tmp_path / "model_cellpose.json"
    assert json.loads(sidecar_path(path).read_text())["step"] == 12
    assert not path.with_name(path.name + ".tmp").exists()
    loaded, sidecar = read_export(path)
    # Where training started need not exist where the export is used: both cleared.
    assert sidecar.step == 12
    assert sidecar.model == dataclasses.replace(cfg, sam_checkpoint=None)
    assert loaded.cfg == sidecar.model and not loaded.training
    x = images(1, channels=1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_official_file_has_no_sidecar(tmp_path):
    path = tmp_path / "cpsam"
    torch.save(to_cellpose(tiny_model()), path)
    assert read_sidecar(path) is None
    loaded, sidecar = read_export(path)
    assert sidecar is None and loaded.cfg == TINY


def test_bad_sidecar_is_named(tmp_path):
    path = tmp_path / EXPORT_NAME
    write_export(path, tiny_model().state_dict(), TINY, step=1)
    sidecar_path(path).write_text(json.dumps({"model": {"encoder": "tiny", "colour": 1}, "step": 1}))
    with pytest.raises(ValueError, match="model_cellpose.json: expected the trainer's json"):
        read_export(path)
    # Missing, folder and unreadable files: tests/infer/test_predict.py (load_model reads through here).


@pytest.mark.parametrize("with_json", [True, False])
def test_init_weights_from_an_export_or_a_cpsam_file(tmp_path, with_json):
    model = tiny_model(seed=4)
    model.diam_labels.fill_(17.0)
    path = tmp_path / ("model_cellpose.pt" if with_json else "cpsam")
    if with_json:
        write_export(path, model.state_dict(), TINY, step=3)
    else:
        torch.save(to_cellpose(model), path)
    # The trainer's config may differ in what is not geometry (layer drop, channels).
    state = read_init_weights(path, ModelConfig(encoder="tiny", layer_drop=0.0, in_channels=2))
    assert list(state) == list(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert float(state["diam_labels"]) == 17.0


def test_init_weights_check_the_geometry(tmp_path):
    small = ModelConfig(encoder="tiny", image_size=128)
    path = tmp_path / EXPORT_NAME
    write_export(path, CPSAM(small).state_dict(), small, step=1)
    with pytest.raises(ValueError, match=r"image_size=128.*config asks for.*image_size=256"):
        read_init_weights(path, TINY)
    with pytest.raises(ValueError, match=r"encoder='tiny'.*encoder='vit_b'"):
        read_init_weights(path, ModelConfig(encoder="vit_b", image_size=128))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        read_init_weights(tmp_path / "missing.pt", TINY)
