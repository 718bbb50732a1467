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


def test_paper_like_items_have_the_table_s_size_dtype_and_count(tmp_path):
    # The table itself comes from paper.md 1a (counts) and datasets.md (sizes, channels, dtypes).
    scale = 0.01
    folders = synthetic.paper_like_folders(scale)
    assert set(folders) == {g.split("/")[0] for g in synthetic.PAPER_LIKE}
    for name, counts in folders.items():
        src = tmp_path / name
        src.mkdir()
        (src / "counts.txt").write_text(counts)
        items = synthetic.find_items(src, "train")
        groups = [g for g in synthetic.PAPER_LIKE if g.split("/")[0] == name]
        for group in groups:
            spec = synthetic.PAPER_LIKE[group]
            mine = [i for i in items if i.subset == spec.subset]
            assert len(mine) == max(1, round(spec.images * scale))
            loaded = synthetic.load(src, mine[0])
            assert loaded.image.shape == (*spec.shape, len(spec.channel_names))
            assert loaded.image.dtype == spec.dtype and loaded.labels.shape == spec.shape
            assert loaded.modality == spec.modality and loaded.channel_names == spec.channel_names
            assert loaded.labels.max() > 0
        assert 1 <= len(synthetic.find_items(src, "test")) <= len(items)


@pytest.mark.parametrize("text", ["like nothing\n", "scale 2\n", "like cyto2\nscale -1\n", "like cyto2\nscale x\n"])
def test_bad_like_lines_name_the_file(tmp_path, text):
    (tmp_path / "counts.txt").write_text(text)
    with pytest.raises(LayoutError, match="counts.txt"):
        synthetic.find_items(tmp_path, "train")


def test_a_stand_in_is_written_under_the_paper_dataset_s_name_with_its_weights(tmp_path):
    from pipeline.shards import MANIFEST_FILE
    from shardgen.build import build_dataset

    src = tmp_path / "src"
    src.mkdir()
    (src / "counts.txt").write_text(synthetic.paper_like_folders(0.005)["omnipose"])
    out = tmp_path / "out"
    build_dataset("synthetic", src, out, splits=["train"], dataset="omnipose")
    import pyarrow.parquet as pq
    import yaml

    rows = pq.read_table(out / MANIFEST_FILE).to_pylist()
    assert {(r["dataset"], r["subset"]) for r in rows} == {("omnipose", "bact_phase"), ("omnipose", "bact_fluor")}
    weights = yaml.safe_load((out / "weights.yaml").read_text())["weights"]
    # shardgen.weights' paper table gives both subsets 0.015: equal after renormalising.
    assert weights == {"omnipose/bact_fluor": 0.5, "omnipose/bact_phase": 0.5}
