"""The loss-curve PNG: EMA smoothing, flat and empty series, pixel colours."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from trainer.plot import EMA_COLOUR, RAW_COLOUR, ema, loss_curve_image, plot_metrics, save_loss_curve


def test_ema_is_bias_corrected_and_skips_non_finite_values():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    out = ema([1.0, 3.0], 0.5)
    assert out == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])
    skipped = ema([1.0, float("nan"), 1.0], 0.9)
    assert skipped == pytest.approx([1.0, 1.0, 1.0])
    assert ema([], 0.9) == []
    assert math.isnan(ema([float("nan")], 0.9)[0])
    with pytest.raises(ValueError, match=r"smoothing must be in \[0, 1\)"):
        ema([1.0], 1.0)


def colours(img: Image.Image) -> set:
    return {c for _, c in img.getcolors(maxcolors=1 << 20)}


def test_curve_draws_raw_and_smoothed_lines():
    img = loss_curve_image(list(range(1, 51)), [1.0 / s for s in range(1, 51)], width=400, height=200)
    assert img.size == (400, 200)
    assert {RAW_COLOUR, EMA_COLOUR} <= colours(img)


def test_flat_loss_draws_a_line_in_the_middle():
    img = loss_curve_image([1, 2, 3, 4], [0.5] * 4, width=200, height=100, smoothing=0.0)
    column = [img.getpixel((130, y)) for y in range(100)]
    rows = [y for y, c in enumerate(column) if c == RAW_COLOUR]
    # The plot area spans y = 28 .. 64 (top margin 28, bottom margin 36): its middle is 46.
    assert rows and abs(sum(rows) / len(rows) - 46) <= 1


def test_empty_and_single_point_series(tmp_path):
    empty = loss_curve_image([], [])
    assert EMA_COLOUR not in colours(empty)
    single = loss_curve_image([5], [0.3])
    assert EMA_COLOUR in colours(single)
    with pytest.raises(ValueError, match="differ in length"):
        loss_curve_image([1, 2], [0.1])
    path = save_loss_curve(tmp_path / "sub" / "loss.png", [1, 2], [float("inf"), 0.2])
    assert Image.open(path).format == "PNG"


def test_plot_metrics_reads_rows(tmp_path):
    rows = [{"step": i, "loss": 1.0 / i, "lr": 1e-4} for i in range(1, 20)] + [{"step": 20}]
    path = plot_metrics(rows, tmp_path / "loss.png", width=300, height=150)
    assert Image.open(path).size == (300, 150)
