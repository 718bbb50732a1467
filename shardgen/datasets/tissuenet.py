"""TissueNet v1.0 / v1.1 (Greenwald et al. 2022): two-channel tissue fluorescence in ``.npz`` files.

Layout (datasets.md 2.3), one ``.npz`` per split, in the dataset folder or in one wrapper folder
inside it:

* v1.1 zip: ``tissuenet_v1.1_{train,val,test}.npz``
* current deepcell download: ``{train,val,test}.npz``. deepcell-tf's ``TissueNet`` fetches
  ``tissuenet_v1-1.zip`` (v1.0: ``tissuenet_1-0.zip``) and reads ``<zip name without .zip>/
  {split}.npz``, so these unpack to ``tissuenet_v1-1/`` and ``tissuenet_1-0/``.
* v1.0: ``tissuenet_v1.0_{train,val,test}.npz``

Wrapper folders accepted: ``tissuenet_v1-1/``, ``tissuenet_1-0/`` (deepcell's zips),
``tissuenet_v1.1/``, ``tissuenet_v1.0/``.

Keys: ``X`` (N, H, W, 2) float, channel 0 = nuclear stain, channel 1 = membrane/cytoplasm stain;
``y`` (N, H, W, 2) integer, channel 0 = whole-cell labels, channel 1 = nuclear labels. v1.1 adds
``meta`` (a pickled object array with header row(s)); v1.0 has ``tissue_list`` and
``platform_list`` instead. One item per row of ``X``; its source is ``<file>.npz[<row>]``.

What this converter does about the "Tricky" notes:

* Channel order: X is nucleus-first, the project wants the main stain first, so the image is
  ``X[..., [1, 0]]`` (channel 0 = membrane/cytoplasm, channel 1 = nucleus), as Cellpose 2.0 did
  with ``img[::-1]``. Labels are ``y[..., 0]`` (whole cell); the nuclear labels are not used.
* X is float: each channel goes through ``as_uint_image`` on its own (whole-number data stays as
  it is; real-valued data is mapped from its own [min, max] onto uint16). Per channel, because
  training normalises each channel by its own percentiles, so the ratio between the two channels'
  scales carries nothing, and a dim channel keeps all 65536 levels. When the two channels come
  out with different dtypes (uint8 and uint16) both become uint16.
* Ids need not be sequential: the writer renumbers. Negative or fractional ids reject the item.
* Train images are used whole (512 px). Cellpose 2.0 also cut them into four 256 px quadrants;
  that is a cropping choice the training loader's random crops already make.
* ``meta`` / ``tissue_list`` / ``platform_list`` are not read: the item's source
  (``tissuenet_v1.1_train.npz[17]``) identifies the row, and the tissue and platform of a sample
  can be looked up there. Unconfirmed [T]: v1.1 ``meta`` row 0 is a header (the test file
  reportedly repeats it, 4 header rows in all); torch-em drops row 0, one InstanSeg version
  reads ``meta[i]`` and another ``meta[i + 1]`` for row i of X (column 2 = pixel size). With
  the alignment of ``meta`` to X in doubt, nothing is taken from it.
* Memory: the files are multi-GB, so X and y are never loaded whole; see :func:`npz_member`.
  Members written by ``np.savez`` (stored) are memory-mapped; members written by
  ``np.savez_compressed`` (deflated) are streamed: reading row i decompresses rows 0..i, with
  memory bounded by one row plus a 1 MiB buffer. Each worker process keeps its open streams and
  moves forward from the last row it read, so reading rows in increasing order (what the build
  does within a worker) decompresses each member about once per worker; going backwards
  restarts the member from its start. Whether the published files are stored or compressed is
  unconfirmed; both work.
* Several versions of the same split in one folder (e.g. v1.0 and v1.1 side by side) raise a
  LayoutError rather than picking one silently: point ``--src`` at one version's folder.

Unconfirmed [U]: X dtype (float32 expected, anything numeric works), exact v1.0 shapes, and
whether the paper trained on train only or train + val.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import as_uint_image, found_in

_log = logging.getLogger(__name__)

INFO = DatasetInfo(
    name="tissuenet",
    title="TissueNet v1.0/v1.1 (Greenwald et al. 2022)",
    modality="fluorescence",
    channel_names=("membrane/cytoplasm", "nucleus"),
    splits=("train", "val", "test"),
    layout=(
        "tissuenet_v1.1_{train,val,test}.npz, or {train,val,test}.npz, or "
        "tissuenet_v1.0_{train,val,test}.npz (optionally inside tissuenet_v1-1/ or tissuenet_1-0/ as "
        "deepcell's zips unpack, or tissuenet_v1.1/, tissuenet_v1.0/), keys X (N,H,W,2: nucleus, "
        "membrane) and y (N,H,W,2: cell, nucleus)"
    ),
    paper_images=None,
)

# File names per split: v1.1, the current deepcell download (also v1.1), v1.0. The order only
# fixes the order of the names in messages: two present at once is a LayoutError.
_FILE_PATTERNS = ("tissuenet_v1.1_{split}.npz", "{split}.npz", "tissuenet_v1.0_{split}.npz")
# "" = the dataset folder itself; then deepcell's own zips (tissuenet_v1-1.zip, tissuenet_1-0.zip,
# unpacked to a folder of the zip's name), then the older zips' names.
_SUBFOLDERS = ("", "tissuenet_v1-1", "tissuenet_1-0", "tissuenet_v1.1", "tissuenet_v1.0")
_IMAGE_KEY, _LABELS_KEY = "X", "y"

# ------------------------------------------------------------------------------------------------
# Memory-bounded access to one array of an .npz
# ------------------------------------------------------------------------------------------------

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header, 30 bytes
_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
_SKIP_CHUNK = 1 << 20  # bytes decompressed and dropped per read while skipping rows
_MAX_OPEN_STREAMS = 8


class CompressedNpyRows:
    """Rows of a compressed ``.npy`` member of an ``.npz``, read by streaming.

    ``rows[i]`` returns row ``i`` as an array of shape ``shape[1:]``; only integer indices are
    supported. Reading row ``i`` decompresses everything before it (from the last row this
    process read from the member, when that is not past ``i``); memory stays at one row plus a
    1 MiB buffer.
    """

    def __init__(self, path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype, header_size: int):
        self.path, self.key = path, key
        self.shape, self.dtype = shape, dtype
        self.ndim = len(shape)
        self._header_size = header_size
        self._row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(
                f"{self.path}[{self.key}]: a compressed npz member is read by integer row index only; got {index!r}"
            )
        row = int(index) + (self.shape[0] if index < 0 else 0)
        if not 0 <= row < self.shape[0]:
            raise IndexError(f"{self.path}[{self.key}]: row {index} is out of range for {self.shape[0]} rows")
        out = np.empty(self.shape[1:], dtype=self.dtype)
        _read_compressed_row(self, row, memoryview(out.reshape(-1).view(np.uint8)))
        return out


def npz_member(path: str | os.PathLike, key: str) -> np.memmap | CompressedNpyRows:
    """One array of an ``.npz`` without reading it into memory, indexable by row.

    Parameters
    ----------
    path : str or os.PathLike
        An ``.npz`` file (a zip of ``.npy`` members, as ``np.savez`` / ``np.savez_compressed``
        write them).
    key : str
        The array's name (the member ``<key>.npy``).

    Returns
    -------
    rows : np.memmap or CompressedNpyRows
        A read-only memory map when the member is stored uncompressed (``np.savez``); otherwise a
        :class:`CompressedNpyRows` that streams one row at a time. Both have ``shape``, ``dtype``
        and ``len()``, and ``rows[i]`` gives row ``i``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a zip, lacks the member (the message lists the members it has), the
        member is not a readable ``.npy``, holds Python objects, is cut short, or is a compressed
        Fortran-ordered array (its rows are not contiguous, so it cannot be streamed by row).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            member = f"{key}.npy"
            if member not in names:
                held = sorted(n.removesuffix(".npy") for n in names)
                raise ValueError(f"{path}: has no array {key!r}; it holds {held}")
            info = archive.getinfo(member)
            if info.compress_type == zipfile.ZIP_STORED:
                return _memmap_stored(path, key, info)
            with archive.open(info) as stream:
                shape, fortran_order, dtype = _read_npy_header(stream, path, key)
                header_size = stream.tell()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, struct.error) as error:
        raise ValueError(
            f"{path}: cannot read this .npz ({type(error).__name__}: {error}); it is truncated or not a zip"
        ) from error
    if fortran_order and len(shape) > 1:
        raise ValueError(
            f"{path}[{key}]: a compressed Fortran-ordered array cannot be read one row at a time; "
            "re-save it with np.savez"
        )
    if len(shape) == 0:
        raise ValueError(f"{path}[{key}]: is a 0-d array; expected rows")
    return CompressedNpyRows(path, key, shape, dtype, header_size)


def _memmap_stored(path: Path, key: str, info: zipfile.ZipInfo) -> np.memmap:
    """Memory-map a stored (uncompressed) member: find where its bytes start in the zip."""
    with path.open("rb") as fh:
        fh.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(fh.read(_LOCAL_HEADER.size))
        if fields[0] != _LOCAL_HEADER_SIGNATURE:
            raise ValueError(f"{path}[{key}]: bad zip local header at byte {info.header_offset}; the file is corrupt")
        name_length, extra_length = fields[-2], fields[-1]
        member_start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        fh.seek(member_start)
        shape, fortran_order, dtype = _read_npy_header(fh, path, key)
        data_start = fh.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    member_end = data_start + nbytes
    if member_end - member_start > info.file_size or member_end > path.stat().st_size:
        raise ValueError(
            f"{path}[{key}]: the {shape} {dtype} array needs {nbytes} bytes but the file is cut short; re-download it"
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start, shape=shape, order="F" if fortran_order else "C")


def _read_npy_header(fh, path: Path, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, EOFError, SyntaxError) as error:
        raise ValueError(f"{path}[{key}]: not a readable .npy member ({error})") from error
    if dtype.hasobject:
        raise ValueError(f"{path}[{key}]: holds Python objects ({dtype}); expected a numeric array")
    return tuple(shape), fortran_order, dtype


class _Stream:
    """An open member of a zip, positioned at the start of row ``next_row``."""

    def __init__(self, rows: CompressedNpyRows):
        self.archive = zipfile.ZipFile(rows.path)
        self.member = self.archive.open(f"{rows.key}.npy")
        _skip(self.member, rows._header_size)
        self.next_row = 0

    def close(self) -> None:
        self.member.close()
        self.archive.close()


# Open streams of this process, most recently used last. The key holds the pid so that a forked
# worker never shares a parent's file offset, and the file's size and mtime so that a replaced
# file is reopened.
_streams: OrderedDict[tuple, _Stream] = OrderedDict()
_streams_lock = threading.Lock()


def _read_compressed_row(rows: CompressedNpyRows, row: int, out: memoryview) -> None:
    stat = rows.path.stat()
    cache_key = (os.getpid(), str(rows.path.resolve()), rows.key, stat.st_size, stat.st_mtime_ns)
    with _streams_lock:
        stream = _streams.pop(cache_key, None)
        try:
            if stream is None or stream.next_row > row:
                if stream is not None:
                    stream.close()
                stream = _Stream(rows)
            _skip(stream.member, (row - stream.next_row) * rows._row_bytes)
            _read_exactly(stream.member, out)
            stream.next_row = row + 1
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as error:
            if stream is not None:
                stream.close()
            raise ValueError(
                f"{rows.path}[{rows.key}]: cannot read row {row} ({type(error).__name__}: {error}); "
                "the file is truncated or corrupt"
            ) from error
        _streams[cache_key] = stream
        while len(_streams) > _MAX_OPEN_STREAMS:
            _streams.popitem(last=False)[1].close()


def _skip(member, nbytes: int) -> None:
    # Not member.seek(): it reads ahead in 16 MiB pieces; this keeps the buffer at 1 MiB.
    while nbytes > 0:
        chunk = member.read(min(nbytes, _SKIP_CHUNK))
        if not chunk:
            raise EOFError(f"member ended {nbytes} bytes early")
        nbytes -= len(chunk)


def _read_exactly(member, out: memoryview) -> None:
    filled = 0
    while filled < len(out):
        n = member.readinto(out[filled:])
        if not n:
            raise EOFError(f"member ended {len(out) - filled} bytes early")
        filled += n


# ------------------------------------------------------------------------------------------------
# Converter
# ------------------------------------------------------------------------------------------------


def _split_files(root: Path, split: str) -> list[Path]:
    """Every file in ``root`` (or its version subfolders) that holds ``split``."""
    return [
        root / sub / pattern.format(split=split)
        for sub in _SUBFOLDERS
        for pattern in _FILE_PATTERNS
        if (root / sub / pattern.format(split=split)).is_file()
    ]


def find_items(root: Path, split: str) -> list[Item]:
    if split not in INFO.splits:
        raise ValueError(f"tissuenet has splits {INFO.splits}; got {split!r}")
    root = Path(root)
    if not any(_split_files(root, s) for s in INFO.splits):
        found = found_in(root)
        raise LayoutError(f"{root}: not a TissueNet folder; expected {INFO.layout}; found {found}")
    files = _split_files(root, split)
    if len(files) > 1:
        raise LayoutError(
            f"{root}: holds several TissueNet files for split {split!r}: "
            f"{[p.relative_to(root).as_posix() for p in files]}; point --src at the folder of one version"
        )
    if not files:
        _log.warning("%s: no TissueNet file for split %r (expected one of %s)", root, split, _FILE_PATTERNS)
        return []
    rel = files[0].relative_to(root).as_posix()
    try:
        n_rows = max(len(npz_member(files[0], _IMAGE_KEY)), len(npz_member(files[0], _LABELS_KEY)))
    except ValueError as error:
        # Not a zip, or X or y missing or unreadable: every row would be rejected for the same
        # reason, so the file is one item that load rejects with it.
        _log.warning("%s", error)
        return [Item(source=rel, split=split, ref=(rel, None))]
    return [Item(source=f"{rel}[{i}]", split=split, ref=(rel, i)) for i in range(n_rows)]


def load(root: Path, item: Item) -> Loaded:
    rel, row = item.ref
    path = Path(root) / rel
    images, labels = npz_member(path, _IMAGE_KEY), npz_member(path, _LABELS_KEY)
    if row is None:  # find_items could not open the file; the line above raised if it still cannot
        raise ItemError(f"{path}: could not be listed")
    expected = f"X (N, H, W, 2) and y (N, H, W, 2) with the same N, H, W; got X {images.shape}, y {labels.shape}"
    if images.ndim != 4 or labels.ndim != 4 or images.shape[:3] != labels.shape[:3] or images.shape[3] != 2:
        raise ItemError(f"{path}: expected {expected}")
    # Channel 1 (membrane/cytoplasm) first, then channel 0 (nucleus): the project's order.
    image_row = np.asarray(images[row])
    try:
        channels = [as_uint_image(image_row[:, :, c]) for c in (1, 0)]
    except ItemError as error:
        raise ItemError(f"{path}[X][{row}]: {error}") from error
    dtype = np.uint16 if any(c.dtype == np.uint16 for c in channels) else np.uint8
    image = np.stack([c.astype(dtype) for c in channels], axis=-1)
    cells = _instance_ids(np.asarray(labels[row])[:, :, 0], f"{path}[y][{row}]")
    return Loaded(image=image, labels=cells)


def _instance_ids(values: np.ndarray, what: str) -> np.ndarray:
    """uint32 ids from an integer or whole-number float array; ItemError for anything else."""
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
            raise ItemError(f"{what}: labels hold fractions, NaN or inf; expected whole-number instance ids")
    elif values.dtype.kind not in "iub":
        raise ItemError(f"{what}: labels have dtype {values.dtype}; expected integer instance ids")
    if values.size and values.min() < 0:
        raise ItemError(f"{what}: labels hold negative ids (min {values.min()}); expected ids >= 0")
    if values.size and values.max() > np.iinfo(np.uint32).max:
        raise ItemError(f"{what}: label id {values.max()} does not fit uint32")
    return values.astype(np.uint32)
