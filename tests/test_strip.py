"""Labeled strips and grids, asserted on layout boxes and on pixels."""

from __future__ import annotations

import pytest
from PIL import Image, ImageChops

from trainer.strip import FONT_PATH, compute_layout, draw_layout, fit_text, labeled_strip

BG = (30, 30, 30)  # "#1e1e1e"
COLOURS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


def _tiles(n, size=(64, 64)):
    return [Image.new("RGB", size, COLOURS[i % len(COLOURS)]) for i in range(n)]


def _centre(box):
    return ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)


def _ink_bbox(img, box):
    """Bounding box (relative to ``box``) of the non-background pixels inside ``box``, or None."""
    crop = img.crop(box)
    return ImageChops.difference(crop, Image.new("RGB", crop.size, BG)).getbbox()


def _ink_outside(img, allowed):
    """Non-background pixels outside every box in ``allowed`` (should be none)."""
    mask = (
        ImageChops.difference(img, Image.new("RGB", img.size, BG))
        .convert("L")
        .point(lambda v: 255 if v else 0)
    )
    for box in allowed:
        mask.paste(0, box)
    return mask.getbbox()


def test_font_ships_with_the_pack():
    assert FONT_PATH.name == "DejaVuSans.ttf" and FONT_PATH.is_file()
    assert (FONT_PATH.parent / "LICENSE-DejaVu.txt").is_file()


def test_strip_tiles_in_order_with_labels_over_them():
    labels = ["base", "step 800", "step 1600"]
    layout = compute_layout([(64, 64)] * 3, labels, padding=8)
    assert (layout.rows, layout.columns, layout.cell_size) == (1, 3, (64, 64))
    assert layout.size[0] == 8 + 3 * 64 + 2 * 8 + 8
    img = draw_layout(layout, _tiles(3))
    assert img.size == layout.size and img.mode == "RGB"
    xs = []
    for tile, colour in zip(layout.tiles, COLOURS, strict=False):
        assert img.getpixel(_centre(tile.image_box)) == colour
        label = tile.label
        # the label's band spans exactly the tile's column and sits right above it
        assert (label.box[0], label.box[2], label.box[3]) == (tile.cell[0], tile.cell[2], tile.cell[1])
        ink = _ink_bbox(img, label.box)
        assert ink is not None, f"label {label.text!r} drew nothing"
        ink_centre = (ink[0] + ink[2]) / 2
        assert abs(ink_centre - 32) <= 3  # centred over the 64-px tile
        xs.append(tile.image_box[0])
    assert xs == sorted(xs)
    assert [t.label.lines for t in layout.tiles] == [("base",), ("step 800",), ("step 1600",)]
    assert (
        _ink_outside(img, [t.image_box for t in layout.tiles] + [t.label.box for t in layout.tiles]) is None
    )


def test_unequal_sizes_are_letterboxed_in_equal_cells():
    images = [Image.new("RGB", (64, 48), COLOURS[0]), Image.new("RGB", (32, 64), COLOURS[1])]
    layout = compute_layout([im.size for im in images], ["wide", "tall"], padding=4)
    assert layout.cell_size == (64, 64)
    wide, tall = layout.tiles
    assert wide.image_box == (wide.cell[0], wide.cell[1] + 8, wide.cell[0] + 64, wide.cell[1] + 56)
    assert tall.image_box == (tall.cell[0] + 16, tall.cell[1], tall.cell[0] + 48, tall.cell[1] + 64)
    img = draw_layout(layout, images)
    # the bars around each smaller image are background, the image itself is intact
    assert img.getpixel((wide.cell[0] + 32, wide.cell[1] + 3)) == BG
    assert img.getpixel((wide.cell[0] + 32, wide.cell[3] - 3)) == BG
    assert img.getpixel((tall.cell[0] + 5, tall.cell[1] + 32)) == BG
    assert img.getpixel((tall.cell[2] - 5, tall.cell[1] + 32)) == BG
    assert img.getpixel(_centre(wide.image_box)) == COLOURS[0]
    assert img.getpixel(_centre(tall.image_box)) == COLOURS[1]
    assert _ink_bbox(img, wide.image_box) == (0, 0, 64, 48)


def test_twelve_long_labels_never_overflow_their_tiles():
    labels = [
        f"step {800 * (i + 1)} trigger-word-{'x' * i} a very long descriptive label number {i}"
        for i in range(12)
    ]
    layout = compute_layout([(64, 64)] * 12, labels, padding=2)
    img = draw_layout(layout, _tiles(12))
    for tile in layout.tiles:
        tb = tile.label
        box_w = tb.box[2] - tb.box[0]
        assert tb.box[0] == tile.cell[0] and tb.box[2] == tile.cell[2]
        assert max(tb.line_widths) <= box_w - 4, (tb.text, tb.lines, tb.line_widths)
        ink = _ink_bbox(img, tb.box)
        assert ink is not None
        # not clipped: a background column is left at both edges of the band
        assert ink[0] >= 1 and ink[2] <= box_w - 1, (tb.text, ink)
        assert tb.font_size >= 6
    assert (
        _ink_outside(img, [t.image_box for t in layout.tiles] + [t.label.box for t in layout.tiles]) is None
    )


def test_grid_with_row_labels_and_column_headers_and_title():
    images = _tiles(6)
    layout = compute_layout(
        [im.size for im in images],
        ["base", "step 800", "step 1600"],
        row_labels=["a cat in a red hat sitting on a very long sofa", "a dog"],
        title="Sweep of my-lora",
        font_size=12,
    )
    assert (layout.rows, layout.columns) == (2, 3)
    assert len(layout.column_labels) == 3 and all(t.label is None for t in layout.tiles)
    img = draw_layout(layout, images)
    for tile in layout.tiles:
        assert (tile.row, tile.column) == divmod(tile.index, 3)
        assert img.getpixel(_centre(tile.image_box)) == COLOURS[tile.index]
    # the second row has no label band: its cells follow the first row after the padding
    assert layout.tiles[3].cell[1] == layout.tiles[0].cell[3] + 8
    long_row, short_row = layout.row_labels
    assert len(long_row.lines) > 1 and max(long_row.line_widths) <= long_row.box[2] - long_row.box[0] - 4
    assert long_row.box[1] == layout.tiles[0].cell[1] and long_row.box[2] < layout.tiles[0].cell[0]
    assert _ink_bbox(img, short_row.box) is not None
    assert layout.title is not None and layout.title.box[3] < layout.column_labels[0].box[1]
    assert _ink_bbox(img, layout.title.box) is not None
    allowed = [t.image_box for t in layout.tiles] + [
        tb.box for tb in (*layout.column_labels, *layout.row_labels, layout.title)
    ]
    assert _ink_outside(img, allowed) is None


def test_columns_wrap_into_rows_with_an_empty_last_cell():
    layout = compute_layout([(32, 32)] * 5, ["a", "b", "c", "d", "e"], columns=2)
    assert (layout.rows, layout.columns) == (3, 2)
    assert [(t.row, t.column) for t in layout.tiles] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert all(t.label is not None for t in layout.tiles)  # one label per image: a band on every row


def test_fixed_label_height_shrinks_text_to_fit():
    layout = compute_layout(
        [(64, 64)] * 2, ["step 800", "a b c d e f g h i j k l m n o p"], label_height=14, font_size=20
    )
    short, crowded = (t.label for t in layout.tiles)
    assert short.box[3] - short.box[1] == 14
    assert short.font_size < 20
    assert crowded.font_size == 6 and len(crowded.lines) == 1 and crowded.lines[0].endswith("…")


def test_fit_text_breaks_a_single_huge_word():
    tb = fit_text("Pneumonoultramicroscopicsilicovolcanoconiosis", (0, 0, 30, 60), font_size=12)
    assert tb.font_size == 6 and len(tb.lines) > 1
    assert "".join(tb.lines) == "Pneumonoultramicroscopicsilicovolcanoconiosis"
    assert max(tb.line_widths) <= 26


def test_transparent_images_are_flattened_on_the_background():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 8, 16))
    img = labeled_strip([rgba], [], padding=0, background="#102030")
    assert img.size == (16, 16)
    assert img.getpixel((4, 8)) == (0, 0, 255) and img.getpixel((12, 8)) == (16, 32, 48)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"images": [], "labels": []}, "at least one image"),
        ({"images": _tiles(3), "labels": ["a", "b"]}, "got 2 labels for 3 images"),
        (
            {"images": _tiles(3), "labels": ["a", "b", "c"], "row_labels": ["r"], "columns": 2},
            "do not fit 1 rows of 2 columns",
        ),
        ({"images": _tiles(1), "labels": ["a"], "background": "dark"}, "background 'dark' is not a colour"),
        ({"images": _tiles(1), "labels": ["a"], "columns": -1}, "must be 0 or more"),
    ],
)
def test_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        labeled_strip(kwargs.pop("images"), kwargs.pop("labels"), **kwargs)
