"""shardgen.datasets.synthetic: counts.txt sets the counts per split and, with a ``kinds``
line, which kinds of image are drawn; bad lines name the file and line."""

import numpy as np
import pytest

from pipeline.synthetic import dataset_item
from shardgen.base import LayoutError
from shardgen.datasets import synthetic


def test_defaults_cycle_through_every_kind(tmp_path):
    items = synthetic.find_items(tmp_path, "train")
    assert len(items) == synthetic.COUNTS["train"]
    assert [i.source.split("_")[-1] for i in items[:5]] == ["nuclei", "cyto", "phase", "he", "bacteria"]


def test_kinds_line_keeps_only_those_kinds(tmp_path):
    (tmp_path / "counts.txt").write_text("train 5\ntest 2\nkinds nuclei bacteria\n")
    items = synthetic.find_items(tmp_path, "train")
    assert [i.source for i in items] == [f"train/{n:05d}_{k}" for n, k in
                                         enumerate(["nuclei", "bacteria", "nuclei", "bacteria", "nuclei"])]
    loaded = synthetic.load(tmp_path, items[1])
    image, labels, meta = dataset_item(1, ("nuclei", "bacteria"), synthetic.SHAPE, seed=synthetic.SEEDS["train"])
    assert meta["kind"] == "bacteria"
    np.testing.assert_array_equal(loaded.image, image)
    np.testing.assert_array_equal(loaded.labels, labels)
    assert len(synthetic.find_items(tmp_path, "test")) == 2


@pytest.mark.parametrize("line", ["kinds", "kinds nuclei blobs", "train", "valid 3"])
def test_bad_lines_name_the_file_and_line(tmp_path, line):
    (tmp_path / "counts.txt").write_text(f"train 2\n{line}\n")
    with pytest.raises(LayoutError, match="counts.txt:2"):
        synthetic.find_items(tmp_path, "train")
