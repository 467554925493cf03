"""A loss-curve PNG drawn with PIL alone: raw loss in light grey, its EMA in blue, labelled axes.

No matplotlib: the pack stays light, and a flat loss (every value equal) draws a flat line in the
middle instead of dividing by zero.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_FONT = Path(__file__).resolve().parent / "assets" / "fonts" / "DejaVuSans.ttf"

BACKGROUND = (255, 255, 255)
RAW_COLOUR = (200, 200, 200)
EMA_COLOUR = (31, 119, 180)
AXIS_COLOUR = (60, 60, 60)
GRID_COLOUR = (235, 235, 235)


def ema(values: Sequence[float], smoothing: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing).

    Args:
        values: the raw series; non-finite values are skipped (they keep the previous average).
        smoothing: 0 = no smoothing, close to 1 = very smooth.

    Returns:
        One smoothed value per input value.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1) (got {smoothing})")
    out: list[float] = []
    avg = 0.0
    weight = 0.0
    for v in values:
        if math.isfinite(v):
            avg = smoothing * avg + (1 - smoothing) * v
            weight = smoothing * weight + (1 - smoothing)
        out.append(avg / weight if weight > 0 else float("nan"))
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.truetype(str(_FONT), size)
    except OSError:
        return ImageFont.load_default()


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.2e}"
    return f"{v:.3g}"


def loss_curve_image(
    steps: Sequence[int],
    losses: Sequence[float],
    *,
    width: int = 800,
    height: int = 400,
    smoothing: float = 0.9,
    title: str = "loss",
) -> Image.Image:
    """Draw the loss curve.

    Args:
        steps: x values (optimizer steps), ascending.
        losses: y values, one per step; NaN/inf points are left out.
        width, height: image size in pixels.
        smoothing: EMA factor of the blue line (0 draws the raw loss only).
        title: drawn top left.

    Returns:
        An RGB image (an empty chart saying "no data" when nothing is finite).
    """
    if len(steps) != len(losses):
        raise ValueError(f"steps and losses differ in length ({len(steps)} vs {len(losses)})")
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font(12)
    left, right, top, bottom = 64, 16, 28, 36
    pw, ph = width - left - right, height - top - bottom
    draw.text((left, 6), title, fill=AXIS_COLOUR, font=font)
    points = [(s, v) for s, v in zip(steps, losses, strict=True) if math.isfinite(v)]
    draw.rectangle([left, top, left + pw, top + ph], outline=AXIS_COLOUR)
    if not points:
        draw.text((left + pw // 2 - 20, top + ph // 2), "no data", fill=AXIS_COLOUR, font=font)
        return img
    xs = [s for s, _ in points]
    ys = [v for _, v in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    # A flat series (or a single point) gets a band around its value instead of a zero range.
    if y1 - y0 <= 1e-12 * max(1.0, abs(y1)):
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1

    def to_px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * pw, top + (1 - (y - y0) / (y1 - y0)) * ph

    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        _, py = to_px(x0, yv)
        draw.line([left + 1, py, left + pw - 1, py], fill=GRID_COLOUR)
        draw.text((4, py - 7), _fmt(yv), fill=AXIS_COLOUR, font=font)
    for i in range(5):
        xv = x0 + (x1 - x0) * i / 4
        px, _ = to_px(xv, y0)
        draw.text((px - 10, top + ph + 6), str(round(xv)), fill=AXIS_COLOUR, font=font)
    draw.text((left + pw // 2 - 12, height - 16), "step", fill=AXIS_COLOUR, font=font)

    raw = [to_px(x, y) for x, y in points]
    if len(raw) == 1:
        px, py = raw[0]
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=EMA_COLOUR)
        return img
    draw.line(raw, fill=RAW_COLOUR, width=1)
    if smoothing > 0:
        smooth = ema(ys, smoothing)
        draw.line([to_px(x, y) for x, y in zip(xs, smooth, strict=True)], fill=EMA_COLOUR, width=2)
    return img


def save_loss_curve(
    path: str | os.PathLike,
    steps: Sequence[int],
    losses: Sequence[float],
    *,
    width: int = 800,
    height: int = 400,
    smoothing: float = 0.9,
    title: str = "loss",
) -> Path:
    """Draw the loss curve (see :func:`loss_curve_image`) and write it as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    loss_curve_image(steps, losses, width=width, height=height, smoothing=smoothing, title=title).save(
        path, format="PNG"
    )
    return path


def plot_metrics(metrics_rows: Sequence[dict], path: str | os.PathLike, **kwargs) -> Path:
    """The loss curve of a run's ``metrics.jsonl`` rows (``{"step", "loss", ...}``)."""
    rows = [r for r in metrics_rows if "step" in r and "loss" in r]
    return save_loss_curve(path, [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], **kwargs)
