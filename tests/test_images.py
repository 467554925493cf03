"""Image loading: EXIF orientation, every mode to 8-bit RGB, and refusing bad or oversized files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from trainer.data.errors import DatasetError, ProblemReason
from trainer.data.images import IMAGE_EXTENSIONS, is_image_file, load_image, probe_image, to_rgb

RED, BLUE = (255, 0, 0), (0, 0, 255)


def two_halves(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", (width, height), RED)
    img.paste(BLUE, (width // 2, 0, width, height))
    return img


def pixels(img: Image.Image) -> list:
    """Every pixel, row by row."""
    return [img.getpixel((x, y)) for y in range(img.height) for x in range(img.width)]


def with_orientation(img: Image.Image, orientation: int) -> Image.Exif:
    exif = img.getexif()
    exif[0x0112] = orientation
    return exif


def test_extensions_any_case():
    assert IMAGE_EXTENSIONS == {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
    assert is_image_file("a/B.PNG") and is_image_file("x.JpEg") and is_image_file("y.webp")
    assert not is_image_file("c.txt") and not is_image_file("d.gif")


def test_exif_orientation_6_is_rotated_upright(tmp_path):
    img = two_halves()
    path = tmp_path / "rotated.png"
    img.save(path, exif=with_orientation(img, 6))

    loaded = load_image(path)

    # Orientation 6 means "rotate 90 degrees clockwise to view": the left (red) half ends on top.
    assert loaded.size == (20, 40)
    assert loaded.getpixel((10, 5)) == RED
    assert loaded.getpixel((10, 35)) == BLUE
    assert probe_image(path) == (20, 40)


def test_exif_orientation_in_jpeg_header(tmp_path):
    img = two_halves(64, 32)
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=with_orientation(img, 8), quality=95)
    assert probe_image(path) == (32, 64)
    loaded = load_image(path)
    assert loaded.size == (32, 64)
    # Orientation 8 rotates counter-clockwise: the left (red) half ends at the bottom.
    r, g, b = loaded.getpixel((16, 56))
    assert r > 200 and g < 50 and b < 50


def test_rgba_is_composited_on_the_background(tmp_path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.putpixel((1, 1), (255, 0, 0, 255))
    img.putpixel((2, 2), (255, 0, 0, 128))
    path = tmp_path / "alpha.png"
    img.save(path)

    loaded = load_image(path, background="#123456")

    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (0x12, 0x34, 0x56)
    assert loaded.getpixel((1, 1)) == (255, 0, 0)
    # Half-transparent red over #123456: each channel is about the average of the two.
    assert loaded.getpixel((2, 2)) == pytest.approx((137, 26, 43), abs=1)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_la_and_palette_transparency(tmp_path):
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (100, 255))
    la.save(tmp_path / "la.png")
    assert pixels(load_image(tmp_path / "la.png", background="#00ff00")) == [(0, 255, 0), (100, 100, 100)]

    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    assert pixels(load_image(tmp_path / "pal.png", background="#ffffff")) == [(255, 255, 255), (200, 100, 50)]


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
    loaded = load_image(path)
    assert [p[0] for p in pixels(loaded)] == [0, 100, 128, 255]
    assert loaded.getpixel((3, 0)) == (255, 255, 255)


def test_32_bit_int_and_float_modes():
    as_int = Image.fromarray(np.array([[0, 65535, 70000]], dtype=np.int32))
    assert as_int.mode == "I"
    assert [p[0] for p in pixels(to_rgb(as_int))] == [0, 255, 255]
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [p[0] for p in pixels(to_rgb(as_float))] == [0, 128, 255]


def test_cmyk_and_greyscale_become_rgb(tmp_path):
    Image.new("CMYK", (2, 2), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    assert load_image(tmp_path / "cmyk.jpg").getpixel((0, 0)) == pytest.approx((255, 255, 255), abs=2)
    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_decompression_bomb_is_refused_with_the_pixel_count(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 30)).save(path)
    with pytest.raises(DatasetError) as info:
        load_image(path, max_pixels=500)
    assert str(info.value) == (
        f"{path}: 20x30 = 600 pixels is over the limit of 500 (a possible decompression bomb); downscale the image"
    )
    assert info.value.reason == ProblemReason.IMAGE_TOO_LARGE
    assert info.value.paths == [str(path)]


def test_pillows_own_bomb_error_is_translated(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # as a host might lower it
    with pytest.raises(
        DatasetError, match=r"big\.png: refused as a possible decompression bomb \(Image size \(600 pixels\)"
    ) as info:
        probe_image(path)
    assert info.value.reason == ProblemReason.IMAGE_TOO_LARGE


def test_bad_files_name_the_file_and_the_reason(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello", encoding="utf-8")
    Image.new("RGB", (32, 32), RED).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])

    cases = {
        "zero.png": ProblemReason.ZERO_BYTE,
        "text.png": ProblemReason.UNREADABLE_IMAGE,
        "cut.png": ProblemReason.UNREADABLE_IMAGE,
    }
    for name, reason in cases.items():
        with pytest.raises(DatasetError) as info:
            load_image(tmp_path / name)
        assert info.value.reason == reason
        assert str(info.value).startswith(f"{tmp_path / name}: ")
        with pytest.raises(DatasetError):
            probe_image(tmp_path / name, verify=True)
    assert str(pytest.raises(DatasetError, load_image, tmp_path / "zero.png").value).endswith(
        "is empty (0 bytes); re-export or delete it"
    )


def test_bad_background_colour_is_named():
    with pytest.raises(DatasetError, match="alpha background 'pink-ish' is not a colour like '#ffffff'"):
        to_rgb(Image.new("RGBA", (1, 1)), background="pink-ish")
