"""The CP-SAM network: SAM's ViT image encoder at 8x8 patches with a pixel-shuffle readout.

The encoder is segment-anything's own ``ImageEncoderViT``, built at SAM's native geometry
(1024 input, 16x16 patches, 14x14 windows) so that every table has SAM's shape, then changed as
Cellpose-SAM changes it (paper.md 2a):

* 8x8 patches: the patch-embedding conv has kernel and stride 8; SAM's 16x16 kernel is adapted by
  taking every second tap in each direction (no rescaling, bias kept);
* 256x256 input, so 32x32 tokens; the absolute position embedding is SAM's 64x64 grid subsampled
  with stride 2 to (1, 32, 32, embed_dim);
* global attention in every block (``window_size = 0``). The relative-position tables keep their
  SAM shapes: 27 x head_dim in the formerly windowed blocks, 127 x head_dim in SAM's global
  blocks. SAM's ``get_rel_pos`` interpolates both linearly to 63 = 2 * 32 - 1 rows on every
  forward, which is what the official checkpoints were trained with;
* attention (``ModelConfig.attention``): by default ``"fused"``, :class:`RelPosAttention`, the
  same function as SAM's attention (scores + decomposed relative-position bias, softmax, values)
  computed by one ``scaled_dot_product_attention`` call, so flash / memory-efficient kernels run
  on GPUs instead of materialising (batch, heads, 1024, 1024) scores; ``"sam"`` keeps
  segment-anything's own forward (the reference it is tested against);
* SAM's neck, unchanged: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d;
* readout: a 1x1 conv to 3 * 8 * 8 channels (with bias) and a fixed pixel shuffle to
  (dy, dx, cellprob logit) at 256x256. Cellpose stores the shuffle as a frozen identity tensor
  ``W2`` used in a stride-8 ``conv_transpose2d``; that is exactly ``PixelShuffle(8)`` (readout
  channel ``c * 64 + a * 8 + b`` lands in output channel ``c`` at pixel ``(8 i + a, 8 j + b)``),
  so this module has no ``W2`` and :func:`pipeline.weights.to_cellpose` writes it.

Stochastic depth ("layer drop", paper.md 1a): in training mode each sample skips block ``i``
with probability ``layer_drop * i / (depth - 1)``; a skipped block is the identity, with no
``1 / (1 - p)`` rescaling. Unlike Cellpose, which runs every block on every sample and masks,
a block here runs only on the samples that keep it: the same output (up to float rounding)
for less work.

Variants (:data:`ENCODERS`): ``vit_l`` (the paper; 304,592,064 parameters, all trainable, plus
the two diameter buffers), ``vit_b``, and ``tiny`` (width 64, 2 blocks, 2 heads, 64-channel
neck; ~0.24M parameters) for CPU tests and the demo; its sizes are justified beside it.

The module is single-device code. FSDP2, ``torch.compile`` and activation checkpointing are
applied from outside. Weight files (SAM's release, Cellpose's cpsam layout, which is also this
project's export, and the export's json) are read and written by :mod:`pipeline.weights`.

The conventions every stage relies on are defined here, once: :data:`FLOW_SCALE` (the network
predicts 5 x the unit flows), :data:`DIAMETER_MEAN` (30 px, the diameter images are rescaled to
and the model's ``diam_mean``) and :data:`MIN_DIAMETER` (5 px, the floor under per-image
diameters). They live with the network, not with the weights module, because the network's
buffers need them and the weights module needs the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, get_rel_pos
from torch import Tensor, nn

__all__ = [
    "ENCODERS",
    "EncoderSpec",
    "ModelConfig",
    "CPSAM",
    "RelPosAttention",
    "attention_extended",
    "attention_masked",
    "set_bias_as_mask",
    "sample_layer_drop",
    "sincos_pos_embed",
    "flops_per_image",
    "forward_flops_parts",
    "FLOW_SCALE",
    "DIAMETER_MEAN",
    "MIN_DIAMETER",
    "NUM_OUTPUTS",
]

# SAM's native geometry. The encoder is built at this geometry first so that the relative-position
# tables get SAM's shapes (2 * 14 - 1 = 27 rows in windowed blocks, 2 * 64 - 1 = 127 in global
# ones); only the patch embedding and the absolute position embedding are then replaced.
SAM_IMAGE_SIZE = 1024
SAM_PATCH_SIZE = 16
SAM_WINDOW_SIZE = 14
MLP_RATIO = 4
LAYER_NORM_EPS = 1e-6
NUM_OUTPUTS = 3  # dy, dx, cellprob logit

# Conventions that shardgen, train and infer must agree on (paper.md 1b, 1c), defined only here.
#: The network predicts FLOW_SCALE x the unit-length flows; the loss targets them and the dynamics
#: divide by it.
FLOW_SCALE = 5.0
#: Cellpose's training diameter (px): images are rescaled so their median diameter is this before
#: the random zoom, inference resizes by DIAMETER_MEAN / diameter, and it is the value of the
#: model's diam_mean and diam_labels buffers.
DIAMETER_MEAN = 30.0
#: Per-image diameters (px) are raised to at least this before rescaling (Cellpose clips at 5), in
#: training and for diameters estimated at inference; it bounds the upscaling at 6x.
MIN_DIAMETER = 5.0


@dataclass(frozen=True, kw_only=True)
class EncoderSpec:
    """Sizes of one encoder variant (everything else is SAM's)."""

    embed_dim: int
    """Token width."""
    depth: int
    """Number of transformer blocks."""
    num_heads: int
    """Attention heads per block; head_dim = embed_dim // num_heads."""
    global_attn_indexes: tuple[int, ...]
    """Blocks that were global in SAM (127-row relative-position tables); the others had 14x14
    windows (27-row tables). All blocks attend globally here."""
    neck_dim: int
    """Channels of SAM's neck, hence the readout's input."""


ENCODERS: dict[str, EncoderSpec] = {
    # SAM ViT-L, the paper's encoder.
    "vit_l": EncoderSpec(
        embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23), neck_dim=256
    ),
    # SAM ViT-B.
    "vit_b": EncoderSpec(
        embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11), neck_dim=256
    ),
    # CPU tests and the demo. Same structure: multi-head global attention, both kinds of
    # relative-position table (block 0 has SAM's windowed 27-row tables, block 1 the global
    # 127-row ones), SAM's neck and the 8x8 pixel-shuffle readout. At 256x256 the cost is
    # dominated by attention over the 32 * 32 = 1024 tokens, which the geometry fixes: every head
    # of every block builds (batch, 1024, 1024) score, bias and softmax tensors, forward and
    # backward, whatever the width. So the budget goes to blocks x heads = 2 x 2 (head_dim 32):
    # forward + backward on a batch of 8 takes about 0.5 s on 2 CPU cores (0.46 s best of 6 when
    # measured; a third block adds 0.2 s, one head instead of two saves 0.15 s). Width 64
    # (MLP 256) and a 64-channel neck keep the matmuls small: SAM's 256-channel neck (its 3x3
    # conv alone is 1.2 GFLOP per image) would add 0.17 s. The model can still learn: with
    # 0.24M parameters it fits the flows and mask of a disc image in 40 AdamW steps
    # (tests/pipeline/test_model.py::test_tiny_model_learns).
    "tiny": EncoderSpec(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), neck_dim=64),
}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The network's shape and regularisation. Checked on construction."""

    encoder: str = "vit_l"
    """Encoder variant: "vit_l" (the paper), "vit_b", or "tiny" (same structure, for CPU tests
    and the demo); sizes in :data:`ENCODERS`."""
    patch_size: int = 8
    """Token size in pixels; also the pixel-shuffle factor of the readout."""
    image_size: int = 256
    """Side of the square input tile; image_size // patch_size tokens per side."""
    in_channels: int = 3
    """Image channels the model is fed, 1..3. The patch embedding always takes 3 (SAM's and
    Cellpose's layout), so inputs with fewer channels are zero-padded at the end."""
    layer_drop: float = 0.4
    """Per-sample probability of skipping the last block in training; it rises linearly from 0
    at block 0. 0 disables layer drop."""
    sam_checkpoint: str | None = None
    """SAM's released checkpoint (sam_vit_l_0b3195.pth for vit_l) that
    :func:`pipeline.weights.build_model` loads into the encoder; None starts from random weights."""
    init_checkpoint: str | None = None
    """Fine-tuning: start from these weights instead (the whole network, strictly): an official
    Cellpose-SAM file (cpsam), this project's export (model_cellpose.pt), or a training run's
    folder, its checkpoints/ folder or one step_* folder (weights only: the optimizer, the
    schedule and the step start afresh). Its geometry must be this config's. Excludes
    sam_checkpoint."""
    attention: str = "fused"
    """"fused": :class:`RelPosAttention` (one scaled_dot_product_attention call per block);
    "sam": segment-anything's attention forward. Same parameters and function either way."""

    pos_embed_init: str = "normal"
    """How :meth:`CPSAM.init_weights` starts the absolute position embedding when training from
    scratch: "normal" (ViTDet's truncated normal, std 0.02) or "sincos" (the fixed 2D sine-cosine
    table of MAE, whose ViT SAM's encoder was initialised from). SAM's weights replace either."""

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(
                f"ModelConfig.encoder must be one of {sorted(ENCODERS)}; got {self.encoder!r}"
            )
        for name in ("patch_size", "image_size", "in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int; got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ModelConfig.image_size ({self.image_size}) must be a multiple of patch_size "
                f"({self.patch_size})"
            )
        if self.in_channels > 3:
            raise ValueError(
                f"ModelConfig.in_channels must be 1, 2 or 3 (the patch embedding takes 3); "
                f"got {self.in_channels}. Keep at most 3 channels of the image."
            )
        if isinstance(self.layer_drop, bool) or not isinstance(self.layer_drop, (int, float)):
            raise ValueError(f"ModelConfig.layer_drop must be a float; got {self.layer_drop!r}")
        if not 0.0 <= self.layer_drop <= 1.0:
            raise ValueError(f"ModelConfig.layer_drop must be in [0, 1]; got {self.layer_drop}")
        if self.attention not in ("fused", "sam"):
            raise ValueError(f'ModelConfig.attention must be "fused" or "sam"; got {self.attention!r}')
        if self.pos_embed_init not in ("normal", "sincos"):
            raise ValueError(
                f'ModelConfig.pos_embed_init must be "normal" or "sincos"; got {self.pos_embed_init!r}'
            )
        for name in ("sam_checkpoint", "init_checkpoint"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, Path)):
                raise ValueError(f"ModelConfig.{name} must be a path or None; got {value!r}")
        if self.sam_checkpoint is not None and self.init_checkpoint is not None:
            raise ValueError(
                f"ModelConfig.sam_checkpoint ({self.sam_checkpoint}) and init_checkpoint "
                f"({self.init_checkpoint}) are both set; init_checkpoint replaces every weight, "
                f"so set model.sam_checkpoint=null to fine-tune from it."
            )


def sincos_pos_embed(rows: int, cols: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """MAE's fixed 2D sine-cosine position table, (rows, cols, dim).

    As MAE's ``get_2d_sincos_pos_embed``: the first half of the channels encodes the column, the
    second half the row; each half is ``[sin(p * w_k), cos(p * w_k)]`` for ``dim // 4``
    frequencies ``w_k = temperature ** (-k / (dim // 4))``, p the token index. A token's position
    is then a smooth function of its channels from the first step, which a randomly initialised
    table has to learn first.

    >>> table = sincos_pos_embed(32, 32, 64)
    >>> table.shape, float(table[0, 0, 0]), float(table[0, 0, 16])
    (torch.Size([32, 32, 64]), 0.0, 1.0)
    >>> bool((table[5, :, 32:] == table[5, 0, 32:]).all())  # the second half: the row only
    True
    """
    if dim % 4:
        raise ValueError(f"the sine-cosine table needs a width divisible by 4; got {dim}")
    quarter = dim // 4
    omega = temperature ** (-torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(positions: Tensor) -> Tensor:  # (n,) -> (n, dim // 2)
        angles = positions[:, None].to(torch.float64) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    col = encode(torch.arange(cols))[None, :, :].expand(rows, cols, dim // 2)
    row = encode(torch.arange(rows))[:, None, :].expand(rows, cols, dim // 2)
    return torch.cat([col, row], dim=2).to(torch.float32)


def sample_layer_drop(
    batch_size: int,
    depth: int,
    layer_drop: float,
    generator: torch.Generator | None = None,
    count_generator: torch.Generator | None = None,
) -> Tensor:
    """Draw which samples skip which blocks.

    Parameters
    ----------
    batch_size, depth : int
        Samples in the batch and blocks in the encoder.
    layer_drop : float
        Drop probability of the last block; block ``i`` is dropped with probability
        ``layer_drop * i / (depth - 1)`` (``torch.linspace(0, layer_drop, depth)``).
    generator : torch.Generator, optional
        A CPU generator; None draws from torch's default CPU generator (``torch.manual_seed``).
    count_generator : torch.Generator, optional
        A CPU generator in the same state on every rank of a data-parallel run. With it, the
        *number* of samples that drop each block is drawn from this generator (Binomial(batch,
        p_i), the same on every rank), and *which* samples drop it from ``generator`` (a uniformly
        random subset, per rank). Each sample still drops block ``i`` with probability ``p_i``,
        independently across blocks; but every rank runs each block on the same number of samples,
        so none waits at FSDP's per-block collectives for a rank that happened to keep more (a
        straggler costs every rank the slowest one's time). None: every sample draws on its own.

    Returns
    -------
    drop : (batch_size, depth) bool Tensor on the CPU
        True where the sample skips the block.

    Notes
    -----
    Without ``count_generator`` the draw is ``torch.rand((batch_size, depth)) < torch.linspace(0,
    layer_drop, depth)``, Cellpose's own, so with the same CPU RNG state the masks equal
    Cellpose's on CPU tensors. It is made on the CPU so the host knows which samples run each
    block without waiting for the device.

    >>> drop = sample_layer_drop(4, 3, 0.5, torch.Generator().manual_seed(0))
    >>> drop.shape, drop.dtype, bool(drop[:, 0].any())
    (torch.Size([4, 3]), torch.bool, False)
    >>> a = sample_layer_drop(8, 3, 0.5, torch.Generator().manual_seed(1), torch.Generator().manual_seed(9))
    >>> b = sample_layer_drop(8, 3, 0.5, torch.Generator().manual_seed(2), torch.Generator().manual_seed(9))
    >>> torch.equal(a.sum(0), b.sum(0))  # two ranks: the same counts per block
    True
    """
    for name, gen in (("generator", generator), ("count_generator", count_generator)):
        if gen is not None and gen.device.type != "cpu":
            raise ValueError(
                f"layer-drop masks are drawn on the CPU (so no device sync is needed to know which "
                f"samples run each block); got a {name} on {gen.device}. Pass a CPU torch.Generator."
            )
    drop_probability = torch.linspace(0.0, layer_drop, depth)
    if count_generator is None:
        return torch.rand((batch_size, depth), generator=generator) < drop_probability
    dropped = (torch.rand((batch_size, depth), generator=count_generator) < drop_probability).sum(dim=0)
    # Each sample's rank within each block's column of a random permutation: the samples of rank
    # below the block's count drop it, a uniformly random subset of that size.
    rank = torch.rand((batch_size, depth), generator=generator).argsort(dim=0).argsort(dim=0)
    return rank < dropped


class RelPosAttention(Attention):
    """SAM's attention with decomposed relative positions, as one fused attention call.

    SAM computes, for query token ``i`` at (h_i, w_i) and key token ``j`` at (h_j, w_j),

        score_ij = scale * q_i . k_j + q_i . Rh[h_i, h_j] + q_i . Rw[w_i, w_j]

    with ``Rh``, ``Rw`` the tables interpolated by ``get_rel_pos``, and materialises every
    score. The two bias terms are dot products too: with ``rel_h[i] = (q_i . Rh[h_i, r])_r``
    (H values) and ``rel_w[i]`` (W values) appended to the query, and the one-hot vectors of the
    key's row ``h_j`` and column ``w_j`` appended to the key,

        [scale q_i, rel_h[i], rel_w[i]] . [k_j, onehot(h_j), onehot(w_j)] = score_ij

    exactly. So ``scaled_dot_product_attention`` (scale 1) computes SAM's attention with
    whichever kernel the device has (flash attention on recent GPUs: no (N, N) tensor is
    stored). The values are zero-padded to the same head width, as the fused kernels take one,
    and the padding is cut from the output. The extra width costs attention FLOPs (head_dim 64
    becomes 128 for vit_l) but saves the memory traffic of the scores, which dominates.

    The bias can also go to the kernel as a (B, heads, N, N) additive mask,
    ``rel_h[i, h_j] + rel_w[i, w_j]`` (:func:`attention_masked`, set ``bias_as_mask``): the same
    function without the extra width. It is kept as a tested alternative, not the default: on
    cpu-2 the extended width was as fast in the trainer (batch 2 per rank) and 11-20% faster at
    batch 4-8 (docs/BENCHMARKS.md, attention).
    """

    bias_as_mask: bool = False
    """True: the bias as an (N, N) ``attn_mask`` (:func:`attention_masked`); False (default): folded
    into the extended query and key (:func:`attention_extended`)."""

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, _ = x.shape
        tokens = height * width
        # (3, B, heads, N, head_dim), SAM's layout of the qkv projection.
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        head_dim = q.shape[-1]
        table_h = get_rel_pos(height, height, self.rel_pos_h).to(q.dtype)  # (H, H, head_dim)
        table_w = get_rel_pos(width, width, self.rel_pos_w).to(q.dtype)
        grid_q = q.reshape(batch, self.num_heads, height, width, head_dim)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, table_h).reshape(batch, self.num_heads, tokens, height)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, table_w).reshape(batch, self.num_heads, tokens, width)
        out = (attention_masked if self.bias_as_mask else attention_extended)(q, k, v, rel_h, rel_w, self.scale)
        # (B, heads, N, head_dim) -> (B, H, W, heads * head_dim): SAM's channel order.
        out = out.transpose(1, 2).reshape(batch, height, width, -1)
        return self.proj(out)


def attention_extended(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scale: float) -> Tensor:
    """SAM's biased attention as one SDPA call on the extended query and key (no (N, N) tensor).

    q, k, v (B, heads, N, head_dim) with key j = h_j * W + w_j; rel_h (B, heads, N, H) and rel_w
    (B, heads, N, W) the query's dot products with the relative-position tables. Returns
    (B, heads, N, head_dim).
    """
    shape = q.shape[:-1] + (-1,)
    height, width = rel_h.shape[-1], rel_w.shape[-1]
    # Key j's one-hot row, then its one-hot column.
    key_h = torch.eye(height, dtype=q.dtype, device=q.device).repeat_interleave(width, dim=0)
    key_w = torch.eye(width, dtype=q.dtype, device=q.device).repeat(height, 1)
    q_ext = torch.cat([q * scale, rel_h, rel_w], dim=-1)
    k_ext = torch.cat([k, key_h.expand(shape), key_w.expand(shape)], dim=-1)
    v_ext = F.pad(v, (0, height + width))
    return F.scaled_dot_product_attention(q_ext, k_ext, v_ext, scale=1.0)[..., : q.shape[-1]]


def attention_masked(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scale: float) -> Tensor:
    """The same function as :func:`attention_extended`, with the bias built as an (N, N) mask.

    The bias of (i, j) is ``rel_h[i, h_j] + rel_w[i, w_j]``. Stores (B, heads, N, N) for the
    bias, so it is never the memory-lean path; see :class:`RelPosAttention` for when it is used.
    """
    batch, heads, tokens, _ = q.shape
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, heads, tokens, tokens)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def set_bias_as_mask(model: nn.Module, flag: bool) -> int:
    """Set :attr:`RelPosAttention.bias_as_mask` on every such block of ``model``; how many.

    The same function either way (tests/pipeline/test_model.py); only the speed differs with
    the device and the batch (docs/BENCHMARKS.md, attention).
    """
    blocks = [module for module in model.modules() if isinstance(module, RelPosAttention)]
    for block in blocks:
        block.bias_as_mask = flag
    return len(blocks)


class CPSAM(nn.Module):
    """Cellpose-SAM: SAM's ViT encoder at 8x8 patches, SAM's neck, a pixel-shuffle readout.

    Parameters
    ----------
    cfg : ModelConfig
        Variant, geometry and layer drop. ``cfg.sam_checkpoint`` and ``cfg.init_checkpoint``
        are not read here; see :func:`pipeline.weights.build_model`.

    Attributes
    ----------
    encoder : segment_anything ImageEncoderViT
        With ``.patch_embed`` (8x8 conv, 3 input channels), ``.pos_embed`` (1, 32, 32, D),
        ``.blocks`` (nn.ModuleList, all global attention) and ``.neck``.
    out : nn.Conv2d
        The 1x1 readout, neck_dim -> 3 * patch_size**2 (256 -> 192 for vit_l).
    diam_labels, diam_mean : (1,) float32 buffers
        Cellpose's two diameter scalars (both 30 unless a loaded checkpoint says otherwise).
        Buffers, not parameters: the optimizer never sees them, and they travel in the state
        dict so a Cellpose checkpoint round-trips.

    Notes
    -----
    Weights are initialised by :meth:`init_weights` (ViTDet's scheme; see there). On the meta
    device nothing is allocated; call ``to_empty`` and then :meth:`init_weights`.

    >>> model = CPSAM(ModelConfig(encoder="tiny", in_channels=1)).eval()
    >>> model(torch.zeros(2, 1, 256, 256)).shape
    torch.Size([2, 3, 256, 256])
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"CPSAM takes a ModelConfig; got {type(cfg).__name__}")
        self.cfg = cfg
        spec = ENCODERS[cfg.encoder]
        self.spec = spec

        # Registered before the submodules so the state_dict starts with them, as Cellpose's does.
        self.register_buffer("diam_labels", torch.full((1,), DIAMETER_MEAN))
        self.register_buffer("diam_mean", torch.full((1,), DIAMETER_MEAN))

        self.encoder = ImageEncoderViT(
            img_size=SAM_IMAGE_SIZE,
            patch_size=SAM_PATCH_SIZE,
            in_chans=3,
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            mlp_ratio=MLP_RATIO,
            out_chans=spec.neck_dim,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=LAYER_NORM_EPS),
            act_layer=nn.GELU,
            use_abs_pos=True,
            use_rel_pos=True,
            rel_pos_zero_init=True,
            window_size=SAM_WINDOW_SIZE,
            global_attn_indexes=spec.global_attn_indexes,
        )
        # Replacing the conv and the parameter in place keeps their slots, so the key order
        # stays SAM's (and Cellpose's): encoder.pos_embed, encoder.patch_embed.proj.*, blocks...
        tokens_per_side = cfg.image_size // cfg.patch_size
        self.encoder.patch_embed.proj = nn.Conv2d(
            3, spec.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.encoder.pos_embed = nn.Parameter(
            torch.zeros(1, tokens_per_side, tokens_per_side, spec.embed_dim)
        )
        self.encoder.img_size = cfg.image_size
        # window_size only steers the forward (partition or not); the tables keep SAM's shapes
        # and get_rel_pos interpolates them to 2 * tokens_per_side - 1 rows on each call.
        for block in self.encoder.blocks:
            block.window_size = 0
            if cfg.attention == "fused":
                # Same constructor arguments, so the parameters keep their names, shapes and order.
                rows = block.attn.rel_pos_h.shape[0]
                block.attn = RelPosAttention(
                    spec.embed_dim, num_heads=spec.num_heads, qkv_bias=True, use_rel_pos=True,
                    input_size=((rows + 1) // 2, (rows + 1) // 2),
                )

        self.out = nn.Conv2d(spec.neck_dim, NUM_OUTPUTS * cfg.patch_size**2, kernel_size=1)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise every parameter and buffer in place, for training from scratch.

        ViTDet's scheme, of which SAM's encoder is a copy: Linear weights truncated normal with
        std 0.02 and zero bias; LayerNorms 1 and 0; the absolute position embedding truncated
        normal with std 0.02; the relative-position tables zero (SAM's ``rel_pos_zero_init``).
        Convolutions (patch embedding, neck, readout) keep PyTorch's default (Kaiming uniform
        with a = sqrt(5), bias uniform in +-1/sqrt(fan_in)). ``diam_labels`` and ``diam_mean``
        are set to 30.

        Parameters
        ----------
        generator : torch.Generator, optional
            On the parameters' device; None uses torch's default generator (works for sharded
            DTensor parameters too, which draw from their own seeded RNG).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                # nn.Conv2d.reset_parameters, with a generator.
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                if module.bias is not None:
                    fan_in = module.weight[0].numel()
                    bound = 1 / math.sqrt(fan_in)
                    nn.init.uniform_(module.bias, -bound, bound, generator=generator)
            elif isinstance(module, (nn.LayerNorm, LayerNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.cfg.pos_embed_init == "sincos":
            _, rows, cols, dim = self.encoder.pos_embed.shape
            pos_embed = self.encoder.pos_embed
            table = sincos_pos_embed(rows, cols, dim).to(pos_embed.device, pos_embed.dtype)[None]
            if hasattr(pos_embed, "device_mesh"):  # a sharded DTensor (FSDP2): this rank's shard
                from torch.distributed.tensor import distribute_tensor

                table = distribute_tensor(table, pos_embed.device_mesh, pos_embed.placements)
            pos_embed.copy_(table)
        else:
            nn.init.trunc_normal_(self.encoder.pos_embed, std=0.02, generator=generator)
        for block in self.encoder.blocks:
            nn.init.zeros_(block.attn.rel_pos_h)
            nn.init.zeros_(block.attn.rel_pos_w)
        self.diam_labels.fill_(DIAMETER_MEAN)
        self.diam_mean.fill_(DIAMETER_MEAN)

    def forward(self, x: Tensor, generator: torch.Generator | None = None, drop: Tensor | None = None) -> Tensor:
        """Flows and cell probability for a batch of tiles.

        Parameters
        ----------
        x : (B, in_channels, image_size, image_size) float Tensor
            Normalised images (Cellpose: 1st-99th percentile to 0-1 per channel).
        generator : torch.Generator, optional
            CPU generator for the layer-drop masks (training mode only; ignored in eval).
            None draws from torch's default CPU generator. See :func:`sample_layer_drop`.
        drop : (B, depth) bool CPU Tensor, optional
            The layer-drop masks, drawn by the caller (the trainer draws them with
            :func:`sample_layer_drop`'s shared counts and knows what each step computes);
            training mode only, and then ``generator`` is not used.

        Returns
        -------
        (B, 3, image_size, image_size) Tensor, in the parameters' dtype
            Channel 0 dy, 1 dx (flows, trained against 5 x unit flows), 2 the cellprob logit.
        """
        batch, channels, height, width = self._check_input(x)
        if channels < 3:
            # Same as Cellpose's slicing of the patch-embedding weights to the first C channels.
            x = F.pad(x, (0, 0, 0, 0, 0, 3 - channels))
        # Through the module, so the patch embedding trains. (Cellpose 4.2.1.1's forward reads
        # its weights via .data, which cuts them out of autograd; the paper-era vit_sam code
        # called patch_embed as here.)
        tokens = self.encoder.patch_embed(x) + self.encoder.pos_embed  # (B, h, w, D)
        tokens = self._run_blocks(tokens, generator, drop)
        features = self.encoder.neck(tokens.permute(0, 3, 1, 2))  # (B, neck_dim, h, w)
        # (B, 3 * p * p, h, w) -> (B, 3, h * p, w * p): channel c * p * p + a * p + b goes to
        # channel c, pixel (p * i + a, p * j + b), which is Cellpose's conv_transpose2d with W2.
        return F.pixel_shuffle(self.out(features), self.cfg.patch_size)

    def _check_input(self, x: Tensor) -> tuple[int, int, int, int]:
        side = self.cfg.image_size
        if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(
                f"CPSAM takes a float (B, C, {side}, {side}) tensor; got {got}. Convert images "
                f"to float and normalise them first."
            )
        batch, channels, height, width = x.shape
        if channels != self.cfg.in_channels or (height, width) != (side, side):
            raise ValueError(
                f"CPSAM with in_channels={self.cfg.in_channels}, image_size={side} takes "
                f"(B, {self.cfg.in_channels}, {side}, {side}) input; got {tuple(x.shape)}. Tile "
                f"or crop to {side}x{side} and pad channels, or set ModelConfig.in_channels."
            )
        return batch, channels, height, width

    def _run_blocks(self, tokens: Tensor, generator: torch.Generator | None, drop: Tensor | None) -> Tensor:
        """The transformer blocks, with per-sample layer drop in training mode."""
        blocks = self.encoder.blocks
        if not (self.training and self.cfg.layer_drop > 0):
            for block in blocks:
                tokens = block(tokens)
            return tokens

        batch = tokens.shape[0]
        if drop is None:
            drop = sample_layer_drop(batch, len(blocks), self.cfg.layer_drop, generator)
        elif drop.shape != (batch, len(blocks)) or drop.dtype != torch.bool or drop.device.type != "cpu":
            raise ValueError(
                f"drop must be a ({batch}, {len(blocks)}) bool tensor on the CPU (one row per sample, "
                f"one column per block); got {drop.dtype} {tuple(drop.shape)} on {drop.device}"
            )
        kept = [torch.nonzero(~drop[:, i]).flatten() for i in range(len(blocks))]
        counts = [len(k) for k in kept]
        # One host-to-device copy per forward for all blocks' indices. The counts stay on the
        # host, so slicing and the branches below never wait for the device; pinned memory makes
        # the copy truly asynchronous (from pageable memory it would wait for the stream).
        kept_index = torch.cat(kept)
        if tokens.is_cuda:
            kept_index = kept_index.pin_memory()
        kept_index = kept_index.to(tokens.device, non_blocking=True)

        start = 0
        for block, count in zip(blocks, counts):
            index = kept_index[start : start + count]
            start += count
            # Every block is called on every rank, even when no sample keeps it, so FSDP's
            # per-block all-gather / reduce-scatter hooks run in the same order everywhere.
            if count == batch:
                tokens = block(tokens)
            elif count > 0:
                tokens = tokens.index_copy(0, index, block(tokens.index_select(0, index)))
            else:
                # SAM's attention cannot reshape an empty batch (it infers a dimension with -1),
                # so run one sample and keep none of it. The empty slice adds exactly 0 (even if
                # the output were not finite) yet keeps the block in the autograd graph, so its
                # backward, and FSDP's post-backward reduce-scatter, still run.
                tokens = tokens + block(tokens[:1])[:0].sum()
        return tokens


# ------------------------------------------------------------------------------------------------
# Cost
# ------------------------------------------------------------------------------------------------


def flops_per_image(cfg: ModelConfig, *, skip_dropped: bool = False) -> float:
    """Forward FLOPs for one image at ``cfg.image_size`` (a multiply-add counts 2).

    Parameters
    ----------
    cfg : ModelConfig
        Variant and geometry.
    skip_dropped : bool
        False (default): every block runs, as in eval and as model FLOPs for MFU are usually
        counted. True: block ``i`` counts with its keep probability ``1 - p_i``, i.e. the
        expected FLOPs of a training forward, which skips dropped samples
        (``depth * (1 - layer_drop / 2)`` blocks on average: 19.2 of 24 for the paper).

    Returns
    -------
    float
        Matmul and convolution FLOPs, with N tokens, width D, s = sqrt(N) tokens per side:
        patch embedding ``2 N D 3 p^2``; per block qkv ``6 N D^2``, scores and weighted values
        ``4 N^2 D``, decomposed relative-position terms ``4 N s D``, output projection
        ``2 N D^2``, MLP ``16 N D^2``; neck ``2 N D C + 18 N C^2`` (C = neck channels); readout
        ``2 N C 3 p^2``. Element-wise work (softmax, norms, GELU, the table interpolation, the
        pixel shuffle) is not counted, as in ``torch.utils.flop_counter``. Training costs about
        3x the forward.

    >>> round(flops_per_image(ModelConfig()) / 1e9, 1)  # vit_l at 256x256
    727.0
    """
    outside, per_block = forward_flops_parts(cfg)
    depth = ENCODERS[cfg.encoder].depth
    if skip_dropped and cfg.layer_drop > 0:
        drop_probability = torch.linspace(0.0, cfg.layer_drop, depth, dtype=torch.float64)
        blocks = float((1 - drop_probability).sum())
    else:
        blocks = depth
    return float(outside + blocks * per_block)


def forward_flops_parts(cfg: ModelConfig) -> tuple[float, float]:
    """(FLOPs outside the blocks, FLOPs of one block), per image forward; see :func:`flops_per_image`.

    A training forward of a batch costs ``B * outside + sum_i kept_i * per_block``, where
    ``kept_i`` is how many samples run block ``i`` (layer drop skips the others); the trainer
    counts its MFU from that.
    """
    spec = ENCODERS[cfg.encoder]
    width, neck, patch = spec.embed_dim, spec.neck_dim, cfg.patch_size
    side = cfg.image_size // patch
    tokens = side * side
    per_block = (
        2 * tokens * width * 3 * width  # qkv
        + 2 * 2 * tokens * tokens * width  # q k^T and attention @ v, all heads
        + 2 * 2 * tokens * side * width  # q . R_h and q . R_w (decomposed relative positions)
        + 2 * tokens * width * width  # output projection
        + 2 * 2 * tokens * width * MLP_RATIO * width  # MLP up and down
    )
    patch_embed = 2 * tokens * width * 3 * patch**2
    neck_flops = 2 * tokens * width * neck + 2 * tokens * neck * neck * 9
    readout = 2 * tokens * neck * NUM_OUTPUTS * patch**2
    return float(patch_embed + neck_flops + readout), float(per_block)
