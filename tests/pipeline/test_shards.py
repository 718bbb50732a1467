"""The one definition of a valid sample (pipeline.shards.sample_problems) and its readers."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.flows import masks_to_flows
from pipeline.shards import SampleMeta, cellpose_diameter, decode_sample, encode_sample, image_problem, sample_problems


def _sample(h=24, w=20, channels=2, dtype=np.uint16):
    labels = np.zeros((h, w), np.uint16)
    labels[2:8, 3:9] = 1
    labels[12:20, 10:17] = 2
    image = (np.arange(h * w * channels).reshape(h, w, channels) % 200).astype(dtype)
    flows = masks_to_flows(labels).astype(np.float16)
    meta = SampleMeta(dataset="d", subset="", key="d-train-0000000", split="train", source="a.tif",
                      height=h, width=w, channels=channels, n_cells=2, diameter=cellpose_diameter(labels),
                      modality="fluorescence", channel_names=("a", "b")[:channels])
    return image, labels, flows, meta


def test_a_written_sample_is_sound_after_a_round_trip():
    image, labels, flows, meta = _sample()
    raw = encode_sample(image, labels, flows, meta)
    decoded = decode_sample(raw)
    assert sample_problems(*decoded, key=raw["__key__"], content=True) == []


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda s: {**s, "image": s["image"].astype(np.float32)}, "uint8 or uint16"),
        (lambda s: {**s, "image": s["image"][:-1]}, "json says"),
        (lambda s: {**s, "labels": s["labels"].astype(np.int32)}, "labels are int32"),
        (lambda s: {**s, "flows": s["flows"].astype(np.float32)}, "flows are float32"),
        (lambda s: {**s, "ignore": np.zeros((3, 3), bool)}, "ignore mask"),
        (lambda s: {**s, "key": "other"}, "differs from the tar key"),
    ],
)
def test_structural_problems_are_named(change, expected):
    image, labels, flows, meta = _sample()
    parts = change(dict(image=image, labels=labels, flows=flows, ignore=None, key=meta.key))
    problems = sample_problems(parts["image"], parts["labels"], parts["flows"], meta, parts["ignore"], key=parts["key"])
    assert any(expected in p for p in problems), problems


def test_content_checks_only_when_asked():
    image, labels, flows, meta = _sample()
    flows = flows.copy()
    flows[:, 0, 0] = 0.5  # outside every object: the flows are not those of these labels
    assert sample_problems(image, labels, flows, meta, None) == []
    assert any("not 0 outside" in p for p in sample_problems(image, labels, flows, meta, None, content=True))
    labels = labels.copy()
    labels[labels == 2] = 5
    assert any("label ids" in p for p in sample_problems(image, labels, masks_to_flows(labels).astype(np.float16),
                                                         meta, None, content=True))


def test_image_problem():
    assert image_problem(np.zeros((4, 4, 3), np.uint8)) is None
    assert "channels" in image_problem(np.zeros((4, 4, 4), np.uint8))
    assert "empty" in image_problem(np.zeros((0, 4, 1), np.uint16))


@pytest.mark.parametrize("array", [np.arange(60, dtype=np.uint16).reshape(3, 4, 5), np.ones((2, 7), np.float16),
                                   np.zeros((5,), bool), np.arange(6, dtype=">u4").reshape(2, 3),
                                   np.asfortranarray(np.arange(12, dtype=np.uint8).reshape(3, 4))])
def test_readonly_decoding_equals_np_load(array):
    from pipeline.shards import decode_array, encode_array

    data = encode_array(array)
    fast = decode_array(data, readonly=True)
    assert fast.dtype == array.dtype and fast.shape == array.shape
    np.testing.assert_array_equal(fast, array)
    np.testing.assert_array_equal(decode_array(data), array)
    assert decode_array(data).flags.writeable
