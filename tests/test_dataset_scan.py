"""Scanning folders: kohya repeats and concepts, captions, every named problem, and the bundled demo."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from trainer.config import CaptionPolicy, DatasetPart, DatasetSource, DatasetSpec, OnProblem
from trainer.data.errors import DatasetError
from trainer.data.scan import Item, ProblemReason, ScannedDataset, parse_kohya_folder, scan_dataset

DEMO = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "demo_dataset"

# (colour name, RGB, shape, background name, RGB) of every bundled demo image.
DEMO_SHAPES = [
    ("red", (220, 30, 30), "circle", "white", (255, 255, 255)),
    ("blue", (30, 60, 220), "square", "white", (255, 255, 255)),
    ("green", (30, 170, 60), "triangle", "white", (255, 255, 255)),
    ("yellow", (240, 210, 20), "star", "black", (0, 0, 0)),
    ("purple", (140, 40, 180), "diamond", "white", (255, 255, 255)),
    ("orange", (250, 140, 20), "circle", "black", (0, 0, 0)),
    ("cyan", (20, 200, 210), "triangle", "grey", (128, 128, 128)),
    ("magenta", (220, 30, 160), "hexagon", "grey", (128, 128, 128)),
]


def _shape_points(shape: str, size: int) -> list[tuple[float, float]]:
    c, r = size / 2, size * 0.34
    if shape == "triangle":
        return [
            (c + r * math.cos(math.radians(a)), c + r * math.sin(math.radians(a))) for a in (-90, 30, 150)
        ]
    if shape == "diamond":
        return [(c, c - r), (c + r, c), (c, c + r), (c - r, c)]
    if shape == "hexagon":
        return [
            (c + r * math.cos(math.radians(a)), c + r * math.sin(math.radians(a))) for a in range(0, 360, 60)
        ]
    if shape == "star":
        return [
            (
                c + (r if i % 2 == 0 else r * 0.45) * math.cos(math.radians(-90 + 36 * i)),
                c + (r if i % 2 == 0 else r * 0.45) * math.sin(math.radians(-90 + 36 * i)),
            )
            for i in range(10)
        ]
    raise ValueError(shape)


def make_demo_images(folder: Path, *, size: int = 64) -> None:
    """Write the demo dataset's images and captions into ``folder`` (how the bundled files were made)."""
    folder.mkdir(parents=True, exist_ok=True)
    for colour, rgb, shape, background, bg_rgb in DEMO_SHAPES:
        img = Image.new("RGB", (size, size), bg_rgb)
        draw = ImageDraw.Draw(img)
        box = (size * 0.16, size * 0.16, size * 0.84, size * 0.84)
        if shape == "circle":
            draw.ellipse(box, fill=rgb)
        elif shape == "square":
            draw.rectangle(box, fill=rgb)
        else:
            draw.polygon(_shape_points(shape, size), fill=rgb)
        stem = f"{colour}_{shape}"
        img.save(folder / f"{stem}.png", optimize=True)
        (folder / f"{stem}.txt").write_text(
            f"sks shape, {colour} {shape}, {background} background", encoding="utf-8"
        )


def write_png(
    path: Path, size: tuple[int, int] = (16, 16), colour: tuple[int, int, int] = (255, 0, 0)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_pair(folder: Path, stem: str, caption: str, *, size: tuple[int, int] = (16, 16)) -> Path:
    image = write_png(folder / f"{stem}.png", size)
    (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return image


def spec_for(
    *folders: Path, on_problem: OnProblem = OnProblem.STOP, repeat_factor: int = 1, **source
) -> DatasetSpec:
    return DatasetSpec(
        parts=[
            DatasetPart(
                source=DatasetSource(folder=str(f), on_problem=on_problem, **source),
                repeat_factor=repeat_factor,
            )
            for f in folders
        ]
    )


def test_parse_kohya_folder_names():
    assert parse_kohya_folder("10_k4s4 style") == (10, "k4s4 style")
    assert parse_kohya_folder("3_cat_dog") == (3, "cat_dog")
    assert parse_kohya_folder("cats") is None
    assert parse_kohya_folder("10_") is None
    assert parse_kohya_folder("x10_cat") is None


def test_kohya_folders_give_concepts_and_repeats(tmp_path):
    root = tmp_path / "data"
    write_pair(root / "10_k4s4 style", "b", "style b")
    write_pair(root / "10_k4s4 style", "a", "style a")
    write_pair(root / "3_cat", "c", "a cat")
    write_pair(root, "own", "top level")

    dataset = scan_dataset(spec_for(root))

    assert [(Path(i.image_path).name, i.concept, i.repeats, i.caption) for i in dataset.items] == [
        ("own.png", "data", 1, "top level"),
        ("a.png", "k4s4 style", 10, "style a"),
        ("b.png", "k4s4 style", 10, "style b"),
        ("c.png", "cat", 3, "a cat"),
    ]
    assert dataset.samples_per_epoch == 24
    assert dataset.concept_counts() == {"data": 1, "k4s4 style": 2, "cat": 1}
    assert dataset.concept_samples() == {"data": 1, "k4s4 style": 20, "cat": 3}
    assert dataset.problems == []


def test_repeat_factor_multiplies_folder_repeats(tmp_path):
    write_pair(tmp_path / "4_dog", "d", "a dog")
    dataset = scan_dataset(spec_for(tmp_path, repeat_factor=3))
    assert [i.repeats for i in dataset.items] == [12]
    assert dataset.samples_per_epoch == 12


def test_top_folder_with_kohya_name_keeps_its_repeats(tmp_path):
    write_pair(tmp_path / "5_shapes", "s", "a shape")
    dataset = scan_dataset(spec_for(tmp_path / "5_shapes"))
    assert [(i.concept, i.repeats) for i in dataset.items] == [("shapes", 5)]


def test_recursive_option(tmp_path):
    write_pair(tmp_path, "top", "top")
    write_pair(tmp_path / "extra", "nested", "nested")
    write_pair(tmp_path / "2_cat" / "more", "deep", "deep cat")
    write_pair(tmp_path / "2_cat", "kitty", "kitty")

    flat = scan_dataset(spec_for(tmp_path, recursive=False))
    assert sorted(Path(i.image_path).name for i in flat.items) == ["kitty.png", "top.png"]

    deep = scan_dataset(spec_for(tmp_path, recursive=True))
    by_name = {Path(i.image_path).name: (i.concept, i.repeats) for i in deep.items}
    assert by_name == {
        "top.png": (tmp_path.name, 1),
        "nested.png": (tmp_path.name, 1),
        "kitty.png": ("cat", 2),
        "deep.png": ("cat", 2),
    }


def test_order_is_sorted_and_deterministic(tmp_path):
    for stem in ["zeta", "alpha", "mid", "Beta"]:
        write_pair(tmp_path, stem, stem)
    first = [i.image_path for i in scan_dataset(spec_for(tmp_path)).items]
    assert [Path(p).stem for p in first] == ["Beta", "alpha", "mid", "zeta"]
    assert [i.image_path for i in scan_dataset(spec_for(tmp_path)).items] == first


def make_bad_folder(root: Path) -> dict[str, ProblemReason]:
    """A folder with one good pair and one file for every problem; returns file name -> expected reason."""
    write_pair(root, "good", "a good caption")
    (root / "zero.png").write_bytes(b"")
    (root / "zero.txt").write_text("caption of an empty image", encoding="utf-8")
    (root / "text.png").write_text("this is not a png", encoding="utf-8")
    (root / "text.txt").write_text("caption of a text file", encoding="utf-8")
    write_png(root / "nocaption.png")
    write_pair(root, "blank", "  \n \n")
    write_png(root / "latin.png")
    (root / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / "orphan.txt").write_text("no image for me", encoding="utf-8")
    return {
        "zero.png": ProblemReason.ZERO_BYTE,
        "text.png": ProblemReason.UNREADABLE_IMAGE,
        "nocaption.png": ProblemReason.MISSING_CAPTION,
        "blank.txt": ProblemReason.EMPTY_CAPTION,
        "latin.txt": ProblemReason.CAPTION_NOT_UTF8,
        "orphan.txt": ProblemReason.ORPHAN_CAPTION,
    }


def test_every_bad_file_gets_its_named_problem_with_skip(tmp_path):
    expected = make_bad_folder(tmp_path)
    dataset = scan_dataset(spec_for(tmp_path, on_problem=OnProblem.SKIP))

    assert {Path(p.path).name: p.reason for p in dataset.problems} == expected
    assert [Path(i.image_path).name for i in dataset.items] == ["good.png"]
    assert [p.reason.value for p in sorted(dataset.problems, key=lambda p: p.path)] == [
        "empty caption",
        "caption not UTF-8",
        "missing caption",
        "caption with no image",
        "unreadable image",
        "zero-byte file",
    ]
    latin = next(p for p in dataset.problems if p.reason == ProblemReason.CAPTION_NOT_UTF8)
    assert latin.detail == "byte 0xe9 at offset 3"


def test_stop_lists_every_bad_file_and_the_fix(tmp_path):
    expected = make_bad_folder(tmp_path)
    with pytest.raises(DatasetError) as info:
        scan_dataset(spec_for(tmp_path, on_problem=OnProblem.STOP))
    message = str(info.value)
    assert message.startswith("the dataset has 6 problem file(s):")
    for name, reason in expected.items():
        assert f"{tmp_path / name}: {reason.value}" in message
    assert "set on_problem to 'skip'" in message
    assert sorted(Path(p).name for p in info.value.paths) == sorted(expected)


def test_folder_name_as_caption_fills_missing_captions(tmp_path):
    write_png(tmp_path / "7_red fox" / "fox.png")
    dataset = scan_dataset(spec_for(tmp_path, folder_name_as_caption=True))
    assert [(i.caption, i.repeats) for i in dataset.items] == [("red fox", 7)]


def test_caption_extension_bom_and_multiline(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "a.caption").write_bytes("\ufeffsks, first line\nsecond line\n".encode())
    (tmp_path / "a.txt").write_text("ignored", encoding="utf-8")
    dataset = scan_dataset(spec_for(tmp_path, caption_extension=".caption", on_problem=OnProblem.SKIP))
    assert [i.caption for i in dataset.items] == ["sks, first line second line"]
    assert dataset.problems == []  # a .txt file is not a caption when the extension is .caption


def test_missing_empty_and_file_folders_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset folder .*nowhere does not exist"):
        scan_dataset(spec_for(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("hi", encoding="utf-8")
    with pytest.raises(
        DatasetError,
        match=r"no images found in .*empty or its sub-folders; supported extensions: \.bmp, \.jpeg, \.jpg, \.png, \.webp",
    ):
        scan_dataset(spec_for(tmp_path / "empty"))
    afile = write_png(tmp_path / "x.png")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        scan_dataset(spec_for(afile))
    with pytest.raises(DatasetError, match="has no folders"):
        scan_dataset(DatasetSpec())


def test_all_images_bad_with_skip_is_an_error(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"no usable images(.|\n)*zero-byte file"):
        scan_dataset(spec_for(tmp_path, on_problem=OnProblem.SKIP))


def test_zero_repeat_folder_is_refused(tmp_path):
    write_pair(tmp_path / "0_cat", "c", "cat")
    with pytest.raises(DatasetError, match="repeat count of at least 1; rename it to '1_cat'"):
        scan_dataset(spec_for(tmp_path))


def test_merged_parts_keep_their_repeats_and_policies(tmp_path):
    write_pair(tmp_path / "one" / "10_style", "s", "style")
    write_pair(tmp_path / "two" / "2_person", "p", "person")
    spec = DatasetSpec(
        parts=[
            DatasetPart(
                source=DatasetSource(folder=str(tmp_path / "one")), policy=CaptionPolicy(prefix="k4s4")
            ),
            DatasetPart(
                source=DatasetSource(folder=str(tmp_path / "two")),
                policy=CaptionPolicy(prefix="ohwx"),
                repeat_factor=5,
            ),
        ]
    )
    dataset = ScannedDataset.from_spec(spec)
    assert [(i.concept, i.repeats, i.part_index) for i in dataset.items] == [
        ("style", 10, 0),
        ("person", 10, 1),
    ]
    assert [dataset.policy(i).prefix for i in range(2)] == ["k4s4", "ohwx"]
    assert dataset.samples_per_epoch == 20


def test_problem_of_one_stop_part_blocks_even_if_another_skips(tmp_path):
    write_pair(tmp_path / "ok", "a", "fine")
    (tmp_path / "ok" / "orphan.txt").write_text("x", encoding="utf-8")
    write_pair(tmp_path / "strict", "b", "fine")
    write_png(tmp_path / "strict" / "nocap.png")
    spec = DatasetSpec(
        parts=[
            DatasetPart(source=DatasetSource(folder=str(tmp_path / "ok"), on_problem=OnProblem.SKIP)),
            DatasetPart(source=DatasetSource(folder=str(tmp_path / "strict"), on_problem=OnProblem.STOP)),
        ]
    )
    with pytest.raises(DatasetError) as info:
        scan_dataset(spec)
    assert [Path(p).name for p in info.value.paths] == ["nocap.png"]


def test_load_image_uses_the_sources_background(tmp_path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.save(tmp_path / "clear.png")
    (tmp_path / "clear.txt").write_text("nothing", encoding="utf-8")
    dataset = scan_dataset(spec_for(tmp_path, alpha_background="#00ff00"))
    assert dataset.load_image(0).getpixel((1, 1)) == (0, 255, 0)


def test_bundled_demo_dataset_matches_its_generator(tmp_path):
    make_demo_images(tmp_path / "5_shapes")
    bundled = DEMO / "5_shapes"
    names = sorted(p.name for p in bundled.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "5_shapes").iterdir())
    assert len(names) == 16
    for name in names:
        if name.endswith(".txt"):
            assert (bundled / name).read_text(encoding="utf-8") == (tmp_path / "5_shapes" / name).read_text(
                encoding="utf-8"
            )
        else:
            with Image.open(bundled / name) as a, Image.open(tmp_path / "5_shapes" / name) as b:
                assert a.size == (64, 64)
                assert a.convert("RGB").tobytes() == b.convert("RGB").tobytes()
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) < 100_000


def test_bundled_demo_dataset_scans(tmp_path):
    dataset = scan_dataset(spec_for(DEMO))
    assert len(dataset) == 8
    assert dataset.samples_per_epoch == 40
    assert dataset.concept_counts() == {"shapes": 8}
    red = next(i for i in dataset.items if Path(i.image_path).name == "red_circle.png")
    assert red == Item(
        str(DEMO / "5_shapes" / "red_circle.png"), "sks shape, red circle, white background", "shapes", 5, 0
    )
    img = dataset.load_image(dataset.items.index(red))
    assert img.getpixel((32, 32)) == (220, 30, 30)
    assert img.getpixel((1, 1)) == (255, 255, 255)


def write_cut_jpeg(path: Path, *, keep: float = 0.4) -> Path:
    """A noisy 128x96 JPEG cut to ``keep`` of its bytes (an interrupted copy); Pillow still opens it."""
    import numpy as np

    noise = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype("uint8")
    Image.fromarray(noise).save(path, "JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_a_cut_jpeg_and_a_tiny_image_are_listed_with_the_size(tmp_path):
    write_pair(tmp_path, "good", "a good caption", size=(64, 64))
    write_cut_jpeg(tmp_path / "cut.jpg")
    (tmp_path / "cut.txt").write_text("a cut photo", encoding="utf-8")
    write_pair(tmp_path, "dot", "a single pixel", size=(1, 1))

    skipped = scan_dataset(spec_for(tmp_path, on_problem=OnProblem.SKIP), smallest_bucket_side=256)
    assert [Path(i.image_path).name for i in skipped.items] == ["good.png"]
    problems = {Path(p.path).name: p for p in skipped.problems}
    assert {name: p.reason for name, p in problems.items()} == {
        "cut.jpg": ProblemReason.UNREADABLE_IMAGE,
        "dot.png": ProblemReason.IMAGE_TOO_SMALL,
    }
    assert problems["dot.png"].detail == "1x1 px, far below the smallest bucket side of 256 px"
    assert "image file is truncated" in problems["cut.jpg"].detail
    assert str(problems["dot.png"]).endswith(
        "dot.png: image too small (1x1 px, far below the smallest bucket side of 256 px)"
    )

    with pytest.raises(DatasetError) as info:
        scan_dataset(spec_for(tmp_path), smallest_bucket_side=256)
    assert str(info.value).startswith("the dataset has 2 problem file(s):")
    assert sorted(Path(p).name for p in info.value.paths) == ["cut.jpg", "dot.png"]
    assert "turn on allow_upscale to train it enlarged" in str(info.value)

    # Without a size rule (allow_upscale), only the cut file is a problem; 64 px is no problem at 256.
    upscaled = scan_dataset(spec_for(tmp_path, on_problem=OnProblem.SKIP))
    assert sorted(Path(i.image_path).name for i in upscaled.items) == ["dot.png", "good.png"]
    assert [Path(p.path).name for p in upscaled.problems] == ["cut.jpg"]


def test_whole_jpegs_and_pngs_are_not_decoded_by_the_scan(tmp_path, monkeypatch):
    """The completeness check reads a JPEG's last bytes, so a big dataset scans at header speed."""
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "photo.jpg", "JPEG")
    (tmp_path / "photo.txt").write_text("a photo", encoding="utf-8")
    write_pair(tmp_path, "drawing", "a drawing", size=(64, 64))
    decoded = []
    real_load = Image.Image.load

    def spy(self):
        decoded.append(getattr(self, "filename", ""))
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", spy)
    from PIL import JpegImagePlugin, PngImagePlugin

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy, raising=False)
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", spy, raising=False)
    dataset = scan_dataset(spec_for(tmp_path), smallest_bucket_side=64)
    assert sorted(Path(i.image_path).name for i in dataset.items) == ["drawing.png", "photo.jpg"]
    assert decoded == []
