"""Tests for pipeline/io.py: reading images and labels, percentile normalisation, TIFF writing."""

import csv
import doctest
import logging
import os
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from pipeline import io
from pipeline.io import (
    SUPPORTED_SUFFIXES,
    normalize_percentile,
    read_image,
    read_labels,
    write_image,
    write_labels,
)


def random_image(shape, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.random(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def save_pillow(path, array, **kwargs):
    Image.fromarray(array).save(path, **kwargs)
    return path


def assert_names_file(excinfo, path):
    assert str(path) in str(excinfo.value)


# ---------------------------------------------------------------------------------------------
# Module constants and docs
# ---------------------------------------------------------------------------------------------


def test_supported_suffixes_are_lowercase_dotted_and_complete():
    assert set(SUPPORTED_SUFFIXES) == {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".npy"}
    assert all(s == s.lower() and s.startswith(".") for s in SUPPORTED_SUFFIXES)


def test_doctests_pass():
    result = doctest.testmod(io, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 2
    assert result.failed == 0


# ---------------------------------------------------------------------------------------------
# TIFF
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_gray_round_trips_as_one_channel(tmp_path, dtype):
    pixels = random_image((20, 30), dtype)
    tifffile.imwrite(tmp_path / "a.tif", pixels)
    image = read_image(tmp_path / "a.tif")
    assert image.shape == (20, 30, 1)
    assert image.dtype == dtype
    np.testing.assert_array_equal(image[:, :, 0], pixels)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_rgb_keeps_channels_and_order(tmp_path, dtype):
    pixels = random_image((20, 30, 3), dtype)
    tifffile.imwrite(tmp_path / "rgb.tiff", pixels, photometric="rgb")
    image = read_image(tmp_path / "rgb.tiff")
    assert image.dtype == dtype
    np.testing.assert_array_equal(image, pixels)


def test_tiff_multipage_with_up_to_4_pages_is_channels(tmp_path):
    pages = random_image((3, 20, 30), np.uint16)
    # Separate pages, no shape metadata: tifffile reports the axes as "IYX".
    with tifffile.TiffWriter(tmp_path / "cyx.tif") as tif:
        for page in pages:
            tif.write(page, metadata=None, photometric="minisblack")
    with tifffile.TiffFile(tmp_path / "cyx.tif") as tif:
        assert tif.series[0].axes == "IYX"
    image = read_image(tmp_path / "cyx.tif")
    np.testing.assert_array_equal(image, pages.transpose(1, 2, 0))


def test_tiff_multipage_with_more_than_4_pages_is_a_stack(tmp_path):
    pages = random_image((6, 20, 30), np.uint8)
    path = tmp_path / "stack.tif"
    with tifffile.TiffWriter(path) as tif:
        for page in pages:
            tif.write(page, metadata=None, photometric="minisblack")
    with pytest.raises(ValueError, match="plane=") as excinfo:
        read_image(path)
    assert_names_file(excinfo, path)
    np.testing.assert_array_equal(read_image(path, plane=4)[:, :, 0], pages[4])


def test_tiff_axes_metadata_cyx_is_channels_first(tmp_path):
    pixels = random_image((2, 20, 30), np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", pixels, metadata={"axes": "CYX"}, photometric="minisblack")
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif"), pixels.transpose(1, 2, 0))


def test_ome_tiff_zcyx_needs_plane(tmp_path):
    zcyx = random_image((4, 2, 20, 30), np.uint16)
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, zcyx, metadata={"axes": "ZCYX"})
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.series[0].axes == "ZCYX"
    with pytest.raises(ValueError, match="Z") as excinfo:
        read_image(path)
    assert_names_file(excinfo, path)
    assert "ZCYX" in str(excinfo.value)
    image = read_image(path, plane=2)
    assert image.shape == (20, 30, 2)
    np.testing.assert_array_equal(image, zcyx[2].transpose(1, 2, 0))


def test_ome_tiff_singleton_axes_are_squeezed(tmp_path):
    tczyx = random_image((1, 1, 1, 20, 30), np.uint8)
    tifffile.imwrite(tmp_path / "a.ome.tif", tczyx, metadata={"axes": "TCZYX"})
    image = read_image(tmp_path / "a.ome.tif")
    np.testing.assert_array_equal(image[:, :, 0], tczyx[0, 0, 0])


def test_ome_tiff_ignores_shape_heuristic_when_axes_named(tmp_path):
    # 4 planes on a named Z axis: a stack, even though 4 unnamed pages would be channels.
    zyx = random_image((4, 20, 30), np.uint8)
    tifffile.imwrite(tmp_path / "z.ome.tif", zyx, metadata={"axes": "ZYX"})
    with pytest.raises(ValueError, match="plane="):
        read_image(tmp_path / "z.ome.tif")


def test_imagej_hyperstack_with_z_and_t_cannot_pick_one_plane(tmp_path):
    tzyx = random_image((2, 3, 20, 30), np.uint8)
    path = tmp_path / "tz.tif"
    tifffile.imwrite(path, tzyx, imagej=True, metadata={"axes": "TZYX"})
    with pytest.raises(ValueError, match="more than one stack axis") as excinfo:
        read_image(path, plane=0)
    assert_names_file(excinfo, path)


def test_imagej_zcyx_plane(tmp_path):
    zcyx = random_image((3, 2, 20, 30), np.uint16)
    tifffile.imwrite(tmp_path / "ij.tif", zcyx, imagej=True, metadata={"axes": "ZCYX"})
    np.testing.assert_array_equal(
        read_image(tmp_path / "ij.tif", plane=1), zcyx[1].transpose(1, 2, 0)
    )


def test_five_channels_need_channels_argument(tmp_path):
    cyx = random_image((5, 20, 30), np.uint16)
    path = tmp_path / "c5.ome.tif"
    tifffile.imwrite(path, cyx, metadata={"axes": "CYX"})
    with pytest.raises(ValueError, match=r"channels=\[i, j, k\]") as excinfo:
        read_image(path)
    assert_names_file(excinfo, path)
    assert "(20, 30, 5)" in str(excinfo.value)
    image = read_image(path, channels=[4, 0])
    np.testing.assert_array_equal(image, cyx[[4, 0]].transpose(1, 2, 0))


def test_tiff_rgba_alpha(tmp_path):
    rgba = random_image((20, 30, 4), np.uint8)
    rgba[:, :, 3] = 200
    tifffile.imwrite(tmp_path / "const.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(read_image(tmp_path / "const.tif"), rgba[:, :, :3])
    rgba[0, 0, 3] = 0
    tifffile.imwrite(tmp_path / "vary.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    with pytest.raises(ValueError, match="alpha"):
        read_image(tmp_path / "vary.tif")


# ---------------------------------------------------------------------------------------------
# PNG, JPEG, BMP
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".bmp"])
def test_lossless_pillow_formats_round_trip_gray_and_rgb(tmp_path, suffix):
    gray = random_image((20, 30), np.uint8)
    rgb = random_image((20, 30, 3), np.uint8, seed=1)
    np.testing.assert_array_equal(
        read_image(save_pillow(tmp_path / f"g{suffix}", gray))[:, :, 0], gray
    )
    image = read_image(save_pillow(tmp_path / f"c{suffix}", rgb))
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, rgb)
    assert image.flags.writeable and image.flags.c_contiguous  # Pillow's buffer is read-only


def test_png_rgba_constant_alpha_is_dropped(tmp_path):
    rgba = random_image((20, 30, 4), np.uint8)
    rgba[:, :, 3] = 255
    image = read_image(save_pillow(tmp_path / "a.png", rgba))
    np.testing.assert_array_equal(image, rgba[:, :, :3])


def test_png_rgba_varying_alpha_raises_and_channels_selects(tmp_path):
    rgba = random_image((20, 30, 4), np.uint8)
    path = save_pillow(tmp_path / "a.png", rgba)
    with pytest.raises(ValueError, match=r"channels=") as excinfo:
        read_image(path)
    assert_names_file(excinfo, path)
    assert "(20, 30, 4)" in str(excinfo.value)
    np.testing.assert_array_equal(read_image(path, channels=[0, 1, 2]), rgba[:, :, :3])
    np.testing.assert_array_equal(read_image(path, channels=(3,))[:, :, 0], rgba[:, :, 3])


def test_png_gray_alpha(tmp_path):
    la = random_image((20, 30, 2), np.uint8)
    la[:, :, 1] = 255
    image = read_image(save_pillow(tmp_path / "la.png", la))
    np.testing.assert_array_equal(image, la[:, :, :1])
    la[3, 3, 1] = 0
    with pytest.raises(ValueError, match="alpha"):
        read_image(save_pillow(tmp_path / "la2.png", la))


def test_png_16bit_gray_and_rgb_keep_16_bits(tmp_path):
    gray = random_image((20, 30), np.uint16)
    save_pillow(tmp_path / "g16.png", gray)
    image = read_image(tmp_path / "g16.png")
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image[:, :, 0], gray)
    # Pillow would cut 16-bit RGB to 8 bits; make sure the low byte survives.
    rgb = random_image((20, 30, 3), np.uint16, seed=2)
    (tmp_path / "c16.png").write_bytes(imagecodecs.png_encode(rgb))
    image = read_image(tmp_path / "c16.png")
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image, rgb)


def test_png_palette_gray_and_color(tmp_path):
    indices = random_image((20, 30), np.uint8) % 4
    gray = Image.fromarray(indices, mode="L").convert("P")
    gray.putpalette([v for i in range(256) for v in (i * 10 % 256,) * 3])
    gray.save(tmp_path / "gray.png")
    image = read_image(tmp_path / "gray.png")
    assert image.shape == (20, 30, 1)
    np.testing.assert_array_equal(image[:, :, 0], (indices.astype(int) * 10).astype(np.uint8))

    colors = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    color = Image.fromarray(indices, mode="L").convert("P")
    color.putpalette(colors.ravel().tolist())
    color.save(tmp_path / "color.png")
    np.testing.assert_array_equal(read_image(tmp_path / "color.png"), colors[indices])


def test_one_bit_png_becomes_uint8_zero_one(tmp_path):
    mask = random_image((20, 30), np.uint8) > 128
    save_pillow(tmp_path / "b.png", mask)
    image = read_image(tmp_path / "b.png")
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image[:, :, 0], mask.astype(np.uint8))


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg"])
def test_jpeg_is_close(tmp_path, suffix):
    # Smooth content so that JPEG's loss stays small.
    yy, xx = np.mgrid[0:32, 0:48]
    rgb = np.stack([yy * 6, xx * 4, (yy + xx) * 3], axis=-1).astype(np.uint8)
    save_pillow(tmp_path / f"a{suffix}", rgb, quality=95)
    image = read_image(tmp_path / f"a{suffix}")
    assert image.shape == (32, 48, 3)
    assert image.dtype == np.uint8
    assert np.abs(image.astype(int) - rgb).mean() < 3


def test_jpeg_gray(tmp_path):
    gray = np.tile(np.arange(48, dtype=np.uint8) * 4, (32, 1))
    save_pillow(tmp_path / "g.jpg", gray, quality=95)
    image = read_image(tmp_path / "g.jpg")
    assert image.shape == (32, 48, 1)
    assert np.abs(image[:, :, 0].astype(int) - gray).mean() < 3


def test_bmp_rgba_constant_alpha_is_dropped(tmp_path):
    rgba = random_image((20, 30, 4), np.uint8)
    rgba[:, :, 3] = 255
    save_pillow(tmp_path / "a.bmp", rgba)
    np.testing.assert_array_equal(read_image(tmp_path / "a.bmp"), rgba[:, :, :3])


# ---------------------------------------------------------------------------------------------
# NPY and the shape heuristic
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "to_hwc"),
    [
        ((20, 30), lambda a: a[:, :, None]),
        ((20, 30, 3), lambda a: a),
        ((20, 30, 2), lambda a: a),
        ((3, 20, 30), lambda a: a.transpose(1, 2, 0)),
        ((2, 20, 30), lambda a: a.transpose(1, 2, 0)),
        ((1, 20, 30, 1), lambda a: a[0]),
        ((20, 30, 1), lambda a: a),
    ],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_npy_layouts(tmp_path, shape, to_hwc, dtype):
    pixels = random_image(shape, dtype)
    np.save(tmp_path / "a.npy", pixels)
    image = read_image(tmp_path / "a.npy")
    assert image.dtype == dtype
    np.testing.assert_array_equal(image, to_hwc(pixels))
    # A plain, writable, in-memory array, not a read-only memory map.
    assert type(image) is np.ndarray
    assert image.flags.writeable and image.flags.c_contiguous


def test_npy_bool_becomes_uint8_and_big_endian_becomes_native(tmp_path):
    np.save(tmp_path / "b.npy", np.eye(5, dtype=bool))
    image = read_image(tmp_path / "b.npy")
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image[:, :, 0], np.eye(5, dtype=np.uint8))

    big_endian = random_image((6, 7), np.uint16).astype(">u2")
    np.save(tmp_path / "be.npy", big_endian)
    image = read_image(tmp_path / "be.npy")
    assert image.dtype == np.uint16 and image.dtype.isnative
    np.testing.assert_array_equal(image[:, :, 0], big_endian)


def test_npy_stack_needs_plane(tmp_path):
    stack = random_image((10, 20, 30), np.uint16)
    np.save(tmp_path / "z.npy", stack)
    with pytest.raises(ValueError, match="plane="):
        read_image(tmp_path / "z.npy")
    np.testing.assert_array_equal(read_image(tmp_path / "z.npy", plane=7)[:, :, 0], stack[7])
    stack_rgb = random_image((10, 20, 30, 3), np.uint8)
    np.save(tmp_path / "zc.npy", stack_rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "zc.npy", plane=3), stack_rgb[3])


def test_npy_four_channels_constant_last_is_dropped_varying_raises(tmp_path):
    pixels = random_image((20, 30, 4), np.float32)
    pixels[:, :, 3] = 1.0
    np.save(tmp_path / "a.npy", pixels)
    np.testing.assert_array_equal(read_image(tmp_path / "a.npy"), pixels[:, :, :3])
    pixels[0, 0, 3] = 0.5
    np.save(tmp_path / "b.npy", pixels)
    with pytest.raises(ValueError, match="channels="):
        read_image(tmp_path / "b.npy")


@pytest.mark.parametrize(
    "shape", [(30,), (0, 30), (20, 0, 3), (2, 3, 4, 20, 30), (6, 7, 20, 30), (1, 30)]
)
def test_npy_wrong_shapes_raise_naming_file(tmp_path, shape):
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros(shape, np.uint8))
    with pytest.raises(ValueError) as excinfo:
        read_image(path)
    assert_names_file(excinfo, path)
    assert str(shape) in str(excinfo.value)


@pytest.mark.parametrize("array", [np.array([{}], dtype=object), np.zeros((4, 4), complex)])
def test_npy_unsupported_dtypes_raise(tmp_path, array):
    path = tmp_path / "bad.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(ValueError) as excinfo:
        read_image(path)
    assert_names_file(excinfo, path)


def test_plane_and_channels_argument_errors(tmp_path):
    rgb = random_image((20, 30, 3), np.uint8)
    path = save_pillow(tmp_path / "a.png", rgb)
    with pytest.raises(ValueError, match="no Z, T or page axis"):
        read_image(path, plane=0)
    with pytest.raises(ValueError, match="out of range"):
        read_image(path, channels=[0, 3])
    with pytest.raises(ValueError, match="1 to 3"):
        read_image(path, channels=[0, 1, 2, 0])
    with pytest.raises(TypeError):
        read_image(path, channels=1)
    with pytest.raises(TypeError):
        read_image(path, channels=["red"])
    np.save(tmp_path / "z.npy", np.zeros((6, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"out of range.*0\.\.5"):
        read_image(tmp_path / "z.npy", plane=6)
    with pytest.raises(TypeError):
        read_image(tmp_path / "z.npy", plane=1.0)


# ---------------------------------------------------------------------------------------------
# Broken files
# ---------------------------------------------------------------------------------------------


def test_missing_file_raises_file_not_found_with_path(tmp_path):
    path = tmp_path / "nope.tif"
    with pytest.raises(FileNotFoundError) as excinfo:
        read_image(path)
    assert_names_file(excinfo, path)
    with pytest.raises(FileNotFoundError):
        read_labels(path)


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
def test_empty_file_raises(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.touch()
    with pytest.raises(ValueError, match="empty") as excinfo:
        read_image(path)
    assert_names_file(excinfo, path)


def _write_valid(path):
    """Write a valid, incompressible 64x64 RGB file in the format named by the suffix."""
    rgb = random_image((64, 64, 3), np.uint8)
    if path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, rgb, photometric="rgb")
    elif path.suffix == ".npy":
        np.save(path, rgb)
    else:
        save_pillow(path, rgb)
    return path


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_file_raises_naming_file(tmp_path, suffix, keep):
    path = _write_valid(tmp_path / f"full{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError) as excinfo:
        read_image(path)
    assert_names_file(excinfo, path)


def test_truncated_multipage_tiff_raises_instead_of_returning_fewer_pages(tmp_path):
    # tifffile only logs that the page list is cut short, and returns the pages before the cut.
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tif:
        for page in random_image((3, 64, 64), np.uint8):
            tif.write(page, metadata=None, photometric="minisblack")
    with tifffile.TiffFile(path) as tif:
        second_page_at = tif.pages[1].offset
    # Cut where the second page's IFD starts: the first page stays complete.
    path.write_bytes(path.read_bytes()[:second_page_at])
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].shape == (64, 64)  # what tifffile alone would hand back
    with pytest.raises(ValueError, match="tifffile reported") as excinfo:
        read_image(path)
    assert_names_file(excinfo, path)
    # The temporary handler is gone again.
    assert not any(
        type(h).__name__ == "_ThreadErrorCollector" for h in logging.getLogger("tifffile").handlers
    )


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
def test_garbage_content_raises_naming_file(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not an image" * 10)
    with pytest.raises(ValueError, match="not a valid") as excinfo:
        read_image(path)
    assert_names_file(excinfo, path)


def test_corrupt_body_with_valid_header_raises(tmp_path):
    path = _write_valid(tmp_path / "a.png")
    data = bytearray(path.read_bytes())
    data[100:200] = b"\x00" * 100  # inside the compressed IDAT stream
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as excinfo:
        read_image(path)
    assert_names_file(excinfo, path)


def test_content_not_matching_extension_raises(tmp_path):
    tiff_as_png = tmp_path / "really_a_tiff.png"
    tifffile.imwrite(tiff_as_png, np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="content is TIFF") as excinfo:
        read_image(tiff_as_png)
    assert_names_file(excinfo, tiff_as_png)


@pytest.mark.parametrize("name", ["a.gif", "a.czi", "noext"])
def test_unsupported_extension_raises(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"GIF89a" + bytes(100))
    with pytest.raises(ValueError, match="unsupported file type") as excinfo:
        read_image(path)
    assert_names_file(excinfo, path)


def test_uppercase_suffix_is_accepted(tmp_path):
    pixels = random_image((8, 9), np.uint8)
    tifffile.imwrite(tmp_path / "A.TIF", pixels)
    np.testing.assert_array_equal(read_image(tmp_path / "A.TIF")[:, :, 0], pixels)


def test_directory_raises(tmp_path):
    (tmp_path / "d.tif").mkdir()
    with pytest.raises(ValueError, match="not a file"):
        read_image(tmp_path / "d.tif")


def test_animated_png_raises(tmp_path):
    frames = [Image.fromarray(np.full((8, 8), i, np.uint8)) for i in range(3)]
    path = tmp_path / "anim.png"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match="animated") as excinfo:
        read_image(path)
    assert_names_file(excinfo, path)


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


def test_labels_uint16_png_and_uint32_int32_tiff_keep_dtype(tmp_path):
    labels16 = random_image((20, 30), np.uint16)
    save_pillow(tmp_path / "m.png", labels16)
    out = read_labels(tmp_path / "m.png")
    assert out.dtype == np.uint16 and out.shape == (20, 30) and out.flags.writeable
    np.testing.assert_array_equal(out, labels16)
    for dtype in (np.uint32, np.int32, np.uint8):
        labels = (random_image((20, 30), np.uint16) % 1000).astype(dtype)
        tifffile.imwrite(tmp_path / "m.tif", labels)
        out = read_labels(tmp_path / "m.tif")
        assert out.dtype == dtype
        np.testing.assert_array_equal(out, labels)


@pytest.mark.parametrize(("stored", "expected"), [(np.int16, np.uint16), (np.int8, np.uint8)])
def test_labels_small_signed_become_unsigned(tmp_path, stored, expected):
    labels = (random_image((20, 30), np.uint8) % 100).astype(stored)
    tifffile.imwrite(tmp_path / "m.tiff", labels)
    out = read_labels(tmp_path / "m.tiff")
    assert out.dtype == expected
    np.testing.assert_array_equal(out, labels)


def test_labels_negative_ids_raise(tmp_path):
    labels = np.zeros((8, 8), np.int16)
    labels[2, 2] = -5
    path = tmp_path / "neg.tif"
    tifffile.imwrite(path, labels)
    with pytest.raises(ValueError, match="-5") as excinfo:
        read_labels(path)
    assert_names_file(excinfo, path)


def test_labels_float_whole_numbers_accepted_fractions_rejected(tmp_path):
    whole = np.array([[0, 1], [2, 70000]], np.float32)
    np.save(tmp_path / "w.npy", whole)
    out = read_labels(tmp_path / "w.npy")
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, [[0, 1], [2, 70000]])
    np.save(tmp_path / "s.npy", np.array([[0, 1], [2, 3]], np.float64))
    assert read_labels(tmp_path / "s.npy").dtype == np.uint16
    for bad in ([[0, 1.5]], [[0, np.nan]], [[0, -1.0]]):
        path = tmp_path / "bad.npy"
        np.save(path, np.array(bad, np.float32))
        with pytest.raises(ValueError) as excinfo:
            read_labels(path)
        assert_names_file(excinfo, path)


def test_labels_multichannel_raise_naming_file_and_shape(tmp_path):
    path = save_pillow(tmp_path / "rgb_mask.png", random_image((20, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="2-D plane") as excinfo:
        read_labels(path)
    assert_names_file(excinfo, path)
    assert "(20, 30, 3)" in str(excinfo.value)
    path = tmp_path / "y.npy"
    np.save(path, np.zeros((20, 30, 2), np.int32))
    with pytest.raises(ValueError, match=r"\(20, 30, 2\)"):
        read_labels(path)


def test_labels_singleton_axes_squeezed_bool_and_palette(tmp_path):
    labels = (random_image((1, 20, 30), np.uint16) % 7).astype(np.int32)
    np.save(tmp_path / "m.npy", labels)
    np.testing.assert_array_equal(read_labels(tmp_path / "m.npy"), labels[0])

    np.save(tmp_path / "b.npy", labels[0] > 3)
    out = read_labels(tmp_path / "b.npy")
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}

    ids = (random_image((20, 30), np.uint8) % 5).astype(np.uint8)
    palette = Image.fromarray(ids, mode="L").convert("P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_labels(tmp_path / "p.png"), ids)


def test_labels_jpeg_refused(tmp_path):
    path = save_pillow(tmp_path / "m.jpg", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="lossy") as excinfo:
        read_labels(path)
    assert_names_file(excinfo, path)


# ---------------------------------------------------------------------------------------------
# normalize_percentile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize(("lower", "upper"), [(1.0, 99.0), (0.0, 100.0), (5.0, 60.0)])
def test_normalize_percentiles_land_on_zero_and_one(dtype, lower, upper):
    image = random_image((40, 50, 3), dtype)
    normalized = normalize_percentile(image, lower=lower, upper=upper)
    assert normalized.dtype == np.float32
    assert normalized.shape == image.shape
    for c in range(3):
        low, high = np.percentile(normalized[:, :, c].astype(np.float64), [lower, upper])
        assert low == pytest.approx(0.0, abs=1e-5)
        assert high == pytest.approx(1.0, abs=1e-5)


def test_normalize_is_affine_and_unclipped():
    image = random_image((30, 30, 1), np.uint16)
    low, high = np.percentile(image, [1, 99])
    expected = (image.astype(np.float64) - low) / (high - low)
    normalized = normalize_percentile(image)
    np.testing.assert_allclose(normalized, expected, rtol=1e-5, atol=1e-6)
    assert normalized.min() < 0 and normalized.max() > 1


def test_normalize_flat_channel_is_zero_and_channels_are_independent():
    image = random_image((30, 40, 3), np.float32)
    image[:, :, 1] = 5.0
    image[:, :, 2] = 2.0 + 1e-4 * image[:, :, 2]  # range below 1e-3: flat
    normalized = normalize_percentile(image)
    assert np.all(normalized[:, :, 1] == 0) and np.all(normalized[:, :, 2] == 0)
    # Channel 0 does not depend on what the other channels hold.
    alone = normalize_percentile(image[:, :, :1])
    np.testing.assert_array_equal(normalized[:, :, :1], alone)
    scrambled = image.copy()
    scrambled[:, :, 1:] = random_image((30, 40, 2), np.float32, seed=9) * 1000
    np.testing.assert_array_equal(normalize_percentile(scrambled)[:, :, 0], normalized[:, :, 0])


def test_normalize_nan_and_inf_are_left_out_of_percentiles():
    image = random_image((30, 40, 2), np.float32)
    image[0, 0, 0] = np.nan
    image[1, 1, 0] = np.inf
    image[:, :, 1] = np.nan
    normalized = normalize_percentile(image)
    finite = np.isfinite(image[:, :, 0])
    low, high = np.percentile(image[:, :, 0][finite], [1, 99])
    expected = (image[:, :, 0][finite] - low) / (high - low)
    np.testing.assert_allclose(normalized[:, :, 0][finite], expected, rtol=1e-5, atol=1e-6)
    assert np.isnan(normalized[0, 0, 0]) and normalized[1, 1, 0] == np.inf
    assert np.all(normalized[:, :, 1] == 0)  # no finite pixel: flat


def test_normalize_large_channel_uses_strided_subsample():
    # 3400**2 > 224**3, so percentiles come from image[::15, ::15] (3400 // 224 == 15).
    image = np.zeros((3400, 3400, 1), np.uint8)
    image[::15, ::15] = random_image((227, 227, 1), np.uint8)
    low, high = np.percentile(image[::15, ::15], [1, 99])
    normalized = normalize_percentile(image)
    assert normalized[0, 1, 0] == pytest.approx((0 - low) / (high - low))
    np.testing.assert_allclose(
        normalized[::15, ::15], (image[::15, ::15] - low) / (high - low), rtol=1e-5
    )


def test_normalize_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        normalize_percentile(np.zeros((4, 4)))
    with pytest.raises(ValueError):
        normalize_percentile(np.zeros((0, 4, 1)))
    with pytest.raises(ValueError, match="lower < upper"):
        normalize_percentile(np.zeros((4, 4, 1)), lower=99, upper=1)
    with pytest.raises(TypeError):
        normalize_percentile(np.zeros((4, 4, 1), complex))


@st.composite
def small_images(draw):
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.float32]))
    if dtype == np.float32:
        elements = st.floats(-1e4, 1e4, allow_nan=False, width=32)
    else:
        elements = st.integers(0, np.iinfo(dtype).max)
    shape = draw(hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=12))
    return draw(hnp.arrays(dtype, shape, elements=elements))


@settings(max_examples=80, deadline=None)
@given(small_images(), st.floats(0, 49), st.floats(51, 100))
def test_normalize_property(image, lower, upper):
    normalized = normalize_percentile(image, lower, upper)
    assert normalized.dtype == np.float32 and normalized.shape == image.shape
    assert np.all(np.isfinite(normalized))
    for c in range(image.shape[2]):
        channel = image[:, :, c].astype(np.float64).ravel()
        out = normalized[:, :, c].astype(np.float64).ravel()
        low, high = np.percentile(channel, [lower, upper])
        if high - low <= 1e-3:
            assert np.all(out == 0)
            continue
        got_low, got_high = np.percentile(out, [lower, upper])
        assert got_low == pytest.approx(0.0, abs=1e-4)
        assert got_high == pytest.approx(1.0, abs=1e-4)
        # The map is increasing: sorting by input sorts the output too.
        assert np.all(np.diff(out[np.argsort(channel, kind="stable")]) >= -1e-6)


@pytest.mark.slow  # importing cellpose (and torch) takes several seconds
@pytest.mark.reference
def test_normalize_matches_cellpose_normalize99():
    transforms = pytest.importorskip("cellpose.transforms")
    # Expected values: cellpose 4.2.1.1 transforms.normalize99(channel, downsample=True), which
    # normalize_img applies per channel; a 3400 x 3400 channel exercises its subsampling.
    image = random_image((3400, 3400, 2), np.uint16)
    image[:, :, 1] //= 7
    ours = normalize_percentile(image)
    for c in range(2):
        theirs = transforms.normalize99(image[:, :, c], downsample=True)
        np.testing.assert_allclose(ours[:, :, c], theirs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def test_write_labels_uint16_is_imagej_and_round_trips(tmp_path):
    labels = (random_image((20, 30), np.uint16) % 500).astype(np.int64)
    path = tmp_path / "m.tif"
    write_labels(path, labels)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej
        assert tif.series[0].dtype == np.uint16
        assert len(tif.pages) == 1
    out = read_labels(path)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, labels)


def test_write_labels_above_65535_is_uint32(tmp_path):
    labels = np.zeros((20, 30), np.int64)
    labels[3:6, 4:9] = 70_000
    labels[10:12, 1:3] = 2**32 - 1
    path = tmp_path / "m.tiff"
    write_labels(path, labels)
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].dtype == np.uint32
        assert tif.pages[0].sampleformat == tifffile.SAMPLEFORMAT.UINT
    out = read_labels(path)
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, labels)


def test_write_labels_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError):
        write_labels(tmp_path / "m.tif", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=">= 0"):
        write_labels(tmp_path / "m.tif", -np.ones((4, 4), np.int32))
    with pytest.raises(ValueError, match="uint32"):
        write_labels(tmp_path / "m.tif", np.full((4, 4), 2**32, np.int64))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        write_labels(tmp_path / "m.tif", np.zeros((2, 2, 4, 4), np.uint16))
    with pytest.raises(ValueError, match="axes"):
        write_labels(tmp_path / "m.tif", np.zeros((2, 4, 4), np.uint16), axes="CYX")
    with pytest.raises(ValueError, match="TIFF"):
        write_labels(tmp_path / "m.png", np.zeros((4, 4), np.uint16))
    with pytest.raises(FileNotFoundError):
        write_labels(tmp_path / "missing" / "m.tif", np.zeros((4, 4), np.uint16))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((20, 30), np.uint16),
        ((20, 30, 1), np.float32),
        ((20, 30, 2), np.uint8),
        ((20, 30, 3), np.uint8),
        ((20, 30, 3), np.uint16),
        ((20, 30, 3), np.float32),
        ((20, 30, 2), np.int32),
    ],
)
def test_write_image_round_trips(tmp_path, shape, dtype):
    image = random_image(shape, dtype)
    write_image(tmp_path / "a.tif", image)
    out = read_image(tmp_path / "a.tif")
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, image if image.ndim == 3 else image[:, :, None])


def test_write_image_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="1 <= C <= 3"):
        write_image(tmp_path / "a.tif", np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(TypeError):
        write_image(tmp_path / "a.tif", np.zeros((4, 4), complex))
    with pytest.raises(ValueError, match="TIFF"):
        write_image(tmp_path / "a.npy", np.zeros((4, 4), np.uint8))


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.tif"
    old = np.arange(12, dtype=np.uint16).reshape(3, 4)
    write_labels(path, old)
    before = path.read_bytes()

    def crash_midway(fh, data, **kwargs):
        fh.write(b"II*\x00 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(io.tifffile, "imwrite", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        write_labels(path, old + 1)
    with pytest.raises(KeyboardInterrupt):
        write_image(path, old + 1)
    assert path.read_bytes() == before  # the old file is untouched ...
    assert [p.name for p in tmp_path.iterdir()] == ["m.tif"]  # ... and no temporary is left


def test_written_file_has_default_permissions(tmp_path):
    write_image(tmp_path / "a.tif", np.zeros((4, 4), np.uint8))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.tif").stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------
# Real samples in /work/shared/data (see its README.md)
# ---------------------------------------------------------------------------------------------


def test_cellpose_cyto_images_and_masks(shared_data):
    folder = shared_data / "cellpose_cyto" / "train"
    image_paths = sorted(folder.glob("*_img.png"))
    assert len(image_paths) == 20
    n_cells = 0
    for image_path in image_paths:
        image = read_image(image_path)
        # The README says uint8, but these PNGs are 16-bit RGB (IHDR bit depth 16) with
        # information in the low byte; Pillow alone cuts them to 8 bits. We keep all 16.
        assert image.dtype == np.uint16 and image.ndim == 3 and image.shape[2] == 3
        with Image.open(image_path) as im:
            np.testing.assert_array_equal(image >> 8, np.asarray(im))
        assert image[:, :, 1].max() > 0  # cytoplasm in green
        assert image[:, :, 2].max() == 0  # blue empty
        masks = read_labels(folder / image_path.name.replace("_img", "_masks"))
        assert masks.dtype == np.uint16 and masks.shape == image.shape[:2]
        ids = np.unique(masks)
        assert ids[0] == 0 and np.array_equal(ids[1:], np.arange(1, masks.max() + 1))
        n_cells += len(ids) - 1
    assert 2400 <= n_cells <= 2600  # README: ~2,500 cells


def test_neurips22_images_and_int16_labels(shared_data):
    folder = shared_data / "neurips22" / "Train_Labeled"
    n_cells = 0
    for image_path in sorted((folder / "images").iterdir()):
        image = read_image(image_path)
        label_path = folder / "labels" / f"{image_path.stem}_label.tiff"
        with tifffile.TiffFile(label_path) as tif:
            assert tif.series[0].dtype == np.int16  # as shipped
        labels = read_labels(label_path)
        assert labels.dtype == np.uint16
        assert labels.shape == image.shape[:2]
        n_cells += len(np.unique(labels)) - 1
        if image_path.suffix == ".tif":
            assert image.dtype == np.uint16 and image.shape[2] == 1
        else:
            assert image.dtype == np.uint8 and image.shape[2] == 3
    assert n_cells == 237  # README


def test_monuseg_rgb_tif(shared_data):
    paths = sorted((shared_data / "monuseg" / "MoNuSegTestData").glob("*.tif"))
    assert len(paths) == 2
    for path in paths:
        image = read_image(path)
        assert image.shape == (1000, 1000, 3) and image.dtype == np.uint8
        assert len({int(image[:, :, c].mean()) for c in range(3)}) > 1  # really colour


def test_dsb2018_rgba_png_becomes_three_channels(shared_data):
    root = shared_data / "dsb2018"
    with open(root / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))[:6]
    for row in rows:
        path = root / "stage1_train" / row["image_id"] / "images" / f"{row['image_id']}.png"
        with Image.open(path) as im:
            assert im.mode == "RGBA"
            rgba = np.asarray(im)
        image = read_image(path)
        assert image.shape == (int(row["height"]), int(row["width"]), 3)
        np.testing.assert_array_equal(image, rgba[:, :, :3])
        mask_path = next((path.parent.parent / "masks").glob("*.png"))
        mask = read_labels(mask_path)
        assert mask.shape == image.shape[:2] and set(np.unique(mask)) == {0, 255}


def test_real_sample_suffixes_are_supported(shared_data):
    suffixes = {
        p.suffix.lower()
        for p in Path(shared_data).rglob("*")
        if p.is_file() and p.suffix.lower() in {".png", ".tif", ".tiff"}
    }
    assert suffixes <= set(SUPPORTED_SUFFIXES)


# ---------------------------------------------------------------------------------------------
# Cellpose GUI files (_seg.npy)
# ---------------------------------------------------------------------------------------------


def test_read_seg_reads_what_cellpose_writes(tmp_path):
    # The file is written by Cellpose 4.2.1.1's own io.masks_flows_to_seg (what its CLI and
    # GUI save); what comes back must be its masks.
    cp_io = pytest.importorskip("cellpose.io")
    from pipeline.io import read_seg

    masks = np.zeros((40, 50), np.uint16)
    masks[5:15, 5:20], masks[20:35, 25:45] = 1, 2
    dP = np.zeros((2, 40, 50), np.float32)
    cellprob = np.where(masks > 0, 2.0, -2.0).astype(np.float32)
    rgb = np.zeros((40, 50, 3), np.uint8)
    cp_io.masks_flows_to_seg(np.zeros((40, 50), np.float32), masks, [rgb, dP, cellprob], str(tmp_path / "im.png"))
    record = read_seg(tmp_path / "im_seg.npy")
    np.testing.assert_array_equal(record["masks"], masks)
    assert record["masks"].dtype == np.uint16 and record["filename"] == str(tmp_path / "im.png")
    assert len(record["ismanual"]) == 2


def test_read_seg_refuses_bad_files_and_code(tmp_path):
    from pipeline.io import read_seg

    with pytest.raises(FileNotFoundError, match="nowhere_seg.npy"):
        read_seg(tmp_path / "nowhere_seg.npy")
    np.save(tmp_path / "plain_seg.npy", np.zeros((4, 4), np.uint16))
    with pytest.raises(ValueError, match="plain_seg.npy: not a Cellpose _seg.npy file"):
        read_seg(tmp_path / "plain_seg.npy")
    np.save(tmp_path / "nomasks_seg.npy", np.array({"outlines": np.zeros((4, 4))}, dtype=object))
    with pytest.raises(ValueError, match="expected a dict with 'masks'"):
        read_seg(tmp_path / "nomasks_seg.npy")
    np.save(tmp_path / "stack_seg.npy", np.array({"masks": np.zeros((3, 4, 4), np.uint16)}, dtype=object))
    with pytest.raises(ValueError, match="3-D GUI annotations"):
        read_seg(tmp_path / "stack_seg.npy")
    np.save(tmp_path / "neg_seg.npy", np.array({"masks": -np.ones((4, 4), np.int32)}, dtype=object))
    with pytest.raises(ValueError, match="must be >= 0"):
        read_seg(tmp_path / "neg_seg.npy")

    class RunsCode:
        def __reduce__(self):
            return (print, ("this must never run",))

    np.save(tmp_path / "evil_seg.npy", np.array({"masks": np.zeros((4, 4)), "x": RunsCode()}, dtype=object))
    with pytest.raises(ValueError, match="refusing to unpickle builtins.print"):
        read_seg(tmp_path / "evil_seg.npy")


# ---------------------------------------------------------------------------------------------
# Stacks: read_stack, label stacks with their info text
# ---------------------------------------------------------------------------------------------


def test_read_stack_keeps_the_stack_axis_first(tmp_path):
    from pipeline.io import read_stack

    rng = np.random.default_rng(0)
    timelapse = rng.integers(0, 1000, (4, 2, 30, 40), dtype=np.uint16)  # T, C, Y, X
    tifffile.imwrite(tmp_path / "t.tif", timelapse, imagej=True, metadata={"axes": "TCYX"})
    planes, letter = read_stack(tmp_path / "t.tif")
    assert letter == "T" and planes.shape == (4, 30, 40, 2)
    np.testing.assert_array_equal(planes, timelapse.transpose(0, 2, 3, 1))
    # Each plane is what read_image gives for it.
    for index in range(4):
        np.testing.assert_array_equal(planes[index], read_image(tmp_path / "t.tif", plane=index))
    # A 2-D image is a stack of one, without a letter.
    tifffile.imwrite(tmp_path / "one.tif", timelapse[0, 0])
    planes, letter = read_stack(tmp_path / "one.tif")
    assert letter is None and planes.shape == (1, 30, 40, 1)


def test_channel_axis_turns_pages_into_channels(tmp_path):
    # A plain TIFF of 5 pages is a stack by the policy (> 4 pages); channel_axis says they are
    # channels (Cellpose's --channel_axis), and channels= picks up to 3 of them.
    from pipeline.io import read_stack

    pages = np.arange(5 * 20 * 30, dtype=np.uint16).reshape(5, 20, 30)
    tifffile.imwrite(tmp_path / "five.tif", pages)
    with pytest.raises(ValueError, match="stack"):
        read_image(tmp_path / "five.tif")
    with pytest.raises(ValueError, match="5 channels"):
        read_image(tmp_path / "five.tif", channel_axis=0)
    image = read_image(tmp_path / "five.tif", channels=[4, 0], channel_axis=0)
    np.testing.assert_array_equal(image, pages[[4, 0]].transpose(1, 2, 0))
    planes, letter = read_stack(tmp_path / "five.tif", channels=[1], channel_axis=-3)
    assert letter is None and planes.shape == (1, 20, 30, 1)
    # z_axis names the stack axis of an unnamed array; channel_axis the channel one.
    volume = np.random.default_rng(1).random((2, 6, 20, 30)).astype(np.float32)  # C, Z, Y, X
    np.save(tmp_path / "v.npy", volume)
    planes, letter = read_stack(tmp_path / "v.npy", channel_axis=0, z_axis=1)
    assert letter == "Z"
    np.testing.assert_array_equal(planes, volume.transpose(1, 2, 3, 0))
    with pytest.raises(ValueError, match="out of range"):
        read_stack(tmp_path / "v.npy", channel_axis=4)
    with pytest.raises(ValueError, match="other named axis"):
        read_stack(tmp_path / "v.npy", channel_axis=0, z_axis=-4)


@pytest.mark.parametrize("largest", [300, 70000])
@pytest.mark.parametrize("axes", ["ZYX", "TYX"])
def test_label_stacks_open_as_stacks_and_keep_their_info(tmp_path, axes, largest):
    from pipeline.io import read_labels_info

    labels = (np.arange(3 * 20 * 30).reshape(3, 20, 30) * largest // (3 * 20 * 30)).astype(np.uint32)
    write_labels(tmp_path / "m.tif", labels, axes=axes, info='{"niter": 200}')
    with tifffile.TiffFile(tmp_path / "m.tif") as tif:
        # Fiji opens an ImageJ hyperstack as a stack along Z or T (uint16 only: ImageJ has no
        # uint32, so larger ids are a plain multi-page TIFF).
        assert tif.is_imagej == (largest <= 65535)
        if tif.is_imagej:
            assert tif.series[0].axes == axes and tif.imagej_metadata["hyperstack"]
        np.testing.assert_array_equal(tif.asarray(), labels)
    assert read_labels_info(tmp_path / "m.tif") == '{"niter": 200}'
    write_labels(tmp_path / "plain.tif", labels[0])
    assert read_labels_info(tmp_path / "plain.tif") is None
