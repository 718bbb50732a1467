"""Files in and out of the pipeline: images, instance labels, and (later) shards and weights.

This is the only module in ``pipeline/`` that touches files. Everything here returns or takes plain
NumPy arrays; ``normalize_percentile`` is pure maths kept here because every stage applies it
straight after reading.

Reading images
--------------
``read_image(path)`` returns one 2-D image as an ``(H, W, C)`` array with ``1 <= C <= 3`` and the
dtype as stored (uint8, uint16, float32, ...; bool becomes uint8 0/1). Files are read with
tifffile (``.tif``, ``.tiff``, incl. multi-page, ImageJ and OME-TIFF), Pillow (``.png``, ``.jpg``,
``.jpeg``, ``.bmp``; 16-bit PNGs go through imagecodecs because Pillow cuts 16-bit RGB to 8 bits)
and ``np.load(mmap_mode="r", allow_pickle=False)`` (``.npy``). The file's header must match its
extension.

Channel policy (the same for every format):

1. Axes named by the file win. tifffile reports them as ``series[0].axes``: OME-TIFF and ImageJ
   hyperstacks name Z, T and C; plain TIFFs name Y, X and S (samples, e.g. RGB). ``C`` and ``S``
   are channel axes; ``Z``, ``T`` and any other named axis are stack axes; ``I`` and ``Q``
   (pages, unknown) are unnamed. Pillow images are ``(H, W)`` or ``(H, W, C)``. ``.npy`` arrays
   name nothing.
2. Axes of length 1 are dropped (Y and X are always kept).
3. Where Y and X are unnamed (``.npy``): a 2-D array is ``(H, W)``; otherwise the last axis is a
   channel axis when its length is <= 4 (channels-last, ``(H, W, C)``), and the last two axes are
   ``(H, W)`` when it is longer.
4. An unnamed axis left over (pages of a multi-page TIFF, the first axis of a ``.npy``) is the
   channel axis when there is none yet and it has <= 4 entries: ``(C, H, W)`` with ``C <= 4``, or a
   TIFF of <= 4 equal-shaped pages. Otherwise it is a stack axis. Of two unnamed leading axes
   (a ``.npy`` ``(P, C, H, W)`` or ``(C, P, H, W)``), the one nearer Y is the channel axis if it
   has <= 4 entries, else the other one if it has. ``(3, 3, 3)`` is channels-last.
5. A stack axis longer than 1 (a Z-stack, a time series, > 4 pages) raises ``ValueError`` naming
   the file and its axes, because this pipeline is 2-D, unless ``plane=i`` picks one plane. Only
   one stack axis can be picked; more than one, or more than one channel axis, raises.
   ``read_stack`` keeps the stack axis instead: ``(N, H, W, C)``. ``channel_axis=`` and
   ``z_axis=`` (indices into the stored array, as Cellpose's) fix those axes before this policy.
6. The channels come out last, as stored, in the stored order. Grayscale images stored as RGB
   (the Cellpose cyto set keeps grayscale in the green channel, with red and blue 0) stay 3
   channels: nothing guesses which channel holds the signal.
7. An alpha channel (Pillow modes ``LA``/``RGBA``/``PA``, a TIFF extra sample marked alpha, or any
   4th channel) that is constant everywhere is dropped: DSB2018, TNBC and NuInsSeg ship RGBA PNGs
   with alpha = 255. A non-constant alpha, or more than 3 channels left, raises ``ValueError``
   naming the file and shape and asking for ``channels=[i, j, k]``. ``channels=`` selects up to 3
   channels by index (after steps 1-6) and turns the alpha rule off. Nothing is dropped silently.
8. Palette (mode ``P``) images become ``L`` when the palette is gray and ``RGB`` (``RGBA`` with a
   transparency entry) otherwise; 1-bit images become uint8 0/1; CMYK / YCbCr JPEGs become RGB.

``read_labels(path)`` returns one 2-D integer instance-label image (0 = background). Palette PNGs
are read as their indices. Lossy JPEG is refused.

``read_seg(path)`` reads a Cellpose GUI file, ``<name>_seg.npy`` (a pickled dict; its ``masks``
are the user's corrected annotations of ``<name>.<ext>``). Only NumPy arrays and Python's plain
types are unpickled from it, so a crafted file cannot run code.

Errors: a missing file raises ``FileNotFoundError``; anything else wrong with a file (empty,
truncated, corrupt, unsupported extension, header not matching the extension, wrong shape or
dtype) raises ``ValueError`` whose message starts with the file's path and says what to do.
Errors from Pillow, tifffile, imagecodecs and NumPy are chained (``raise ... from``), and an error
that tifffile only logs (e.g. a page list cut short by truncation) is raised too.

Writing
-------
``write_image`` and ``write_labels`` write TIFF through a temporary file in the target directory
and ``os.replace``, so a crash never leaves half a file under the final name.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import secrets
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from PIL import Image

__all__ = [
    "SUPPORTED_SUFFIXES",
    "normalize_percentile",
    "read_image",
    "read_labels",
    "read_seg",
    "SEG_SUFFIX",
    "read_labels_info",
    "read_stack",
    "write_image",
    "write_labels",
]

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------

#: File suffixes ``read_image`` and ``read_labels`` understand, lower-case, with the dot. Match
#: them against ``path.suffix.lower()`` when globbing (``.ome.tif`` has suffix ``.tif``).
SUPPORTED_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".npy")

_FORMAT_BY_SUFFIX = {
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".bmp": "BMP",
    ".npy": "NPY",
}

# File signatures, so that a TIFF saved as .png is reported as such rather than as "corrupt".
_MAGIC_BY_FORMAT = {
    "TIFF": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),  # classic and BigTIFF
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "BMP": (b"BM",),
    "NPY": (b"\x93NUMPY",),
}

# What the decoders raise on broken input. Only the decoder calls are wrapped (their own
# messages are kept in the chained exception); our own checks raise ValueError directly.
_DECODE_ERRORS = (
    OSError,  # incl. PIL.UnidentifiedImageError and "image file is truncated"
    ValueError,  # incl. tifffile.TiffFileError and np.load on a truncated .npy
    SyntaxError,  # Pillow's plugins raise it for malformed headers
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    KeyError,
    TypeError,
    RuntimeError,  # imagecodecs' codec errors (PngError, DeflateError, ...)
    Image.DecompressionBombError,
)


class _UnsupportedContent(Exception):
    """A readable file holding something this module does not read (not a corrupt file)."""


# Cellpose's normalize99 computes percentiles on a strided subsample above this many pixels
# per channel, with strides of (H // 224, W // 224).
_SUBSAMPLE_ABOVE_PIXELS = 224**3
_SUBSAMPLE_GRID = 224
# A channel whose upper - lower percentile range is at most this (in the input's units) is flat.
_FLAT_RANGE = 1e-3

_UINT16_MAX = np.iinfo(np.uint16).max
_UINT32_MAX = np.iinfo(np.uint32).max


# ---------------------------------------------------------------------------------------------
# Reading images and labels
# ---------------------------------------------------------------------------------------------


def read_image(
    path: str | os.PathLike,
    channels: Sequence[int] | None = None,
    plane: int | None = None,
    *,
    channel_axis: int | None = None,
    z_axis: int | None = None,
) -> np.ndarray:
    """Read one 2-D image as ``(H, W, C)``, ``C <= 3``, following the module's channel policy.

    Parameters
    ----------
    path : str or os.PathLike
        A file whose suffix is in ``SUPPORTED_SUFFIXES``.
    channels : sequence of int, optional
        Up to 3 channel indices to keep, in this order, counted on the channel axis found by the
        policy (e.g. ``[0, 1, 2]`` of an RGBA file with varying alpha, or ``[4, 0]`` of a
        6-channel OME-TIFF). Turns the alpha rule off. Default: keep all channels, dropping a
        constant alpha; more than 3 raise.
    plane : int, optional
        Index into the one stack axis (Z, T, or > 4 pages) of a stack. Required for stacks, and an
        error for files without a stack axis.
    channel_axis, z_axis : int, optional
        Index (negative counts from the end) of the stored array's channel axis and stack axis,
        overriding the policy for those axes (Cellpose's ``channel_axis`` / ``z_axis``), e.g.
        ``channel_axis=0`` for a plain TIFF of 5 channel pages.

    Returns
    -------
    image : np.ndarray
        ``(H, W, C)`` with ``1 <= C <= 3``, the stored dtype (bool becomes uint8), C-contiguous,
        in memory (not a memory map).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is empty, truncated, corrupt, of an unsupported type, or not a 2-D image
        under the policy; the message names the file and what to do.
    TypeError
        If ``channels`` or ``plane`` have the wrong type.

    Notes
    -----
    Reading a plane of a TIFF stack reads the whole stack first; ``.npy`` stacks are memory
    mapped, so only the chosen plane is read.
    """
    path = _checked_path(path)
    pixels, roles, alpha_index, stored = _decoded_roles(path, channel_axis, z_axis)
    pixels = _select_plane(path, pixels, roles, plane, stored)
    return _finished_image(path, _channels_last(pixels, roles), roles, channels, alpha_index)


def read_stack(
    path: str | os.PathLike,
    channels: Sequence[int] | None = None,
    *,
    channel_axis: int | None = None,
    z_axis: int | None = None,
) -> tuple[np.ndarray, str | None]:
    """Read an image or a stack of 2-D planes: ``(N, H, W, C)`` and the stack axis's letter.

    The channel policy of :func:`read_image`, except that a stack axis (Z, T, pages) is kept
    as the first axis instead of refused. A 2-D image gives ``N = 1`` and letter None; a stack
    gives its axis's letter as the file names it (``Z``, ``T``; ``I``, ``Q`` or ``?`` for
    unnamed pages and leading axes). ``channels``, ``channel_axis`` and ``z_axis`` as in
    :func:`read_image`; the alpha rule looks at the whole stack.
    """
    path = _checked_path(path)
    pixels, roles, alpha_index, _ = _decoded_roles(path, channel_axis, z_axis)
    stack = next((i for i, r in enumerate(roles) if r.startswith("P")), None)
    if stack is None:
        image = _finished_image(path, _channels_last(pixels, roles), roles, channels, alpha_index)
        return image[np.newaxis], None
    letter = roles[stack].split(":")[1]
    planes = np.moveaxis(pixels, stack, 0)
    del roles[stack]
    order = [0] + [1 + roles.index("Y"), 1 + roles.index("X")]
    if "C" in roles:
        order.append(1 + roles.index("C"))
    planes = planes.transpose(order)
    if planes.ndim == 3:
        planes = planes[..., np.newaxis]
    return _finished_image(path, planes, roles, channels, alpha_index), letter


def _decoded_roles(
    path: Path, channel_axis: int | None, z_axis: int | None
) -> tuple[np.ndarray, list[str], int | None, str]:
    """The file's pixels with length-1 axes dropped, each axis's role, alpha index, description."""
    pixels, axes, alpha_index = _decode(path, for_labels=False)
    roles = _assign_roles(path, pixels.shape, axes, channel_axis=channel_axis, z_axis=z_axis)
    stored = f"shape {pixels.shape}, axes {axes}"  # for messages, before axes are dropped
    kept = [i for i, role in enumerate(roles) if role != "1"]
    pixels = pixels.reshape([pixels.shape[i] for i in kept])
    return pixels, [roles[i] for i in kept], alpha_index, stored


def _finished_image(
    path: Path, image: np.ndarray, roles: list[str], channels, alpha_index: int | None
) -> np.ndarray:
    """Channels chosen (channels last), bool as uint8, a plain in-memory array."""
    if "C" not in roles:
        alpha_index = None
    image = _choose_channels(path, image, channels, alpha_index)
    if image.dtype == np.bool_:
        image = image.astype(np.uint8)
    return _as_plain_array(image)


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read an instance-label image: one 2-D plane of integer ids, 0 = background.

    Parameters
    ----------
    path : str or os.PathLike
        A lossless file whose suffix is in ``SUPPORTED_SUFFIXES`` (JPEG is refused).

    Returns
    -------
    labels : np.ndarray
        ``(H, W)`` integer, C-contiguous, in memory. uint8/uint16/uint32/uint64/int32/int64
        stay as stored; int8 and int16 (NeurIPS 2022 ships int16) become uint8 and uint16; bool
        becomes uint8; a float file whose values are all whole numbers becomes uint16 (uint32 when
        the largest id exceeds 65535). Palette PNGs give their palette indices.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file cannot be read, is not a single 2-D plane after dropping length-1 axes
        (e.g. an RGB or multi-channel label file), holds negative ids, or holds non-integer
        floats. The message names the file.

    Notes
    -----
    Ids are not renumbered and not checked for being consecutive; some datasets use gaps or a
    sentinel (some Cellpose masks reportedly use 65535 for background). That is the converters'
    business.
    """
    path = _checked_path(path)
    if _FORMAT_BY_SUFFIX[path.suffix.lower()] == "JPEG":
        raise ValueError(
            f"{path}: JPEG is lossy and changes label ids at object borders; "
            "store label images as PNG, TIFF or NPY."
        )
    pixels, axes, _ = _decode(path, for_labels=True)
    squeezed = pixels.reshape([n for n in pixels.shape if n != 1])
    if squeezed.ndim != 2:
        raise ValueError(
            f"{path}: a label image must be one 2-D plane of integer ids; got shape "
            f"{pixels.shape} (axes {axes}). Multi-channel or stacked label files must be split "
            "by the dataset's converter."
        )
    return _as_plain_array(_as_label_dtype(path, squeezed))


def _checked_path(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path after checking it exists, is a non-empty file of a known type."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: is not a file (a directory?); pass an image file")
    suffix = path.suffix.lower()
    if suffix not in _FORMAT_BY_SUFFIX:
        raise ValueError(
            f"{path}: unsupported file type {path.suffix!r}; supported: "
            f"{', '.join(SUPPORTED_SUFFIXES)}. Convert the file to TIFF or PNG."
        )
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: file is empty (0 bytes); re-download or re-export it")
    expected = _FORMAT_BY_SUFFIX[suffix]
    with path.open("rb") as fh:
        head = fh.read(8)
    if not head.startswith(_MAGIC_BY_FORMAT[expected]):
        actual = next((f for f, sigs in _MAGIC_BY_FORMAT.items() if head.startswith(sigs)), None)
        if actual is None:
            raise ValueError(
                f"{path}: not a valid {expected} file (unrecognised header {head!r}); the file "
                "is corrupt or not an image"
            )
        raise ValueError(
            f"{path}: extension {path.suffix!r} says {expected} but the content is {actual}; "
            "rename the file to match its content"
        )
    return path


def _decode(path: Path, *, for_labels: bool) -> tuple[np.ndarray, str, int | None]:
    """Decode a file into (pixels, axes, alpha_index) as stored, wrapping decoder errors.

    ``axes`` has one letter per dimension of ``pixels``: tifffile's letters, ``YX``/``YXS`` for
    Pillow, ``?`` for unnamed (``.npy``). ``alpha_index`` is the channel index the format marks
    as alpha, or None.
    """
    file_format = _FORMAT_BY_SUFFIX[path.suffix.lower()]
    try:
        if file_format == "TIFF":
            pixels, axes, alpha_index = _decode_tiff(path)
        elif file_format == "NPY":
            pixels = np.load(path, mmap_mode="r", allow_pickle=False)
            axes, alpha_index = "?" * pixels.ndim, None
        elif file_format == "PNG" and _png_bit_depth(path) == 16:
            pixels, axes, alpha_index = _decode_png16(path)
        else:
            pixels, axes, alpha_index = _decode_pillow(path, file_format, for_labels=for_labels)
    except _UnsupportedContent as exc:
        raise ValueError(f"{path}: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise ValueError(
            f"{path}: cannot read this {file_format} file ({type(exc).__name__}: {exc}); it is "
            "probably truncated or corrupt"
        ) from exc
    if pixels.dtype.kind not in "biuf":
        raise ValueError(
            f"{path}: unsupported pixel type {pixels.dtype}; expected bool, integer or float"
        )
    if pixels.ndim < 2 or 0 in pixels.shape:
        raise ValueError(
            f"{path}: expected an image with at least 2 non-empty dimensions; got shape "
            f"{pixels.shape}"
        )
    return pixels, axes, alpha_index


def _decode_tiff(path: Path) -> tuple[np.ndarray, str, int | None]:
    with _tifffile_errors() as logged_errors, tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        pixels = series.asarray()
        axes = series.axes
        if len(tif.series) > 1:
            _log.warning("%s: holds %d image series; reading only the first", path, len(tif.series))
        extrasamples = tuple(series.keyframe.extrasamples)
        samples = series.keyframe.samplesperpixel
    if logged_errors:
        # tifffile logs (rather than raises) when a page list is cut short, and then returns the
        # pages it could read; for a truncated multi-page file that would be silently partial.
        raise ValueError(f"tifffile reported: {'; '.join(logged_errors)}")
    alpha_index = None
    # ExtraSamples: 1 = associated alpha, 2 = unassociated alpha; extras are the last samples.
    for i, kind in enumerate(extrasamples):
        if int(kind) in (1, 2) and "S" in axes:
            alpha_index = samples - len(extrasamples) + i
            break
    return pixels, axes, alpha_index


class _ThreadErrorCollector(logging.Handler):
    """Collect ERROR records logged by this thread (other threads may be reading other files)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tifffile_errors() -> Iterator[list[str]]:
    collector = _ThreadErrorCollector()
    tiff_logger = logging.getLogger("tifffile")
    tiff_logger.addHandler(collector)
    try:
        yield collector.messages
    finally:
        tiff_logger.removeHandler(collector)


def _png_bit_depth(path: Path) -> int:
    # IHDR is always the first chunk: 8-byte signature, 4-byte length, b"IHDR", width, height,
    # then the bit depth byte at offset 24.
    with path.open("rb") as fh:
        header = fh.read(26)
    if len(header) < 26 or header[12:16] != b"IHDR":
        raise ValueError("PNG header is truncated or has no IHDR chunk")
    return header[24]


def _decode_png16(path: Path) -> tuple[np.ndarray, str, int | None]:
    # Pillow has no 16-bit RGB mode and would return 8 bits; libpng via imagecodecs keeps 16.
    pixels = imagecodecs.png_decode(path.read_bytes())
    if pixels.ndim == 2:
        return pixels, "YX", None
    samples = pixels.shape[-1]
    alpha_index = samples - 1 if samples in (2, 4) else None  # gray+alpha or RGBA
    return pixels, "YXS", alpha_index


# Pillow modes read as they are (a channel marked alpha, or None) ...
_PILLOW_MODES_AS_IS = {
    "1": None,
    "L": None,
    "I": None,
    "I;16": None,
    "I;16L": None,
    "I;16B": None,
    "I;16N": None,
    "F": None,
    "LA": 1,
    "RGB": None,
    "RGBA": 3,
}
# ... and modes converted first.
_PILLOW_CONVERSIONS = {
    "PA": "RGBA",
    "La": "LA",
    "RGBa": "RGBA",
    "RGBX": "RGB",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "LAB": "RGB",
    "HSV": "RGB",
}


def _decode_pillow(
    path: Path, file_format: str, *, for_labels: bool
) -> tuple[np.ndarray, str, int | None]:
    # formats= makes Pillow refuse content of another type instead of guessing.
    formats = {"PNG": ["PNG"], "JPEG": ["JPEG", "MPO"], "BMP": ["BMP", "DIB"]}[file_format]
    with Image.open(path, formats=formats) as im:
        if file_format == "PNG" and getattr(im, "is_animated", False):
            raise _UnsupportedContent(
                f"animated PNG with {im.n_frames} frames; save one frame per file"
            )
        im.load()  # Pillow decodes lazily; truncation surfaces here as OSError
        mode = im.mode
        if mode == "P" and for_labels:
            pass  # label PNGs store ids as palette indices
        elif mode == "P":
            im = im.convert(_palette_target_mode(im))
        elif mode in _PILLOW_CONVERSIONS:
            im = im.convert(_PILLOW_CONVERSIONS[mode])
        elif mode not in _PILLOW_MODES_AS_IS:
            raise _UnsupportedContent(
                f"unsupported Pillow image mode {mode!r}; convert the file to TIFF"
            )
        pixels = np.asarray(im)
        alpha_index = _PILLOW_MODES_AS_IS.get(im.mode)
    return pixels, ("YX" if pixels.ndim == 2 else "YXS"), alpha_index


def _palette_target_mode(im: Image.Image) -> str:
    if "transparency" in im.info:
        return "RGBA"
    palette = np.asarray(im.getpalette() or [0, 0, 0], dtype=np.uint8).reshape(-1, 3)
    is_gray = bool(np.all(palette == palette[:, :1]))
    return "L" if is_gray else "RGB"


# tifffile's axis letters: S (samples, e.g. RGB) and C are channels; I (pages) and Q (unknown)
# say nothing; Y and X are the plane. Every other letter (Z, T, and rarer ones such as E, A, P,
# R, H, L, V, M) is a stack axis.
_CHANNEL_LETTERS = "SC"
_UNNAMED_LETTERS = "IQO?"
_STACK_NAMES = {"Z": "Z (depth)", "T": "T (time)", "I": "page", "Q": "page", "?": "leading"}


def _assign_roles(
    path: Path,
    shape: tuple[int, ...],
    axes: str,
    *,
    channel_axis: int | None = None,
    z_axis: int | None = None,
) -> list[str]:
    """Give each axis a role: ``Y``, ``X``, ``C`` (channel), ``P:<letter>`` (stack), ``1`` (drop).

    Stack roles keep the file's letter (``P:Z``, ``P:I``) for error messages. ``channel_axis``
    and ``z_axis`` (indices into ``shape``) fix those two axes' roles before the policy runs.
    """
    forced = _forced_roles(path, shape, axes, channel_axis, z_axis)
    roles: list[str] = []
    for index, (letter, n) in enumerate(zip(axes, shape)):
        if index in forced:
            roles.append(forced[index] if n > 1 else "1")
        elif letter in "YX":
            roles.append(letter)
        elif n == 1:
            roles.append("1")
        elif letter in _CHANNEL_LETTERS:
            roles.append("C")
        elif letter in _UNNAMED_LETTERS:
            roles.append("?")
        else:
            roles.append(f"P:{letter}")

    def wrong_shape(reason: str) -> ValueError:
        return ValueError(
            f"{path}: {reason}; got shape {shape} (axes {axes}). Expected a 2-D image: (H, W), "
            "(H, W, C) or (C, H, W) with C <= 4, optionally in a stack with one Z, T or page "
            "axis to choose from with plane=."
        )

    kept = [i for i, r in enumerate(roles) if r != "1" and i not in forced]
    if "Y" not in roles:  # .npy: nothing is named, place Y and X by the channels-last rule
        if len(kept) < 2:
            raise wrong_shape("fewer than 2 dimensions longer than 1")
        if len(kept) >= 3 and shape[kept[-1]] <= 4 and "C" not in roles:
            roles[kept[-3]], roles[kept[-2]], roles[kept[-1]] = "Y", "X", "C"
        else:
            roles[kept[-2]], roles[kept[-1]] = "Y", "X"
    if roles.count("Y") != 1 or roles.count("X") != 1:
        raise wrong_shape("could not tell which axes are Y and X")

    unnamed = [i for i, r in enumerate(roles) if r == "?"]
    has_channel = "C" in roles
    if len(unnamed) == 1:
        i = unnamed[0]
        roles[i] = "C" if not has_channel and shape[i] <= 4 else f"P:{axes[i]}"
    elif len(unnamed) == 2 and not has_channel:
        first, second = unnamed
        if shape[second] <= 4:
            roles[first], roles[second] = f"P:{axes[first]}", "C"
        elif shape[first] <= 4:
            roles[first], roles[second] = "C", f"P:{axes[second]}"
        else:
            raise wrong_shape("two leading axes, neither short enough (<= 4) to be channels")
    elif unnamed:
        for i in unnamed:
            roles[i] = f"P:{axes[i]}"

    if roles.count("C") > 1:
        raise wrong_shape("more than one channel axis (name the channel axis with channel_axis=)")
    if sum(r.startswith("P") for r in roles) > 1:
        raise wrong_shape("more than one stack axis (only one can be chosen with plane=)")
    return roles


def _forced_roles(
    path: Path, shape: tuple[int, ...], axes: str, channel_axis: int | None, z_axis: int | None
) -> dict[int, str]:
    """Axis index -> role for the axes the caller names (``channel_axis``, ``z_axis``)."""
    forced: dict[int, str] = {}
    for name, index, role in (("channel_axis", channel_axis, "C"), ("z_axis", z_axis, "P:Z")):
        if index is None:
            continue
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"{name} must be an int axis index or None; got {index!r}")
        if not -len(shape) <= index < len(shape):
            raise ValueError(
                f"{path}: {name}={index} is out of range for an array of shape {shape} "
                f"(axes {axes}); use 0..{len(shape) - 1}"
            )
        index = int(index) % len(shape)
        if index in forced or axes[index] in "YX":
            what = "the other named axis" if index in forced else f"the file's {axes[index]} axis"
            raise ValueError(f"{path}: {name}={index} is {what} (shape {shape}, axes {axes})")
        forced[index] = role
    return forced


def _select_plane(
    path: Path,
    pixels: np.ndarray,
    roles: list[str],
    plane: int | None,
    stored: str,
) -> np.ndarray:
    """Index the stack axis with ``plane`` (and drop it from ``roles``, in place)."""
    if plane is not None and (isinstance(plane, bool) or not isinstance(plane, (int, np.integer))):
        raise TypeError(f"plane must be an int index or None; got {type(plane).__name__}")
    stack = next((i for i, r in enumerate(roles) if r.startswith("P")), None)
    if stack is None:
        if plane is not None:
            raise ValueError(
                f"{path}: plane={plane} was given but the file has no Z, T or page axis "
                f"({stored}); leave plane=None"
            )
        return pixels
    letter = roles[stack].split(":")[1]
    name = _STACK_NAMES.get(letter, letter)
    n_planes = pixels.shape[stack]
    if plane is None:
        raise ValueError(
            f"{path}: is a stack with a {name} axis of {n_planes} planes ({stored}); "
            f"this reader takes one 2-D plane. Pass plane=<index> (--plane on the command line) "
            f"(0..{n_planes - 1}) to read one plane, or read_stack to read them all."
        )
    if not 0 <= plane < n_planes:
        raise ValueError(
            f"{path}: plane={plane} is out of range; the {name} axis has {n_planes} planes "
            f"(0..{n_planes - 1})"
        )
    del roles[stack]
    return np.take(pixels, int(plane), axis=stack)


def _channels_last(pixels: np.ndarray, roles: list[str]) -> np.ndarray:
    order = [roles.index("Y"), roles.index("X")]
    if "C" in roles:
        order.append(roles.index("C"))
    image = pixels.transpose(order)
    return image if image.ndim == 3 else image[:, :, np.newaxis]


def _choose_channels(
    path: Path, image: np.ndarray, channels: Sequence[int] | None, alpha_index: int | None
) -> np.ndarray:
    n_channels = image.shape[-1]
    if channels is not None:
        return image[..., _checked_channel_indices(path, channels, image.shape)]
    if alpha_index is None and n_channels == 4:
        alpha_index = 3  # an unmarked 4th channel is treated as a possible alpha
    alpha_note = ""
    if alpha_index is not None:
        alpha = image[..., alpha_index]
        if alpha.min() == alpha.max():
            return np.delete(image, alpha_index, axis=-1)
        alpha_note = f" and channel {alpha_index} (alpha) is not constant"
    if n_channels > 3 or alpha_note:
        raise ValueError(
            f"{path}: has {n_channels} channels (image shape {image.shape}, channels last)"
            f"{alpha_note}; the model takes at most 3 and nothing is dropped silently. Pass "
            "channels=[i, j, k] (--channels i j k on the command line) to choose up to 3 of them, "
            "or name the channel axis (channel_axis=, --channel-axis)."
        )
    return image


def _checked_channel_indices(
    path: Path, channels: Sequence[int], shape: tuple[int, ...]
) -> list[int]:
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        raise TypeError(
            f"channels must be a list of up to 3 int indices; got {type(channels).__name__}"
        )
    indices = list(channels)
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in indices):
        raise TypeError(f"channels must be a list of int indices; got {indices!r}")
    if not 1 <= len(indices) <= 3:
        raise ValueError(f"channels must hold 1 to 3 indices; got {indices!r}")
    n_channels = shape[-1]
    if any(not 0 <= i < n_channels for i in indices):
        raise ValueError(
            f"{path}: channels={indices!r} is out of range for {n_channels} channels "
            f"(image shape {shape}, channels last); use indices 0..{n_channels - 1}"
        )
    return [int(i) for i in indices]


def _as_label_dtype(path: Path, labels: np.ndarray) -> np.ndarray:
    """Check ids are non-negative whole numbers; give them an unsigned type where needed."""
    kind = labels.dtype.kind
    if kind == "b":
        return labels.astype(np.uint8)
    if kind == "u":
        return labels
    if kind == "i":
        smallest = labels.min()
        if smallest < 0:
            raise ValueError(
                f"{path}: label ids must be >= 0 (0 = background); found {smallest} in a "
                f"{labels.dtype} image. Ids above 32767 written as int16 wrap to negative: "
                "re-export the labels as uint16 or uint32."
            )
        # int8/int16 would wrap if ids grew; keep the same width, unsigned.
        return {1: labels.astype(np.uint8), 2: labels.astype(np.uint16)}.get(
            labels.dtype.itemsize, labels
        )
    # float: accept only whole, non-negative, finite values
    if not np.all(np.isfinite(labels)) or not np.all(labels == np.floor(labels)):
        raise ValueError(
            f"{path}: a {labels.dtype} label image must hold whole-number ids; it holds "
            "fractions, NaN or inf. Is this a probability or intensity image rather than labels?"
        )
    smallest, largest = labels.min(), labels.max()
    if smallest < 0:
        raise ValueError(f"{path}: label ids must be >= 0 (0 = background); found {smallest}")
    if largest > _UINT32_MAX:
        raise ValueError(f"{path}: label id {largest} does not fit uint32")
    return labels.astype(np.uint16 if largest <= _UINT16_MAX else np.uint32)


def _as_plain_array(array: np.ndarray) -> np.ndarray:
    """A C-contiguous, writable, native-byte-order ndarray in memory (copying only if needed)."""
    # Memory maps (.npy) and Pillow's buffers are read-only, and .npy files and 16-bit Pillow
    # modes can be big-endian; later stages (numba, torch) want plain native arrays.
    needs_copy = isinstance(array, np.memmap) or not array.flags.writeable
    return np.array(
        array, dtype=array.dtype.newbyteorder("="), order="C", copy=True if needs_copy else None
    )


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


def normalize_percentile(
    image: np.ndarray, lower: float = 1.0, upper: float = 99.0
) -> np.ndarray:
    """Scale each channel so its ``lower`` percentile maps to 0 and its ``upper`` to 1.

    Parameters
    ----------
    image : np.ndarray
        ``(H, W, C)`` bool, integer or float, as returned by ``read_image``.
    lower, upper : float
        Percentiles in ``[0, 100]`` with ``lower < upper``. Defaults (1, 99) are Cellpose's.

    Returns
    -------
    normalized : np.ndarray
        ``(H, W, C)`` float32. Values are not clipped: pixels below the lower percentile are
        negative and pixels above the upper one exceed 1, as in Cellpose.

    Notes
    -----
    - A channel is flat when ``upper_value - lower_value <= 1e-3`` in the input's units (as in
      Cellpose's ``normalize99``); a flat channel becomes all 0.
    - When a channel has more than ``224**3`` pixels, its percentiles are taken on a strided
      subsample with strides ``(max(1, H // 224), max(1, W // 224))``, as Cellpose does.
    - NaN and +-inf pixels are left out of the percentiles and pass through the scaling (NaN
      stays NaN, inf stays inf), so a caller that must not see them can check ``np.isfinite``
      on the result. A channel with no finite pixel counts as flat and becomes all 0.
      (Cellpose leaves such a channel unnormalised.)
    - Arithmetic is float32, except for float64 and 32/64-bit integer inputs, which are scaled
      in float64 before the cast so that large values keep their precision.

    Examples
    --------
    >>> image = np.array([[0, 50], [100, 200]], dtype=np.uint8)[:, :, np.newaxis]
    >>> normalize_percentile(image, lower=0, upper=100)[:, :, 0]
    array([[0.  , 0.25],
           [0.5 , 1.  ]], dtype=float32)
    >>> normalize_percentile(np.full((2, 2, 1), 7.0))[:, :, 0]  # flat channel
    array([[0., 0.],
           [0., 0.]], dtype=float32)
    """
    image = np.asarray(image)
    if image.ndim != 3 or 0 in image.shape:
        raise ValueError(
            f"image must be (H, W, C) with no empty axis; got shape {image.shape}. "
            "For a single-channel (H, W) image pass image[:, :, None]."
        )
    if image.dtype.kind not in "biuf":
        raise TypeError(f"image must be bool, integer or float; got {image.dtype}")
    if not 0 <= lower < upper <= 100:
        raise ValueError(f"need 0 <= lower < upper <= 100; got lower={lower}, upper={upper}")

    wide = image.dtype == np.float64 or (image.dtype.kind in "iu" and image.dtype.itemsize >= 4)
    work_dtype = np.float64 if wide else np.float32
    normalized = np.empty(image.shape, dtype=np.float32)
    for c in range(image.shape[2]):
        channel = image[:, :, c]
        low, high = _channel_percentiles(channel, lower, upper)
        # Written as "not (> threshold)" so that NaN bounds (no finite pixel) also count as flat.
        if not high - low > _FLAT_RANGE:
            normalized[:, :, c] = 0.0
            continue
        scaled = channel.astype(work_dtype)
        scaled -= work_dtype(low)
        scaled /= work_dtype(high - low)
        normalized[:, :, c] = scaled
    return normalized


def _channel_percentiles(channel: np.ndarray, lower: float, upper: float) -> tuple[float, float]:
    """The ``lower`` and ``upper`` percentiles of a 2-D channel's finite pixels (NaN if none)."""
    if channel.size > _SUBSAMPLE_ABOVE_PIXELS:
        step_y = max(1, channel.shape[0] // _SUBSAMPLE_GRID)
        step_x = max(1, channel.shape[1] // _SUBSAMPLE_GRID)
        channel = channel[::step_y, ::step_x]
    if channel.dtype.kind == "b":
        channel = channel.astype(np.uint8)
    elif channel.dtype.kind == "f":
        # float64 percentiles, so that float16/float32 inputs do not round the bounds.
        channel = channel.astype(np.float64)
        finite = np.isfinite(channel)
        if not finite.all():
            channel = channel[finite]
            if channel.size == 0:
                return float("nan"), float("nan")
    low, high = np.percentile(channel, [lower, upper])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------
# Writing images and labels
# ---------------------------------------------------------------------------------------------


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a 2-D image to a TIFF that ``read_image`` reads back unchanged.

    Parameters
    ----------
    path : str or os.PathLike
        Target ``.tif`` / ``.tiff``; its directory must exist. Replaced atomically.
    image : np.ndarray
        ``(H, W)`` or ``(H, W, C)`` with ``C <= 3``; bool, integer or float (bool is written as
        uint8).

    Notes
    -----
    Layout: ``(H, W)`` and ``(H, W, 1)`` as one gray page; 3-channel uint8/uint16 as one RGB
    page (``YXS``, what viewers expect); anything else as one gray page per channel with the
    axes ``CYX`` in tifffile's metadata. ``read_image`` returns ``(H, W, C)`` in every case.
    """
    path = _checked_tiff_target(path)
    image = np.asarray(image)
    if image.dtype.kind not in "biuf":
        raise TypeError(f"image must be bool, integer or float; got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    if image.ndim != 3 or not 1 <= image.shape[2] <= 3 or 0 in image.shape:
        raise ValueError(
            f"image must be (H, W) or (H, W, C) with 1 <= C <= 3 and no empty axis; got shape "
            f"{image.shape}. Write more channels as separate files."
        )
    if image.dtype == np.bool_:
        image = image.astype(np.uint8)
    if image.shape[2] == 1:
        _write_tiff_atomically(
            path, image[:, :, 0], photometric="minisblack", metadata={"axes": "YX"}
        )
    elif image.shape[2] == 3 and image.dtype in (np.uint8, np.uint16):
        _write_tiff_atomically(path, image, photometric="rgb", metadata={"axes": "YXS"})
    else:
        _write_tiff_atomically(
            path,
            np.ascontiguousarray(image.transpose(2, 0, 1)),
            photometric="minisblack",
            metadata={"axes": "CYX"},
        )


def write_labels(
    path: str | os.PathLike, labels: np.ndarray, *, axes: str | None = None, info: str | None = None
) -> None:
    """Write an instance-label image as a zlib-compressed TIFF that Fiji and napari open.

    Parameters
    ----------
    path : str or os.PathLike
        Target ``.tif`` / ``.tiff``; its directory must exist. Replaced atomically.
    labels : np.ndarray
        ``(H, W)`` bool or integer, ids >= 0, 0 = background; or a stack ``(N, H, W)``.
    axes : str, optional
        ImageJ's axis letters: ``YX`` for an image (the default), ``ZYX`` (the default for a
        stack) or ``TYX``; Fiji opens a stack as a stack (a hyperstack along Z or T).
    info : str, optional
        Text kept in the file (ImageJ's ``Info`` property, Fiji's Image > Show Info); read it
        back with :func:`read_labels_info`.

    Notes
    -----
    Ids up to 65535 are written as uint16 in ImageJ's format (``tifffile.TiffFile.is_imagej``
    is True). Larger ids are written as uint32, which ImageJ's format does not include, so that
    file is a plain single-page TIFF (SampleFormat unsigned, 32 bits): napari reads it as
    uint32, and Fiji opens it as a 32-bit float image (exact up to 2**24 ids). Ids above
    2**32 - 1 raise.
    """
    path = _checked_tiff_target(path)
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biu":
        raise TypeError(
            f"labels must be a bool or integer array of instance ids; got {labels.dtype}. "
            "Round and cast float labels explicitly."
        )
    if labels.ndim not in (2, 3) or 0 in labels.shape:
        raise ValueError(
            f"labels must be (H, W) or a stack (N, H, W) with no empty axis; got shape {labels.shape}"
        )
    axes = axes or ("YX" if labels.ndim == 2 else "ZYX")
    if len(axes) != labels.ndim or axes[-2:] != "YX" or axes[:-2] not in ("", "Z", "T"):
        raise ValueError(f"axes must be YX, ZYX or TYX for labels of shape {labels.shape}; got {axes!r}")
    smallest, largest = int(labels.min()), int(labels.max())
    if smallest < 0:
        raise ValueError(f"label ids must be >= 0 (0 = background); found {smallest}")
    if largest > _UINT32_MAX:
        raise ValueError(f"label id {largest} does not fit uint32; renumber the labels")
    if largest <= _UINT16_MAX:
        metadata = {"axes": axes} | ({} if info is None else {"Info": info})
        _write_tiff_atomically(
            path, labels.astype(np.uint16), imagej=True, compression="zlib", metadata=metadata
        )
    else:
        # tifffile keeps extra metadata keys in its JSON description (shaped_metadata).
        metadata = {"axes": axes} | ({} if info is None else {_INFO_KEY: info})
        _write_tiff_atomically(
            path, labels.astype(np.uint32), photometric="minisblack", compression="zlib",
            metadata=metadata,
        )


_INFO_KEY = "info"


def read_labels_info(path: str | os.PathLike) -> str | None:
    """The ``info`` text :func:`write_labels` kept in a label TIFF; None if it has none.

    Reads only the header, not the pixels.
    """
    path = _checked_path(path)
    if _FORMAT_BY_SUFFIX[path.suffix.lower()] != "TIFF":
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_imagej:
                info = (tif.imagej_metadata or {}).get("Info")
            else:
                shaped = tif.shaped_metadata or ({},)
                info = shaped[0].get(_INFO_KEY)
    except _DECODE_ERRORS as exc:
        raise ValueError(f"{path}: cannot read this TIFF's header ({type(exc).__name__}: {exc})") from exc
    return info if isinstance(info, str) else None


def _checked_tiff_target(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        raise ValueError(f"{path}: can only write TIFF; use a .tif or .tiff name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: cannot write, directory {path.parent} does not exist")
    return path


def _write_tiff_atomically(path: Path, data: np.ndarray, **tiff_options) -> None:
    # The temporary file sits in the target directory so that os.replace is a same-filesystem
    # rename (atomic on POSIX and Windows). open(..., "xb") rather than mkstemp so the file gets
    # the usual umask permissions instead of 0600.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as fh:
            tifffile.imwrite(fh, data, **tiff_options)
            fh.flush()
            os.fsync(fh.fileno())  # the data must be on disk before the rename makes it visible
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


# ---------------------------------------------------------------------------------------------
# Shards and weights: keys and formats will be defined here (not yet).
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Cellpose GUI files (<name>_seg.npy)
# ---------------------------------------------------------------------------------------------

#: What the Cellpose GUI (and ``masks_flows_to_seg``) appends to an image's stem.
SEG_SUFFIX = "_seg.npy"

# The globals a _seg.npy pickle may name: NumPy's array and dtype reconstruction (numpy 1 and 2
# module names) and nothing that runs code.
_SEG_PICKLE_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "slice"), ("builtins", "complex")}


class _SegUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SEG_PICKLE_GLOBALS or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def read_seg(path: str | os.PathLike) -> dict:
    """Read a Cellpose ``_seg.npy`` (GUI annotations, or ``masks_flows_to_seg`` output).

    Parameters
    ----------
    path : str or os.PathLike
        ``<name>_seg.npy``: a 0-d object array holding a dict, as ``np.save`` writes it.

    Returns
    -------
    dict
        The file's dict, with ``masks`` checked and given as ``read_labels`` gives labels:
        ``(H, W)`` unsigned integer ids, 0 = background. The other keys (``outlines``,
        ``flows``, ``filename``, ``ismanual``, ``chan_choose``, ``diameter``, ...) as stored.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If it is not a ``.npy`` holding a dict with a 2-D integer ``masks`` array (3-D GUI
        files are refused: this pipeline is 2-D), or its pickle names anything but NumPy
        arrays and plain Python values. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such _seg.npy file")
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f".npy format version {version} is not one np.save writes for a dict")
            _, _, dtype = read_header(fh)
            if dtype != np.dtype(object):
                raise ValueError(f"it holds a plain {dtype} array, not Cellpose's pickled dict")
            record = _SegUnpickler(io.BytesIO(fh.read())).load()
    except (ValueError, pickle.UnpicklingError, EOFError, OSError, AttributeError) as error:
        raise ValueError(f"{path}: not a Cellpose _seg.npy file ({error})") from error
    if isinstance(record, np.ndarray) and record.shape == () and record.dtype == object:
        record = record.item()
    if not isinstance(record, dict) or "masks" not in record:
        raise ValueError(
            f"{path}: not a Cellpose _seg.npy file: expected a dict with 'masks'; got "
            f"{type(record).__name__}{' with keys ' + ', '.join(map(str, record)) if isinstance(record, dict) else ''}"
        )
    masks = np.asarray(record["masks"])
    masks = masks.reshape([n for n in masks.shape if n != 1]) if masks.ndim > 2 else masks
    if masks.ndim != 2 or masks.dtype.kind not in "biuf":
        raise ValueError(
            f"{path}: 'masks' must be one 2-D plane of integer ids; got {masks.dtype} "
            f"{masks.shape} (3-D GUI annotations are not supported)"
        )
    record["masks"] = _as_plain_array(_as_label_dtype(path, masks))
    return record
