"""benchmarks/dry_run.py: a job sized from fake steps of the real model (tiny-cpu; the paper config is slow)."""

import json
from pathlib import Path

import pytest

from benchmarks import dry_run
from pipeline.model import ENCODERS, ModelConfig, flops_per_image, forward_flops_parts
from train.config import load_config
from train.data import loader_host_bytes

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny-cpu.yaml"
PAPER = REPO / "configs" / "paper.yaml"
GIB = 2**30


def _run(tmp_path: Path, config: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / f"dry_run_{len(list(tmp_path.iterdir()))}.json"
    code = dry_run.main(["--config", str(config), "--json", str(out), *args])
    return code, json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny-cpu as its comment launches it: 2 ranks, batch 4 each."""
    return _run(tmp_path_factory.mktemp("tiny"), TINY, "--world-size", "2")


def test_reports_the_figures_and_their_parts(tiny, capsys):
    code, figures = tiny
    assert code == 0 and figures["fits"] and figures["exceeded"] == []
    for key in ("device_peak_gib", "device_parts_gib", "flops_per_image", "model_flops_per_image",
                "images_per_s_at_50_mfu", "host_peak_gib", "host_parts_gib", "world_size", "batch_size",
                "activation_checkpointing", "mixed_precision"):
        assert key in figures
    assert (figures["world_size"], figures["batch_size"], figures["mixed_precision"]) == (2, 4, "fp32")
    parts = figures["device_parts_gib"]
    assert sum(parts.values()) == pytest.approx(figures["device_peak_gib"], rel=0.01)
    # Between steps: AdamW's two fp32 moments per parameter, sharded as the parameters are.
    held = figures["device_between_steps_gib"]
    assert held["optimizer_state"] == pytest.approx(2 * held["parameters"], rel=0.01)
    assert held["parameters"] == pytest.approx(parts["parameters"])
    # The device's input is the largest batch the loader can send: the one it pins (two of them
    # in page-locked memory by the loader's own count).
    cfg = load_config(TINY)
    host = loader_host_bytes(cfg.data)
    assert parts["inputs"] == pytest.approx(host["pinned"] / 2 / GIB, rel=0.01)
    assert parts["activations"] > 0
    # Host: the loader's own figures plus the fp32 model rank 0 builds (no SAM checkpoint here).
    assert figures["host_peak_gib"] == pytest.approx((host["total"] + 4 * figures["parameters"]) / GIB, rel=1e-6)
    assert figures["augment_counted"], figures["notes"]


def test_flops_per_image_are_the_model_flops_plus_what_the_fused_attention_adds(tiny):
    _, figures = tiny
    cfg = ModelConfig(**figures["config"]["model"])
    spec = ENCODERS[cfg.encoder]
    side = cfg.image_size // cfg.patch_size
    tokens, head_dim = side * side, spec.embed_dim // spec.num_heads
    model = 3 * flops_per_image(cfg, skip_dropped=True)
    assert figures["model_flops_per_image"] == pytest.approx(model)
    # Where executed FLOPs differ from 3 x the model's forward (torch.utils.flop_counter's rules):
    # the fused attention widens each head by the relative-position columns (side + side,
    # pipeline.model.RelPosAttention), and its backward counts 5 matmuls to the forward's 2;
    # the patch embedding's backward computes no input gradient (the images need none).
    attention = 4 * tokens**2 * spec.embed_dim  # q k^T and attention @ v, forward, per block
    widened = (head_dim + 2 * side) / head_dim
    blocks = flops_per_image(cfg, skip_dropped=True) - forward_flops_parts(cfg)[0]
    blocks /= forward_flops_parts(cfg)[1]  # the expected number of blocks an image runs
    patch_embedding = 2 * tokens * spec.embed_dim * 3 * cfg.patch_size**2
    expected = model + blocks * attention * (3.5 * widened - 3) - patch_embedding
    assert figures["flops_per_image"] == pytest.approx(expected, rel=0.01)
    assert figures["flops_per_image"] > model
    # 50% MFU: half the GPU's dense bf16 peak over the model FLOPs (train/trainer.py's MFU).
    assert figures["images_per_s_at_50_mfu"] == pytest.approx(0.5 * 989.4e12 / model)


def test_a_budget_exceeded_exits_1_and_names_it(tmp_path, capsys):
    code, figures = _run(tmp_path, TINY, "--world-size", "2", "--device-memory", "0.01")
    out = capsys.readouterr().out
    assert code == 1 and not figures["fits"]
    assert "DOES NOT FIT: device memory" in out and "--device-memory 0.01 GiB" in out
    assert "--host-memory" not in out
    assert figures["exceeded"] == [line.removeprefix("DOES NOT FIT: ") for line in out.splitlines()
                                   if line.startswith("DOES NOT FIT")]


def test_halving_the_batch_about_halves_the_activations(tmp_path):
    # Without layer drop, so that both batches run every block on every sample; with 256 x 256
    # windows, so that the inputs are a small part of the peak.
    runs = {}
    for batch in (4, 2):
        code, figures = _run(tmp_path, TINY, "--world-size", "2", "model.layer_drop=0", "data.max_side=256",
                             f"data.batch_size={batch}", f"loop.global_batch={2 * batch}")
        assert code == 0
        runs[batch] = figures["device_parts_gib"]
    assert runs[4]["temporaries"] > 0  # the peak is in the backward, not in augmentation
    assert runs[2]["activations"] / runs[4]["activations"] == pytest.approx(0.5, abs=0.06)
    assert runs[2]["inputs"] / runs[4]["inputs"] == pytest.approx(0.5, rel=0.01)
    assert runs[2]["parameters"] == runs[4]["parameters"]


def test_a_global_batch_the_trainer_refuses_is_refused(capsys):
    with pytest.raises(SystemExit):
        dry_run.main(["--config", str(TINY), "--world-size", "3"])
    assert "loop.global_batch (8) must be a multiple of" in capsys.readouterr().err


@pytest.mark.slow
def test_the_paper_config_fits_an_80_gib_gpu_and_checkpointing_saves_most_of_it(tmp_path):
    # The independent estimate for ViT-L, batch 32 per rank, bf16, 8 ranks: ~35 GiB per
    # rank without activation checkpointing and ~4 GiB with it.
    code, plain = _run(tmp_path, PAPER, "--world-size", "8")
    assert code == 0 and plain["fits"]
    assert (plain["mixed_precision"], plain["batch_size"], plain["world_size"]) == ("bf16", 32, 8)
    assert 20 < plain["device_peak_gib"] < 60
    code, checkpointed = _run(tmp_path, PAPER, "--world-size", "8", "parallel.activation_checkpointing=true")
    assert code == 0 and checkpointed["activation_checkpointing"]
    assert checkpointed["device_peak_gib"] < 0.3 * plain["device_peak_gib"]
    # Recomputing the forward: about 4/3 of the FLOPs (the recomputed share is the blocks').
    assert 1.2 < checkpointed["flops_per_image"] / plain["flops_per_image"] < 1.34
    # ViT-L at 256 x 256: about 280 images/s per H100 at 50% MFU (issue 18, item 7).
    assert 270 < plain["images_per_s_at_50_mfu"] < 300
