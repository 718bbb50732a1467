"""Weight files: SAM's release in, Cellpose's cpsam layout in and out, and the project's export.

The one module that owns the weight formats (STYLE.md section 5; torchtitan keeps the same in
``state_dict_adapter.py``):

* SAM's released checkpoints (``sam_vit_l_0b3195.pth``, keys ``image_encoder.*``), adapted to the
  CP-SAM geometry by :func:`read_sam_encoder` / :func:`load_sam_encoder` (paper.md 2a);
* Cellpose 4 ``cpsam`` files (paper.md 2b, 350 tensors for vit_l), read by :func:`from_cellpose`
  and written by :func:`to_cellpose`;
* the export: ``<run_dir>/model_cellpose.pt`` in the cpsam layout (it loads into
  ``cellpose.vit.CPSAM`` with ``strict=True``) plus its sidecar ``model_cellpose.json``,
  ``{"model": ModelConfig fields, "step": n}``, so that tiny and vit_b exports rebuild the right
  network. :func:`write_export` writes both, :func:`read_export` reads both (a file without a
  sidecar is an official cpsam file: a ViT-L, shape read from the tensors);
* :func:`build_model`, the starting weights of training: SAM's encoder
  (``ModelConfig.sam_checkpoint``) or random. A fine-tuning start
  (``ModelConfig.init_checkpoint``) that is a weights file is read by :func:`read_init_weights`;
  one that is a training run's DCP folder by ``train.checkpoint`` (only train opens DCP).

:func:`unwrap_state_dict` is the one place that removes the key prefixes wrappers (DDP, compile,
FSDP1, activation checkpointing) add. Loading is strict everywhere: missing, unexpected and
mis-shaped keys are named.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.model import (
    CPSAM,
    ENCODERS,
    NUM_OUTPUTS,
    SAM_WINDOW_SIZE,
    EncoderSpec,
    ModelConfig,
)

__all__ = [
    "EXPORT_NAME",
    "build_model",
    "read_sam_encoder",
    "load_sam_encoder",
    "unwrap_state_dict",
    "from_cellpose",
    "to_cellpose",
    "read_weights_file",
    "read_init_weights",
    "sidecar_path",
    "write_export",
    "read_sidecar",
    "read_export",
    "Sidecar",
]

#: The trainer's export in its run folder; its sidecar is ``sidecar_path(EXPORT_NAME)``.
EXPORT_NAME = "model_cellpose.pt"

# SAM's released variants, for naming the variant of a checkpoint file in error messages.
_SAM_VARIANTS = {(1280, 32): "vit_h"} | {
    (spec.embed_dim, spec.depth): name for name, spec in ENCODERS.items()
}

# Path components that wrappers insert into state_dict keys: DataParallel/DDP ("module."),
# torch.compile ("_orig_mod."), FSDP1 ("_fsdp_wrapped_module.") and activation checkpointing
# ("_checkpoint_wrapped_module."). FSDP2 (fully_shard) adds none.
_WRAPPER_PARTS = frozenset(
    {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
)

_BLOCK_KEY = re.compile(r"^(?:encoder|image_encoder)\.blocks\.(\d+)\.")



def build_model(cfg: ModelConfig) -> CPSAM:
    """Build the model for ``cfg`` and load SAM's weights into it if ``cfg.sam_checkpoint`` is set.

    ``cfg.init_checkpoint`` is not read here: a fine-tuning start replaces every weight, so the
    trainer reads it instead of building (:func:`read_init_weights` for a weights file).

    Under ``torch.device("meta")`` nothing is loaded (there is no storage to load into): after
    ``to_empty``, call ``model.init_weights()`` and then :func:`load_sam_encoder` (unsharded) or
    feed :func:`read_sam_encoder`'s dict to ``set_model_state_dict`` (sharded).
    """
    model = CPSAM(cfg)
    if cfg.sam_checkpoint is not None and model.out.weight.device.type != "meta":
        load_sam_encoder(model, cfg.sam_checkpoint)
    return model



# ------------------------------------------------------------------------------------------------
# State dicts: wrapper prefixes, SAM checkpoints, Cellpose checkpoints
# ------------------------------------------------------------------------------------------------


def unwrap_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove the key components that DDP, torch.compile, FSDP1 and checkpoint wrappers insert.

    The one place in the project that knows these prefixes: ``module.``, ``_orig_mod.``,
    ``_fsdp_wrapped_module.`` and ``_checkpoint_wrapped_module.``, wherever they occur in a key.

    >>> unwrap_state_dict({"module._orig_mod.out.bias": 0, "a._checkpoint_wrapped_module.b": 1})
    {'out.bias': 0, 'a.b': 1}
    """
    unwrapped: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise ValueError(f"state_dict keys must be str; got {key!r}. Is this a state dict?")
        clean = ".".join(part for part in key.split(".") if part not in _WRAPPER_PARTS)
        if clean in unwrapped:
            raise ValueError(
                f"state_dict has two tensors for {clean!r} once wrapper prefixes are removed "
                f"(one is {key!r}); save the unwrapped model's state_dict."
            )
        unwrapped[clean] = value
    return unwrapped


def _full_tensor(value: Tensor) -> Tensor:
    # A sharded DTensor (FSDP2) becomes the whole tensor; this is a collective, so every rank
    # must make the same call.
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return value.detach()


def _variant_name(embed_dim: int, depth: int) -> str:
    name = _SAM_VARIANTS.get((embed_dim, depth), "an unknown variant")
    return f"{name} (embed_dim {embed_dim}, depth {depth})"


def _encoder_depth(keys) -> int:
    indexes = [int(m.group(1)) for k in keys if (m := _BLOCK_KEY.match(k))]
    return max(indexes) + 1 if indexes else 0


def _check_keys_and_shapes(
    found: Mapping[str, Tensor], expected: Mapping[str, Tensor], what: str
) -> None:
    """Raise a ValueError listing missing, unexpected and mis-shaped keys."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [
        f"{k} {tuple(found[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or misshaped:
        parts = []
        for label, items in (
            ("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)
        ):
            if items:
                more = f", ... ({len(items)} in all)" if len(items) > 5 else ""
                parts.append(f"{label}: " + ", ".join(items[:5]) + more)
        raise ValueError(f"{what} does not match the model; " + "; ".join(parts))


def read_sam_encoder(path: str | Path, cfg: ModelConfig) -> dict[str, Tensor]:
    """Read SAM's released checkpoint and adapt its image encoder to ``cfg``'s geometry.

    Parameters
    ----------
    path : str or Path
        SAM's checkpoint (``sam_vit_l_0b3195.pth`` for vit_l, ``sam_vit_b_01ec64.pth`` for vit_b):
        a flat dict with ``image_encoder.*`` keys; other keys (prompt encoder, mask decoder) are
        ignored.
    cfg : ModelConfig
        The model to adapt to; its encoder variant must be the file's.

    Returns
    -------
    dict of str to Tensor
        ``encoder.*`` keys in :class:`CPSAM`'s layout, float32 on the CPU: the patch-embedding
        kernel subsampled to ``cfg.patch_size`` (every ``16 // patch_size``-th tap, no rescaling,
        bias kept), the position embedding subsampled to ``image_size // patch_size`` tokens per
        side (SAM's 64x64 grid with stride 2 for the paper's 256 / 8), everything else as is.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    ValueError
        If the file is not a SAM checkpoint, is another variant than ``cfg.encoder``, or its
        geometry cannot be subsampled to ``cfg``'s.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint not found: {path}. Download SAM's released weights (vit_l: "
            f"https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth) or set "
            f"ModelConfig.sam_checkpoint to None to start from random weights."
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ValueError(f"{path} is not a readable torch checkpoint: {error}") from error
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"{path} is not a SAM checkpoint: it holds a {type(raw).__name__}, not a state dict"
        )
    prefix = "image_encoder."
    sam = {
        k[len(prefix) :]: v for k, v in raw.items() if isinstance(k, str) and k.startswith(prefix)
    }
    if not sam or "patch_embed.proj.weight" not in sam:
        hint = ""
        if "W2" in unwrap_state_dict({k: v for k, v in raw.items() if isinstance(k, str)}):
            hint = " It looks like a Cellpose checkpoint (it has W2); load it with from_cellpose."
        some = ", ".join(list(map(str, raw))[:4])
        raise ValueError(
            f"{path} is not a SAM checkpoint: it has no image_encoder.patch_embed.proj.weight "
            f"(its first keys: {some or 'none'}).{hint}"
        )

    spec = ENCODERS[cfg.encoder]
    patch_weight, pos_embed = sam["patch_embed.proj.weight"], sam.get("pos_embed")
    file_dims = (patch_weight.shape[0], _encoder_depth(prefix + k for k in sam))
    if file_dims != (spec.embed_dim, spec.depth):
        raise ValueError(
            f"{path} holds SAM {_variant_name(*file_dims)} weights, but the model is "
            f"{cfg.encoder} (embed_dim {spec.embed_dim}, depth {spec.depth}). Use the "
            f"{cfg.encoder} checkpoint or set ModelConfig.encoder to the file's variant."
        )

    # Patch embedding: (D, 3, 16, 16) -> (D, 3, p, p) by taking every (16 // p)-th tap.
    kernel = patch_weight.shape[-1]
    if patch_weight.ndim != 4 or kernel % cfg.patch_size:
        raise ValueError(
            f"{path}: the patch-embedding kernel {tuple(patch_weight.shape)} cannot be subsampled "
            f"to patch_size {cfg.patch_size} (the kernel side must be a multiple of it)"
        )
    tap_step = kernel // cfg.patch_size
    sam["patch_embed.proj.weight"] = patch_weight[:, :, ::tap_step, ::tap_step]
    # Absolute position embedding: (1, 64, 64, D) -> (1, t, t, D) with stride 64 // t.
    tokens_per_side = cfg.image_size // cfg.patch_size
    if pos_embed is None or pos_embed.ndim != 4 or pos_embed.shape[1] % tokens_per_side:
        shape = None if pos_embed is None else tuple(pos_embed.shape)
        raise ValueError(
            f"{path}: the position embedding {shape} cannot be subsampled to {tokens_per_side} "
            f"tokens per side (image_size {cfg.image_size} / patch_size {cfg.patch_size})"
        )
    grid_step = pos_embed.shape[1] // tokens_per_side
    sam["pos_embed"] = pos_embed[:, ::grid_step, ::grid_step]

    adapted = {"encoder." + k: v.float().contiguous() for k, v in sam.items()}
    with torch.device("meta"):
        expected = {k: v for k, v in CPSAM(cfg).state_dict().items() if k.startswith("encoder.")}
    _check_keys_and_shapes(adapted, expected, f"SAM checkpoint {path}")
    return {k: adapted[k] for k in expected}  # in the model's key order


def load_sam_encoder(model: CPSAM, path: str | Path) -> None:
    """Load SAM's released checkpoint into ``model.encoder``, adapted as the paper does.

    See :func:`read_sam_encoder` for the adaptation and the errors. The readout and the
    diameter buffers are left as they are. ``model`` must be unsharded; for an FSDP2 model,
    pass :func:`read_sam_encoder`'s dict to
    ``torch.distributed.checkpoint.state_dict.set_model_state_dict`` with ``full_state_dict``.
    """
    encoder_state = read_sam_encoder(path, model.cfg)
    with torch.no_grad():
        result = model.load_state_dict(encoder_state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(not k.startswith("encoder.") for k in result.missing_keys), result.missing_keys


def _cellpose_config(state: Mapping[str, Tensor]) -> tuple[str, int, int]:
    """(encoder variant, patch_size, image_size) from a Cellpose-layout state dict's shapes."""
    try:
        patch_weight = state["encoder.patch_embed.proj.weight"]
        pos_embed = state["encoder.pos_embed"]
        rel_pos_h = state["encoder.blocks.0.attn.rel_pos_h"]
        neck = state["encoder.neck.0.weight"]
        out = state["out.weight"]
    except KeyError as error:
        raise ValueError(
            f"not a CP-SAM state dict: key {error} is missing (expected Cellpose 4's cpsam layout)"
        ) from None
    embed_dim, _, patch_size, _ = patch_weight.shape
    depth = _encoder_depth(state)
    head_dim = rel_pos_h.shape[1]
    windowed_rows = 2 * SAM_WINDOW_SIZE - 1
    found = EncoderSpec(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        global_attn_indexes=tuple(
            i for i in range(depth)
            if f"encoder.blocks.{i}.attn.rel_pos_h" in state
            and state[f"encoder.blocks.{i}.attn.rel_pos_h"].shape[0] != windowed_rows
        ),
        neck_dim=neck.shape[0],
    )
    names = [name for name, spec in ENCODERS.items() if spec == found]
    if not names:
        raise ValueError(
            f"the checkpoint's encoder matches no known variant: {found}; known: {ENCODERS}"
        )
    if out.shape[0] != NUM_OUTPUTS * patch_size**2:
        raise ValueError(
            f"the checkpoint's readout has {out.shape[0]} channels; a CP-SAM with patch size "
            f"{patch_size} has {NUM_OUTPUTS * patch_size**2} (dy, dx, cellprob). Models with "
            f"extra (semantic) outputs are not supported."
        )
    return names[0], patch_size, pos_embed.shape[1] * patch_size


def _pixel_shuffle_weight(patch_size: int) -> Tensor:
    """Cellpose's W2: (3 p p, 3, p, p) identity; conv_transpose2d with it is pixel_shuffle(p)."""
    channels = NUM_OUTPUTS * patch_size**2
    return torch.eye(channels).reshape(channels, NUM_OUTPUTS, patch_size, patch_size)


def from_cellpose(state_dict: Mapping[str, Tensor], cfg: ModelConfig | None = None) -> CPSAM:
    """Build a :class:`CPSAM` from a Cellpose 4 ``cpsam`` checkpoint (or one of our exports).

    Parameters
    ----------
    state_dict : mapping of str to Tensor
        The loaded file (``torch.load(path, weights_only=True)``), in the layout of paper.md 2b:
        ``diam_labels``, ``diam_mean``, ``W2``, ``encoder.*``, ``out.*``. Wrapper prefixes
        (``module.`` and the others :func:`unwrap_state_dict` knows) are removed first.
    cfg : ModelConfig, optional
        The config to build. Its encoder, patch_size and image_size must match the checkpoint's
        shapes; its other fields (layer_drop, in_channels) are used as they are. None infers
        the shape from the checkpoint and takes the defaults for the rest.

    Returns
    -------
    CPSAM
        In eval mode (a finished model; call ``.train()`` to fine-tune), float32, on the
        checkpoint's device. Its tensors are the checkpoint's own (no copy) when those are
        float32: modifying one modifies the other.

    Raises
    ------
    ValueError
        If there is no ``W2`` (not a Cellpose 4 model, e.g. Cellpose 3), it is a CP-DINO model,
        ``W2`` is not the pixel-shuffle identity, or any key or shape differs from a CP-SAM's.
    """
    state = unwrap_state_dict(state_dict)
    if "W2" not in state:
        raise ValueError(
            "this checkpoint has no W2 tensor, so it is not a Cellpose 4 (CP-SAM) model; "
            "Cellpose 3 (CPnet) models cannot be loaded. Pass a cpsam checkpoint."
        )
    if "encoder.cls_token" in state:
        raise ValueError(
            "this is a CP-DINO checkpoint (it has encoder.cls_token); only CP-SAM is supported"
        )
    encoder, patch_size, image_size = _cellpose_config(state)
    if cfg is None:
        cfg = ModelConfig(encoder=encoder, patch_size=patch_size, image_size=image_size)
    elif (cfg.encoder, cfg.patch_size, cfg.image_size) != (encoder, patch_size, image_size):
        raise ValueError(
            f"the checkpoint is encoder={encoder!r}, patch_size={patch_size}, image_size="
            f"{image_size}; the config asks for encoder={cfg.encoder!r}, patch_size="
            f"{cfg.patch_size}, image_size={cfg.image_size}. Change the config to match."
        )
    shuffle, identity = state.pop("W2"), _pixel_shuffle_weight(patch_size)
    # (A meta state dict has shapes only; its values cannot be checked.)
    if shuffle.shape != identity.shape or (
        not shuffle.is_meta and not torch.equal(_full_tensor(shuffle).float().cpu(), identity)
    ):
        raise ValueError(
            f"W2 {tuple(shuffle.shape)} is not the identity that makes conv_transpose2d a "
            f"pixel shuffle; this model's readout cannot be reproduced here"
        )
    with torch.device("meta"):
        model = CPSAM(cfg)
    _check_keys_and_shapes(state, model.state_dict(), "the Cellpose checkpoint")
    # assign=True puts the checkpoint's tensors in place of the meta ones: no second copy of a
    # 1.2 GB model, and no random init that would be overwritten.
    model.load_state_dict(
        {k: _full_tensor(v).float() for k, v in state.items()}, strict=True, assign=True
    )
    return model.eval()


def to_cellpose(model: CPSAM | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our weights in Cellpose 4's ``cpsam`` layout (paper.md 2b), ready for ``torch.save``.

    Parameters
    ----------
    model : CPSAM (possibly wrapped by DDP, torch.compile, FSDP or checkpoint wrappers) or its
        state dict (e.g. from ``get_model_state_dict(..., full_state_dict=True)``)
        Sharded DTensors are gathered with ``full_tensor()``, a collective that every rank must
        enter.

    Returns
    -------
    dict of str to Tensor
        float32 CPU tensors in Cellpose's order: ``diam_labels``, ``diam_mean``, ``W2`` (the
        pixel-shuffle identity, (3 p p, 3, p, p)), ``encoder.*``, ``out.*``. 350 tensors for
        vit_l. Loads into ``cellpose.vit.CPSAM`` with ``strict=True``. Tensors may share storage
        with the model.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    state = unwrap_state_dict(state)
    encoder, patch_size, image_size = _cellpose_config(state)
    with torch.device("meta"):
        expected = CPSAM(ModelConfig(encoder=encoder, patch_size=patch_size, image_size=image_size))
    _check_keys_and_shapes(state, expected.state_dict(), "the state dict")
    # A meta model exports meta tensors: keys and shapes without storage, for checks.
    device = "meta" if state["out.weight"].is_meta else "cpu"
    cellpose = {}
    for key in expected.state_dict():
        cellpose[key] = _full_tensor(state[key]).to(device=device, dtype=torch.float32)
        if key == "diam_mean":
            cellpose["W2"] = _pixel_shuffle_weight(patch_size).to(device)
    return cellpose




# ------------------------------------------------------------------------------------------------
# Weight files: the export and its sidecar, fine-tuning starts
# ------------------------------------------------------------------------------------------------


def read_weights_file(path: str | Path) -> dict[str, Tensor]:
    """The state dict in a Cellpose-layout weights file (an export or an official cpsam file).

    Raises FileNotFoundError if ``path`` does not exist, ValueError if it is a folder or not a
    torch file holding a dict of tensors. The layout itself is checked by :func:`from_cellpose`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: weights file not found; pass the file the trainer exports "
            f"(<run_dir>/{EXPORT_NAME}) or an official cpsam file"
        )
    if path.is_dir():
        raise ValueError(
            f"{path}: is a folder (a training checkpoint?); pass the single weights file the "
            f"trainer exports (<run_dir>/{EXPORT_NAME}) or an official cpsam file"
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a file that is not a checkpoint
        raise ValueError(f"{path}: not a readable PyTorch weights file ({error})") from error
    if not isinstance(state_dict, dict) or not all(
        isinstance(value, Tensor) for value in state_dict.values()
    ):
        raise ValueError(
            f"{path}: expected a state dict (name -> tensor) in Cellpose's cpsam layout; got "
            f"{type(state_dict).__name__}"
        )
    return state_dict


def sidecar_path(weights_path: str | Path) -> Path:
    """The export's json beside its weights: ``model_cellpose.pt`` -> ``model_cellpose.json``."""
    return Path(weights_path).with_suffix(".json")


def write_export(
    path: str | Path, state_dict: Mapping[str, Tensor], cfg: ModelConfig, step: int
) -> None:
    """Write the weights in Cellpose's cpsam layout and the sidecar json beside them.

    ``state_dict`` is the full (gathered) model state; the weights file is written to a
    temporary name and renamed, so a crash never leaves a truncated file under ``path``. The
    sidecar is ``{"model": dataclasses.asdict(cfg), "step": step}``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(to_cellpose(state_dict), tmp)
    os.replace(tmp, path)
    sidecar = {"model": dataclasses.asdict(cfg), "step": int(step)}
    sidecar_path(path).write_text(json.dumps(sidecar))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sidecar:
    """What an export's json says."""

    model: ModelConfig
    """The network to build (starting weights cleared: the file holds the result)."""
    step: int | None
    """The training step the weights are from."""


def read_sidecar(weights_path: str | Path) -> Sidecar | None:
    """The sidecar of ``weights_path``, or None when there is none (an official cpsam file).

    ``sam_checkpoint`` and ``init_checkpoint`` are cleared in the returned config: they were only
    where training started, and need not exist where the export is used.
    """
    meta_path = sidecar_path(weights_path)
    if not meta_path.is_file():
        return None
    try:
        record = json.loads(meta_path.read_text())
        fields = dict(record["model"], sam_checkpoint=None, init_checkpoint=None)
        step = record.get("step")
        return Sidecar(model=ModelConfig(**fields), step=None if step is None else int(step))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{meta_path}: expected the trainer's json, "
            f"{{\"model\": ModelConfig fields, \"step\": n}}; {type(error).__name__}: {error}"
        ) from error


def read_export(path: str | Path) -> tuple[CPSAM, Sidecar | None]:
    """The model in a Cellpose-layout weights file (eval mode, float32, CPU), and its sidecar.

    With a sidecar the network is built from its config (tiny, vit_b and other geometries load);
    without one the shape is read from the tensors (an official cpsam file is a ViT-L). Errors
    name ``path``.
    """
    state_dict = read_weights_file(path)
    sidecar = read_sidecar(path)
    try:
        model = from_cellpose(state_dict, None if sidecar is None else sidecar.model)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    return model, sidecar


def read_init_weights(path: str | Path, cfg: ModelConfig) -> dict[str, Tensor]:
    """A fine-tuning start from a weights file: the full state dict for a :class:`CPSAM` of ``cfg``.

    Parameters
    ----------
    path : str or Path
        An official Cellpose-SAM file (``cpsam``) or this project's export
        (``model_cellpose.pt``); every tensor is used, strictly.
    cfg : ModelConfig
        The model being trained. Its encoder, patch_size and image_size must be the file's
        (the tensors' shapes, which :func:`read_export` checks against the sidecar's config).

    Returns
    -------
    dict of str to Tensor
        float32 CPU tensors in the model's key order, ``diam_labels`` and ``diam_mean`` included.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`read_weights_file`; and ValueError naming both geometries when they differ.
    """
    model, _ = read_export(path)
    found, wanted = model.cfg, cfg
    geometry = ("encoder", "patch_size", "image_size")
    if any(getattr(found, name) != getattr(wanted, name) for name in geometry):
        have = ", ".join(f"{name}={getattr(found, name)!r}" for name in geometry)
        want = ", ".join(f"{name}={getattr(wanted, name)!r}" for name in geometry)
        raise ValueError(
            f"{path}: the init checkpoint is {have}, but the config asks for {want}. Set "
            f"model.encoder / model.patch_size / model.image_size to the checkpoint's."
        )
    return dict(model.state_dict())
