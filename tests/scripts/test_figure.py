"""scripts/figure.py: panels land in the figure unchanged (at scale 1) and the curves are drawn."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from figure import CAPTION, COLOURS, MARGIN, PANEL, _log_ticks, render_figure  # noqa: E402


def test_panels_are_copied_and_curves_drawn():
    rng = np.random.default_rng(0)
    panel = rng.integers(0, 256, (PANEL, 100, 3), dtype=np.uint8)
    curves = {"train loss": [(s, 3.0 / (1 + s)) for s in range(0, 200, 10)], "validation loss": [(0, 3.0), (100, 0.5)]}
    figure = render_figure([("a", panel), ("b", panel[:, ::-1])], curves, "title")
    assert figure.shape == (CAPTION + PANEL + CAPTION + MARGIN, MARGIN + 2 * (100 + MARGIN) + 420 + MARGIN, 3)
    np.testing.assert_array_equal(figure[CAPTION: CAPTION + PANEL, MARGIN: MARGIN + 100], panel)
    np.testing.assert_array_equal(figure[CAPTION: CAPTION + PANEL, 2 * MARGIN + 100: 2 * MARGIN + 200], panel[:, ::-1])
    plot = figure[:, MARGIN + 2 * (100 + MARGIN):]
    for colour in COLOURS[:2]:
        assert (plot == colour).all(axis=2).sum() > 20, colour


def test_empty_curves_and_log_ticks():
    figure = render_figure([("a", np.zeros((10, 10, 3), np.uint8))], {}, "nothing logged")
    assert figure.dtype == np.uint8
    assert _log_ticks(0.3, 40.0) == [0.5, 1, 2, 5, 10, 20]
    assert _log_ticks(1.53, 3.86) == [2, 3]
    assert _log_ticks(0.111, 0.119) == [0.111, 0.119]
