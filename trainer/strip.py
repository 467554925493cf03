"""Labeled strips and grids: renders side by side, a label over each, row labels on the left.

Layout and drawing are separate: :func:`compute_layout` says where every tile and every line of
text goes (tests assert on it), :func:`draw_layout` paints it, :func:`labeled_strip` does both.
Text is wrapped on spaces and then shrunk until it fits its box, so a label never spills over a
neighbouring tile; the font is the DejaVu Sans shipped in ``trainer/assets/fonts`` (never a
system font, so a strip looks the same on every machine).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageColor, ImageDraw, ImageFont

FONT_PATH = Path(__file__).resolve().parent / "assets" / "fonts" / "DejaVuSans.ttf"
MIN_FONT_SIZE = 6
#: Lines an automatic label band makes room for; longer labels shrink instead.
AUTO_MAX_LINES = 3
_TEXT_MARGIN = 2  # pixels kept free between text and the edge of its box

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive, as PIL crops)


class _Fonts:
    """DejaVu Sans at the sizes one layout needs, loaded once each."""

    def __init__(self, path: Path = FONT_PATH):
        if not path.is_file():
            raise FileNotFoundError(
                f"the strip font {str(path)!r} is missing; reinstall the pack (trainer/assets/fonts)"
            )
        self.path = path
        self._by_size: dict[int, ImageFont.FreeTypeFont] = {}

    def get(self, size: int) -> ImageFont.FreeTypeFont:
        if size not in self._by_size:
            self._by_size[size] = ImageFont.truetype(str(self.path), size)
        return self._by_size[size]

    def line_height(self, size: int) -> int:
        ascent, descent = self.get(size).getmetrics()
        return ascent + descent

    def width(self, text: str, size: int) -> int:
        """The wider of the advance width and the ink box, so italics-like overhangs count."""
        font = self.get(size)
        left, _, right, _ = font.getbbox(text)
        return max(math.ceil(font.getlength(text)), right - min(left, 0))


@dataclass(frozen=True)
class TextBox:
    """A piece of text fitted into a box.

    Attributes:
        text: the original text.
        box: where it may draw.
        lines: the text wrapped to the box width.
        font_size: the size that made it fit.
        line_widths: the measured width of each line (each is at most the box width less margins).
    """

    text: str
    box: Box
    lines: tuple[str, ...]
    font_size: int
    line_widths: tuple[int, ...]


@dataclass(frozen=True)
class TileLayout:
    """One tile: its cell, where the image goes inside it (letterboxed), and its label above."""

    index: int
    row: int
    column: int
    cell: Box
    image_box: Box
    label: TextBox | None


@dataclass(frozen=True)
class LayoutInfo:
    """Everything :func:`draw_layout` needs, and what tests assert positions on."""

    size: tuple[int, int]
    cell_size: tuple[int, int]
    rows: int
    columns: int
    tiles: tuple[TileLayout, ...]
    column_labels: tuple[TextBox, ...] = field(default=())
    row_labels: tuple[TextBox, ...] = field(default=())
    title: TextBox | None = None


def _wrap(text: str, fonts: _Fonts, size: int, max_w: int, *, break_words: bool) -> list[str]:
    """Greedy wrap on spaces; with ``break_words`` a word wider than ``max_w`` is cut into pieces."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        current = ""
        for word in paragraph.split():
            candidate = f"{current} {word}" if current else word
            if fonts.width(candidate, size) <= max_w:
                current = candidate
                continue
            if current:
                lines.append(current)
                current = ""
            if break_words and fonts.width(word, size) > max_w:
                piece = ""
                for ch in word:
                    if piece and fonts.width(piece + ch, size) > max_w:
                        lines.append(piece)
                        piece = ""
                    piece += ch
                current = piece
            else:
                current = word
        lines.append(current)
    return lines


def fit_text(text: str, box: Box, *, font_size: int, fonts: _Fonts | None = None) -> TextBox:
    """Wrap ``text`` on spaces and shrink it from ``font_size`` until it fits inside ``box``.

    Args:
        text: the label; newlines force line breaks.
        box: the area it may use.
        font_size: the size to try first.
        fonts: a font cache to reuse (one is made when None).

    Returns:
        A :class:`TextBox` whose lines all fit the box width. At the smallest size, words are
        broken between letters and lines that still do not fit the height are dropped, the last
        kept line ending in an ellipsis, so text never leaves its box.
    """
    fonts = fonts or _Fonts()
    max_w = max(1, box[2] - box[0] - 2 * _TEXT_MARGIN)
    max_h = max(1, box[3] - box[1])
    for size in range(max(font_size, MIN_FONT_SIZE), MIN_FONT_SIZE - 1, -1):
        lines = _wrap(text, fonts, size, max_w, break_words=False)
        widths = [fonts.width(line, size) for line in lines]
        if max(widths) <= max_w and len(lines) * fonts.line_height(size) <= max_h:
            return TextBox(text, box, tuple(lines), size, tuple(widths))
    size = MIN_FONT_SIZE
    lines = _wrap(text, fonts, size, max_w, break_words=True)
    fit = max(1, max_h // fonts.line_height(size))
    if len(lines) > fit:
        lines = lines[:fit]
        last = lines[-1]
        while last and fonts.width(last + "…", size) > max_w:
            last = last[:-1]
        lines[-1] = last + "…" if fonts.width(last + "…", size) <= max_w else last
    # A single glyph wider than the box (a 4-pixel tile) is left out rather than drawn outside.
    lines = [line if fonts.width(line, size) <= max_w else "" for line in lines]
    return TextBox(text, box, tuple(lines), size, tuple(fonts.width(line, size) for line in lines))


def _auto_band_height(texts: Sequence[str], fonts: _Fonts, size: int, width: int) -> int:
    """Room for the most lines any of ``texts`` needs at ``size`` (at most AUTO_MAX_LINES)."""
    if not any(t.strip() for t in texts):
        return 0
    max_w = max(1, width - 2 * _TEXT_MARGIN)
    lines = max(len(_wrap(t, fonts, size, max_w, break_words=False)) for t in texts)
    return min(lines, AUTO_MAX_LINES) * fonts.line_height(size) + 2 * _TEXT_MARGIN


def _grid_shape(n: int, *, columns: int, rows_wanted: int) -> tuple[int, int]:
    if rows_wanted:
        cols = columns or math.ceil(n / rows_wanted)
        if cols * rows_wanted < n:
            raise ValueError(
                f"{n} images do not fit {rows_wanted} rows of {cols} columns; give one row label per "
                f"row and columns = images / rows (or 0 to compute it)"
            )
        return rows_wanted, cols
    cols = min(columns, n) if columns > 0 else n
    return math.ceil(n / cols), cols


def compute_layout(
    sizes: Sequence[tuple[int, int]],
    labels: Sequence[str],
    *,
    row_labels: Sequence[str] | None = None,
    columns: int = 0,
    label_height: int = 0,
    font_size: int = 0,
    title: str = "",
    padding: int = 8,
) -> LayoutInfo:
    """Where every tile, label, row label and the title go; see :func:`labeled_strip` for the args.

    Args:
        sizes: (width, height) of each image, in tile order (row by row).

    Returns:
        A :class:`LayoutInfo`. Tiles are row-major; cells are the size of the largest image.

    Raises:
        ValueError: no images, a label count that matches neither the images nor the columns,
            a negative size, or more images than rows × columns.
    """
    n = len(sizes)
    if n == 0:
        raise ValueError("no images to lay out; the strip needs at least one image")
    if columns < 0 or label_height < 0 or font_size < 0 or padding < 0:
        raise ValueError(
            f"columns ({columns}), label_height ({label_height}), font_size ({font_size}) and padding "
            f"({padding}) must be 0 or more"
        )
    row_labels = list(row_labels or [])
    rows, cols = _grid_shape(n, columns=columns, rows_wanted=len(row_labels))
    labels = list(labels)
    # One label per column in a multi-row grid means a header above the first row only.
    header = rows > 1 and len(labels) == cols and len(labels) != n
    if labels and len(labels) != n and not header:
        raise ValueError(
            f"got {len(labels)} labels for {n} images; give one label per image"
            + (f" or one per column ({cols})" if rows > 1 else "")
        )
    cell_w = max(w for w, _ in sizes)
    cell_h = max(h for _, h in sizes)
    fonts = _Fonts()
    size = font_size or max(10, round(cell_w * 0.04))

    if label_height:
        band_h = label_height
    else:
        band_h = _auto_band_height(labels, fonts, size, cell_w)
    row_band_w = 0
    if row_labels:
        row_band_w = max(cell_w // 3, 6 * size)
    title_box_h = 0
    title_size = round(size * 1.4)
    inner_w = row_band_w + (padding if row_band_w else 0) + cols * cell_w + (cols - 1) * padding
    if title:
        lines = len(_wrap(title, fonts, title_size, max(1, inner_w - 2 * _TEXT_MARGIN), break_words=False))
        title_box_h = min(lines, 2) * fonts.line_height(title_size) + 2 * _TEXT_MARGIN

    width = padding + inner_w + padding
    x_cells = padding + row_band_w + (padding if row_band_w else 0)
    y = padding
    title_tb = None
    if title:
        title_tb = fit_text(
            title, (padding, y, padding + inner_w, y + title_box_h), font_size=title_size, fonts=fonts
        )
        y += title_box_h + padding

    tiles: list[TileLayout] = []
    column_tbs: list[TextBox] = []
    row_tbs: list[TextBox] = []
    for r in range(rows):
        has_band = band_h > 0 and (not header or r == 0)
        cell_y = y + (band_h if has_band else 0)
        if row_labels:
            row_tbs.append(
                fit_text(
                    row_labels[r],
                    (padding, cell_y, padding + row_band_w, cell_y + cell_h),
                    font_size=size,
                    fonts=fonts,
                )
            )
        for c in range(cols):
            i = r * cols + c
            x = x_cells + c * (cell_w + padding)
            band_box = (x, y, x + cell_w, y + band_h)
            if header and r == 0:
                column_tbs.append(fit_text(labels[c], band_box, font_size=size, fonts=fonts))
            if i >= n:
                continue
            w, h = sizes[i]
            if w <= 0 or h <= 0:
                raise ValueError(f"image {i} has size {w}x{h}; every image needs a positive width and height")
            ix, iy = x + (cell_w - w) // 2, cell_y + (cell_h - h) // 2
            label = None
            if has_band and not header and labels:
                label = fit_text(labels[i], band_box, font_size=size, fonts=fonts)
            tiles.append(
                TileLayout(i, r, c, (x, cell_y, x + cell_w, cell_y + cell_h), (ix, iy, ix + w, iy + h), label)
            )
        y = cell_y + cell_h + padding
    return LayoutInfo(
        size=(width, y),
        cell_size=(cell_w, cell_h),
        rows=rows,
        columns=cols,
        tiles=tuple(tiles),
        column_labels=tuple(column_tbs),
        row_labels=tuple(row_tbs),
        title=title_tb,
    )


def _colour(value: str, name: str) -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(value)[:3]
    except ValueError:
        raise ValueError(
            f"{name} {value!r} is not a colour; use '#rrggbb' like '#1e1e1e' or a name like 'white'"
        ) from None


def _draw_text(
    canvas: Image.Image, tb: TextBox, fonts: _Fonts, fill: tuple[int, int, int], bg: tuple[int, int, int]
) -> None:
    """Draw centred lines into a scratch image of the box and paste it: nothing lands outside."""
    x0, y0, x1, y1 = tb.box
    if x1 <= x0 or y1 <= y0 or not any(tb.lines):
        return
    scratch = Image.new("RGB", (x1 - x0, y1 - y0), bg)
    draw = ImageDraw.Draw(scratch)
    font = fonts.get(tb.font_size)
    line_h = fonts.line_height(tb.font_size)
    top = (scratch.height - line_h * len(tb.lines)) // 2
    for k, line in enumerate(tb.lines):
        draw.text((scratch.width / 2, top + k * line_h), line, font=font, fill=fill, anchor="ma")
    canvas.paste(scratch, (x0, y0))


def draw_layout(
    layout: LayoutInfo,
    images: Sequence[Image.Image],
    *,
    background: str = "#1e1e1e",
    text_color: str = "#ffffff",
) -> Image.Image:
    """Paint ``images`` and the layout's text onto a new RGB canvas."""
    bg = _colour(background, "background")
    fg = _colour(text_color, "text_color")
    canvas = Image.new("RGB", layout.size, bg)
    fonts = _Fonts()
    for tile in layout.tiles:
        img = images[tile.index]
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            flat = Image.new("RGB", img.size, bg)
            flat.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
            img = flat
        canvas.paste(img.convert("RGB"), tile.image_box[:2])
        if tile.label is not None:
            _draw_text(canvas, tile.label, fonts, fg, bg)
    for tb in (*layout.column_labels, *layout.row_labels, *([layout.title] if layout.title else [])):
        _draw_text(canvas, tb, fonts, fg, bg)
    return canvas


def labeled_strip(
    images: Sequence[Image.Image],
    labels: Sequence[str],
    *,
    row_labels: Sequence[str] | None = None,
    columns: int = 0,
    label_height: int = 0,
    font_size: int = 0,
    background: str = "#1e1e1e",
    text_color: str = "#ffffff",
    title: str = "",
    padding: int = 8,
) -> Image.Image:
    """Lay images side by side with a label over each: a strip, or a grid with row labels.

    Args:
        images: the renders, row by row.
        labels: one per image, or one per column of a multi-row grid (drawn once, on top), or
            empty for no labels.
        row_labels: one per row, drawn in a band on the left; their count sets the number of rows.
        columns: tiles per row (0 = all in one row, or images / rows with row labels).
        label_height: height of each label band in pixels (0 = room for the longest label, up to
            three lines).
        font_size: label size in pixels (0 = 4 % of the tile width, at least 10). Labels that do
            not fit are wrapped on spaces, then shrunk.
        background: colour behind everything, also the letterbox around smaller images.
        text_color: colour of all text.
        title: optional line(s) across the top.
        padding: pixels around and between tiles.

    Returns:
        An RGB image.
    """
    layout = compute_layout(
        [im.size for im in images],
        labels,
        row_labels=row_labels,
        columns=columns,
        label_height=label_height,
        font_size=font_size,
        title=title,
        padding=padding,
    )
    return draw_layout(layout, images, background=background, text_color=text_color)
