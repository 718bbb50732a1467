"""Tests for shardgen.weights: the paper's defaults, the shared rest, subsets, overrides."""

import pytest
import yaml

from shardgen.weights import PAPER_WEIGHTS, read_overrides, sampling_weights, write_weights


def test_paper_defaults_when_every_listed_group_is_present():
    counts = {"cyto2": 796, "nuclei": 1025, "tissuenet": 2601, "livecell": 3188, "yeaz": 245, "deepbacs": 155,
              "omnipose/bact_phase": 200, "omnipose/bact_fluor": 192, "pannuke": 6053, "conic": 3863}
    weights = sampling_weights(counts)
    assert sum(weights.values()) == pytest.approx(1.0)
    # The listed groups keep the paper's numbers (they sum to 0.99, so renormalising is a no-op).
    for group, weight in PAPER_WEIGHTS.items():
        assert weights[group] == pytest.approx(weight)
    # The rest (0.01) is shared by image count.
    assert weights["pannuke"] == pytest.approx(0.01 * 6053 / (6053 + 3863))
    assert weights["conic"] == pytest.approx(0.01 * 3863 / (6053 + 3863))


def test_renormalised_over_the_groups_present():
    weights = sampling_weights({"cyto2": 10, "nuclei": 10})
    assert weights == pytest.approx({"cyto2": 0.59 / 0.79, "nuclei": 0.20 / 0.79})
    assert sampling_weights({"synthetic": 5}) == {"synthetic": 1.0}
    assert sampling_weights({"cyto2": 0, "synthetic": 3}) == {"synthetic": 1.0}  # no train samples: left out


def test_dataset_weight_is_shared_by_its_subsets_without_their_own():
    weights = sampling_weights({"cyto2/cyto": 300, "cyto2/cyto2": 100, "nuclei": 50})
    assert weights["cyto2/cyto"] / weights["cyto2/cyto2"] == pytest.approx(3.0)
    assert weights["cyto2/cyto"] + weights["cyto2/cyto2"] == pytest.approx(0.59 / 0.79)
    # Omnipose's worm subset has no weight of its own and omnipose none either: it joins the rest.
    w = sampling_weights({"omnipose/bact_phase": 10, "omnipose/worm": 10, "cyto2": 10})
    assert w["omnipose/worm"] == pytest.approx(0.01 / (0.59 + 0.015 + 0.01))


def test_overrides(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("tissuenet: 0.5\nomnipose/worm: 0.1\n")
    overrides = read_overrides(path)
    assert overrides == {"tissuenet": 0.5, "omnipose/worm": 0.1}
    weights = sampling_weights({"tissuenet": 1, "cyto2": 1, "omnipose/worm": 1}, overrides)
    assert weights == pytest.approx({"tissuenet": 0.5 / 1.19, "cyto2": 0.59 / 1.19, "omnipose/worm": 0.1 / 1.19})


@pytest.mark.parametrize("text, message", [("- 1\n- 2\n", "mapping"), ("cyto2: -1\n", "non-negative"),
                                           ("cyto2: high\n", "non-negative")])
def test_bad_override_files_name_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        read_overrides(path)
    assert "bad.yaml" in str(error.value)
    with pytest.raises(FileNotFoundError):
        read_overrides(tmp_path / "missing.yaml")


def test_written_file_round_trips_as_an_override(tmp_path):
    rows = [dict(dataset="cyto2", subset="", split="train")] * 3 + [dict(dataset="nuclei", subset="", split="train"),
                                                                   dict(dataset="nuclei", subset="", split="test")]
    weights = write_weights(tmp_path, rows)
    data = yaml.safe_load((tmp_path / "weights.yaml").read_text())
    assert data["train_samples"] == {"cyto2": 3, "nuclei": 1}
    assert data["weights"] == pytest.approx(weights, abs=1e-6)  # written rounded to 6 places
    # A written weights.yaml can be edited and passed back with --weights.
    assert read_overrides(tmp_path / "weights.yaml") == pytest.approx(weights, abs=1e-6)
