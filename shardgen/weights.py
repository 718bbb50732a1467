"""Per-dataset sampling weights, written beside the manifest as ``weights.yaml``.

The trainer draws each training sample from a group (a dataset, or a dataset's subset) with
these probabilities. Defaults follow the paper's table (../shared/paper.md 1a, a secondary
source): cyto2 0.59, nuclei 0.20, TissueNet 0.08, LIVECell 0.05, YeaZ 0.02, DeepBacs 0.02, and
Omnipose's bact_phase and bact_fluor subsets 0.015 each (the paper says "1-2% each"). Those sum
to 0.99; every other group with training samples (the other 12 public datasets, Omnipose's worm
subsets, and user or synthetic data) shares the remaining 0.01 in proportion to its number of
training samples, as the paper's table leaves them no explicit share. A dataset-level weight is
split among the dataset's subsets that have no weight of their own, in proportion to their
samples. Finally the weights are renormalised over the groups actually present, so converting
only some datasets still gives probabilities that sum to 1.

Override any of it with a YAML file (``--weights FILE``) mapping ``dataset`` or
``dataset/subset`` to a non-negative number, e.g. ``{tissuenet: 0.2, "omnipose/worm": 0.01}``.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import yaml

from pipeline.shards import TRAIN_SPLITS, WEIGHTS_FILE, group_key

PAPER_WEIGHTS = {
    "cyto2": 0.59,
    "nuclei": 0.20,
    "tissuenet": 0.08,
    "livecell": 0.05,
    "yeaz": 0.02,
    "deepbacs": 0.02,
    "omnipose/bact_phase": 0.015,
    "omnipose/bact_fluor": 0.015,
}
def read_overrides(path: str | Path | None) -> dict[str, float]:
    """Weights from a YAML mapping; ValueError naming the file and entry when malformed."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if isinstance(data, dict) and isinstance(data.get("weights"), dict):
        data = data["weights"]  # a weights.yaml written by shardgen can be edited and passed back
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of dataset (or dataset/subset) to weight; got {type(data).__name__}")
    overrides = {}
    for key, value in data.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{path}: weight of {key!r} must be a non-negative number; got {value!r}")
        overrides[str(key)] = float(value)
    return overrides


def sampling_weights(train_counts: dict[str, int], overrides: dict[str, float] | None = None) -> dict[str, float]:
    """Normalised weight per group key, for the groups in ``train_counts`` (group -> samples)."""
    table = dict(PAPER_WEIGHTS)
    table.update(overrides or {})
    rest = max(0.0, 1.0 - sum(PAPER_WEIGHTS.values()))
    groups = {g: n for g, n in train_counts.items() if n > 0}

    raw = {}
    pooled = {}
    for group, n in groups.items():
        dataset = group.split("/")[0]
        if group in table:
            raw[group] = table[group]
        elif dataset in table:
            # Share the dataset's weight among its subsets that have none of their own.
            siblings = [g for g in groups if g.split("/")[0] == dataset and g not in table]
            raw[group] = table[dataset] * n / sum(groups[g] for g in siblings)
        else:
            pooled[group] = n
    pooled_total = sum(pooled.values())
    for group, n in pooled.items():
        raw[group] = rest * n / pooled_total
    total = sum(raw.values())
    if total == 0:
        return {g: 0.0 for g in raw}
    return {g: raw[g] / total for g in sorted(raw)}


def write_weights(out: Path, manifest_rows: list[dict], weights_file: str | Path | None = None) -> dict[str, float]:
    """Compute the weights for the samples in ``manifest_rows`` and write ``out/weights.yaml``."""
    counts = Counter(
        group_key(r["dataset"], r["subset"]) for r in manifest_rows if r["split"] in TRAIN_SPLITS
    )
    weights = sampling_weights(dict(counts), read_overrides(weights_file))
    header = (
        "# Sampling weight per dataset (or dataset/subset) for training, normalised over the groups\n"
        "# present. Written by shardgen; see shardgen/weights.py for the defaults and how to override.\n"
    )
    body = yaml.safe_dump(
        {"weights": {g: round(w, 6) for g, w in weights.items()},
         "train_samples": {g: int(counts[g]) for g in sorted(counts)}},
        sort_keys=True,
    )
    tmp = out / (WEIGHTS_FILE + ".tmp")
    tmp.write_text(header + body)
    os.replace(tmp, out / WEIGHTS_FILE)
    return weights
