"""Opening training images: any common format and mode in, an upright 8-bit RGB image out.

Nothing is decoded before it is needed: :func:`probe_image` reads only a file's header (what
scanning and bucketing need), :func:`load_image` decodes one image when a sample is drawn.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from .errors import DatasetError, ProblemReason

log = logging.getLogger("finetune")

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})

# Pillow's own warning threshold (about 9459 x 9459). Far above any useful training image, and
# staying at or below it means Pillow never warns about an image we accept.
MAX_IMAGE_PIXELS = 89_478_485

_EXIF_ORIENTATION = 0x0112
# EXIF orientations 5-8 are rotated by 90 degrees: width and height swap when made upright.
_ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _open(path: Path, *, max_pixels: int) -> Image.Image:
    """Open ``path`` lazily (header only), refusing empty, unreadable and oversized files."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DatasetError(
            f"{path}: the image file cannot be opened ({e.strerror or e})",
            paths=[path],
            reason=ProblemReason.UNREADABLE_IMAGE,
        ) from None
    if size == 0:
        raise DatasetError(
            f"{path}: the file is empty (0 bytes); re-export or delete it",
            paths=[path],
            reason=ProblemReason.ZERO_BYTE,
        )
    try:
        img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Raised by Pillow when a host lowered Image.MAX_IMAGE_PIXELS below ours (or made its warning an error).
        raise DatasetError(
            f"{path}: refused as a possible decompression bomb ({e}); downscale the image",
            paths=[path],
            reason=ProblemReason.IMAGE_TOO_LARGE,
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(
            f"{path}: not a readable image ({e}); re-export it as PNG or JPEG, or delete it",
            paths=[path],
            reason=ProblemReason.UNREADABLE_IMAGE,
        ) from None
    pixels = img.width * img.height
    if pixels > max_pixels:
        img.close()
        raise DatasetError(
            f"{path}: {img.width}x{img.height} = {pixels:,} pixels is over the limit of {max_pixels:,} "
            "(a possible decompression bomb); downscale the image",
            paths=[path],
            reason=ProblemReason.IMAGE_TOO_LARGE,
        )
    return img


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag, read without decoding pixels (1 when absent)."""
    # A PNG's getexif() decodes the whole image when the eXIf chunk is not in the header;
    # an eXIf chunk after the pixel data is rare enough to ignore for a header read.
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, ValueError, SyntaxError):
        return 1


def probe_image(
    path: str | os.PathLike, *, max_pixels: int = MAX_IMAGE_PIXELS, verify: bool = False
) -> tuple[int, int]:
    """Read an image's upright size from its header, without decoding its pixels.

    Args:
        path: The image file.
        max_pixels: Refuse images with more pixels than this.
        verify: Also run Pillow's structural check (PNG checksums and the like).

    Returns:
        ``(width, height)`` after the EXIF orientation is applied.

    Raises:
        DatasetError: with ``reason`` set, naming the file, when it is empty, unreadable or too large.
    """
    path = Path(path)
    with _open(path, max_pixels=max_pixels) as img:
        width, height = img.size
        orientation = _orientation(img)
        fmt = img.format
        if verify:
            try:
                img.verify()
            except (OSError, SyntaxError, ValueError) as e:
                raise DatasetError(
                    f"{path}: the image is damaged ({e}); re-export it or delete it",
                    paths=[path],
                    reason=ProblemReason.UNREADABLE_IMAGE,
                ) from None
    if verify:
        _check_complete(path, fmt, max_pixels=max_pixels)
    if orientation in _ROTATED_ORIENTATIONS:
        return height, width
    return width, height


_JPEG_END = b"\xff\xd9"
_TAIL_BYTES = 4096


def _check_complete(path: Path, fmt: str | None, *, max_pixels: int) -> None:
    """Find an image cut short (an interrupted copy or download) without decoding good ones.

    The scan must stay fast on datasets of thousands of photos, and ``verify()`` only reads the
    structure of a PNG (chunk checksums, up to IEND), not of a JPEG or a BMP. A whole JPEG ends
    with its end-of-image marker, so JPEGs are checked by reading their last few bytes; only one
    that does not end with it (cut, or with trailing data some cameras append) is decoded to
    decide. Other formats that ``verify()`` does not cover (WebP, BMP; rare in datasets) are
    decoded. Checking the marker also holds when a host set Pillow's global LOAD_TRUNCATED_IMAGES
    (under which decoding a cut file pads it with grey instead of failing); the global itself is
    left alone, other threads of the host read it.

    Raises:
        DatasetError: (UNREADABLE_IMAGE) naming the file.
    """
    if fmt == "PNG":
        return
    if fmt in ("JPEG", "MPO"):
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - _TAIL_BYTES))
            tail = f.read().rstrip(b"\x00\r\n\t ")
        if tail.endswith(_JPEG_END):
            return
    try:
        with _open(path, max_pixels=max_pixels) as img:
            img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(
            f"{path}: the image could not be decoded ({e}); the file is probably cut short. "
            "Copy it again, re-export it, or delete it",
            paths=[path],
            reason=ProblemReason.UNREADABLE_IMAGE,
        ) from None


def _parse_colour(background: str) -> tuple[int, int, int]:
    try:
        r, g, b, *_ = ImageColor.getrgb(background)
    except ValueError:
        raise DatasetError(f"alpha background {background!r} is not a colour like '#ffffff'") from None
    return r, g, b


def _grey_to_8bit(img: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float greyscale image to 8 bits (Pillow would clip it)."""
    values = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        # Float images carry 0-1 by convention; wider ranges are read as 8- or 16-bit values.
        peak = float(np.nanmax(values)) if values.size else 0.0
        full_scale = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
    else:
        # I;16* and I hold 16-bit samples (how Pillow decodes 16-bit PNG and TIFF).
        full_scale = 65535.0
    scaled = np.clip(np.nan_to_num(values) / full_scale, 0.0, 1.0) * 255.0
    return Image.fromarray(np.round(scaled).astype(np.uint8))


def to_rgb(img: Image.Image, *, background: str = "#ffffff") -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Args:
        img: A decoded image in any mode.
        background: Colour that transparent pixels are composited onto.

    Returns:
        An RGB image of the same size.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return _grey_to_8bit(img).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*_parse_colour(background), 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(
    path: str | os.PathLike, *, background: str = "#ffffff", max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode one training image: upright (EXIF orientation applied), 8-bit RGB.

    Args:
        path: The image file.
        background: ``#rrggbb`` colour that transparent pixels are composited onto.
        max_pixels: Refuse images with more pixels than this (decompression bombs).

    Returns:
        An RGB ``PIL.Image.Image``, fully loaded (the file is closed).

    Raises:
        DatasetError: naming the file when it is empty, unreadable, damaged or too large.
    """
    path = Path(path)
    _parse_colour(background)  # a bad colour is a config error: say so before decoding anything
    with _open(path, max_pixels=max_pixels) as img:
        try:
            img.load()
            upright = ImageOps.exif_transpose(img)
            return to_rgb(upright, background=background)
        except (OSError, SyntaxError, ValueError) as e:
            raise DatasetError(
                f"{path}: the image could not be decoded ({e}); re-export it as PNG or JPEG, or delete it",
                paths=[path],
                reason=ProblemReason.UNREADABLE_IMAGE,
            ) from None
