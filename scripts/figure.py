"""A results figure from arrays, drawn with Pillow only: a row of image panels and a curve panel.

    >>> panel = np.zeros((40, 50, 3), np.uint8)
    >>> figure = render_figure([("a", panel), ("b", panel)], {"train": [(1, 2.0), (5, 1.0)]}, "title")
    >>> figure.dtype, figure.shape[2]
    (dtype('uint8'), 3)

The demo and the learning check use it for "<out>/demo.png"; scripts/ is not a package the
stages import, so nothing here is part of the pipeline.
"""

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL = 256          # image panels are scaled to this height
CURVE = (420, 256)   # curve panel (width, height)
MARGIN = 12
CAPTION = 30
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _fit(panel: np.ndarray) -> Image.Image:
    image = Image.fromarray(np.ascontiguousarray(panel))
    width = max(1, round(image.width * PANEL / image.height))
    return image.resize((width, PANEL), Image.Resampling.NEAREST)


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    """Round tick values spanning [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _log_ticks(low: float, high: float) -> list[float]:
    """Round ticks spanning [low, high] (both > 0) for a log axis: 1-2-5 per decade, finer
    mantissas when the range is short, the two ends when even those miss it."""
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for mantissas in ((1, 2, 5), (1, 2, 3, 5), (1, 1.5, 2, 3, 4, 5, 6, 8)):
        inside = [round(m * 10**k, 12) for k in decades for m in mantissas if low <= m * 10**k <= high]
        if len(inside) >= 3:
            return inside
    return inside if len(inside) >= 2 else [low, high]


def _draw_curves(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], curves: dict, font) -> None:
    """Lines of (x, y) points in box = (left, top, right, bottom), log y axis, with a legend."""
    left, top, right, bottom = box
    plot = (left + 46, top + 4 + 16 * len(curves), right - 8, bottom - 40)  # legend above the plot
    points = [(x, y) for values in curves.values() for x, y in values if y > 0 and math.isfinite(y)]
    draw.rectangle(plot, outline=(0, 0, 0))
    if not points:
        draw.text((plot[0] + 10, plot[1] + 10), "no values logged", fill=(0, 0, 0), font=font)
        return
    xs = [x for x, _ in points]
    ys = [math.log10(y) for _, y in points]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(max(ys), min(ys) + 0.1)
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        u = plot[0] + (x - x0) / (x1 - x0) * (plot[2] - plot[0])
        v = plot[3] - (math.log10(y) - y0) / (y1 - y0) * (plot[3] - plot[1])
        return u, v

    for tick in _ticks(x0, x1):
        u, _ = to_pixel(tick, 10**y0)
        draw.line([(u, plot[3]), (u, plot[3] + 4)], fill=(0, 0, 0))
        draw.text((u, plot[3] + 6), f"{tick:g}", fill=(0, 0, 0), font=font, anchor="ma")
    for tick in _log_ticks(10**y0, 10**y1):
        _, v = to_pixel(x0, tick)
        draw.line([(plot[0] - 4, v), (plot[0], v)], fill=(0, 0, 0))
        draw.text((plot[0] - 6, v), f"{tick:.3g}", fill=(0, 0, 0), font=font, anchor="rm")
    draw.text(((plot[0] + plot[2]) / 2, bottom - 2), "step", fill=(0, 0, 0), font=font, anchor="md")
    for index, (name, values) in enumerate(curves.items()):
        colour = COLOURS[index % len(COLOURS)]
        line = [to_pixel(x, y) for x, y in values if y > 0 and math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for u, v in line if len(line) < 30 else []:
            draw.ellipse([u - 3, v - 3, u + 3, v + 3], fill=colour)
        draw.text((plot[2], top + 16 * index), name, fill=colour, font=font, anchor="ra")


def render_figure(panels: list[tuple[str, np.ndarray]], curves: dict[str, list[tuple[float, float]]],
                  title: str) -> np.ndarray:
    """(H, W, 3) uint8: ``panels`` ((caption, (h, w, 3) uint8) each) side by side, then a panel
    with ``curves`` (name -> [(step, value)], drawn on a log scale), and ``title`` above."""
    images = [(caption, _fit(panel)) for caption, panel in panels]
    font, title_font = _font(13), _font(16)
    title_width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=title_font)
    width = MARGIN + sum(image.width + MARGIN for _, image in images) + CURVE[0] + MARGIN
    width = max(width, math.ceil(title_width) + 2 * MARGIN)
    height = CAPTION + PANEL + CAPTION + MARGIN
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, 6), title, fill=(0, 0, 0), font=title_font)
    x = MARGIN
    for caption, image in images:
        canvas.paste(image, (x, CAPTION))
        draw.text((x + image.width / 2, CAPTION + PANEL + 6), caption, fill=(0, 0, 0), font=font, anchor="ma")
        x += image.width + MARGIN
    _draw_curves(draw, (x, CAPTION, x + CURVE[0], CAPTION + CURVE[1] + CAPTION), curves, font)
    return np.asarray(canvas)
