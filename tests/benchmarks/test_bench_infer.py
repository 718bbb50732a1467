"""The inference benchmarks' inputs: the real samples here, synthetic ones of the same layout on
a lent GPU, where ../shared/data does not travel (benchmarks/gpu_check.py runs them there)."""

import numpy as np

from benchmarks import bench_infer, bench_infer_many


def test_infer_image_is_a_real_cyto_image(shared_data):
    image, source = bench_infer.test_image(300, root=shared_data)
    assert image.shape == (300, 300, 3) and source.endswith("_img.png")
    assert (image[..., 2] == 0).all()  # Cellpose's cyto RGB: blue is empty


def test_infer_image_without_the_samples_is_synthetic_in_the_same_layout(tmp_path):
    image, source = bench_infer.test_image(300, root=tmp_path)
    assert image.shape == (300, 300, 3) and image.dtype == np.float32 and source == "synthetic cyto"
    assert (image[..., 2] == 0).all() and image[..., 0].std() > 0 and image[..., 1].std() > 0


def test_many_images_are_the_smallest_dsb_ones(shared_data):
    source, images = bench_infer_many.dsb_images(5, root=shared_data)
    sizes = [image.shape[0] * image.shape[1] for image in images]
    every = sorted(np.prod(bench_infer_many.read_image(f).shape[:2])
                   for f in (shared_data / "dsb2018" / "stage1_train").glob("*/images/*.png"))
    assert source == "dsb2018" and sizes == every[:5]


def test_many_images_without_the_samples_are_synthetic_nuclei(tmp_path):
    source, images = bench_infer_many.dsb_images(3, root=tmp_path)
    assert source == "synthetic nuclei" and [i.shape for i in images] == [(256, 256, 1), (256, 320, 1), (256, 256, 1)]
