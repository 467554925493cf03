"""Saving a dataset's draws: names, captions, kohya layout, refusing folders, atomic on failure; and the preview."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import trainer.data.materialize as materialize
from trainer.config import CaptionPolicy, DatasetPart, DatasetSource, DatasetSpec, OnProblem
from trainer.data.errors import DatasetError, ProblemReason
from trainer.data.materialize import save_dataset
from trainer.data.order import draw_samples
from trainer.data.preview import dataset_summary, preview_samples, problems_report
from trainer.data.scan import scan_dataset

CAT = "cat, red hat, sitting, indoors, sunny"


def make_dataset(root: Path, *, on_problem: OnProblem = OnProblem.STOP, policy: CaptionPolicy | None = None):
    cats = root / "3_cat"
    cats.mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(cats / "a.png")
    (cats / "a.txt").write_text(CAT, encoding="utf-8")
    Image.new("RGB", (8, 8), (10, 200, 10)).save(cats / "b.jpg")
    (cats / "b.txt").write_text("cat, sleeping", encoding="utf-8")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(root / "top.png")
    (root / "top.txt").write_text("top level", encoding="utf-8")
    policy = policy or CaptionPolicy(shuffle=True, keep_tokens=1)
    spec = DatasetSpec(
        parts=[DatasetPart(source=DatasetSource(folder=str(root), on_problem=on_problem), policy=policy)]
    )
    return scan_dataset(spec)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_writes_repeats_copies_with_independent_captions(tmp_path):
    dataset = make_dataset(tmp_path / "src")
    out = tmp_path / "out"
    report = save_dataset(dataset, out, seed=11)

    assert listing(out) == [
        "1_cat/a_1.png",
        "1_cat/a_1.txt",
        "1_cat/a_2.png",
        "1_cat/a_2.txt",
        "1_cat/a_3.png",
        "1_cat/a_3.txt",
        "1_cat/b_1.jpg",
        "1_cat/b_1.txt",
        "1_cat/b_2.jpg",
        "1_cat/b_2.txt",
        "1_cat/b_3.jpg",
        "1_cat/b_3.txt",
        "1_src/top_1.png",
        "1_src/top_1.txt",
    ]
    assert (report.written_images, report.written_captions, report.skipped, report.out_dir) == (
        7,
        7,
        [],
        str(out),
    )
    assert (out / "1_cat" / "b_2.jpg").read_bytes() == (tmp_path / "src" / "3_cat" / "b.jpg").read_bytes()
    captions = [(out / "1_cat" / f"a_{k}.txt").read_text(encoding="utf-8") for k in (1, 2, 3)]
    assert len(set(captions)) == 3
    for caption in captions:
        chunks = caption.split(", ")
        assert chunks[0] == "cat" and sorted(chunks) == sorted(CAT.split(", "))
    assert (out / "1_src" / "top_1.txt").read_text(encoding="utf-8") == "top level"
    assert report.describe() == f"wrote 7 images and 7 captions to {out}"
    # The copies scan back as one repeat each: the repeats are baked in.
    again = scan_dataset(DatasetSpec(parts=[DatasetPart(source=DatasetSource(folder=str(out)))]))
    assert again.samples_per_epoch == dataset.samples_per_epoch == 7


def test_same_seed_same_captions(tmp_path):
    dataset = make_dataset(tmp_path / "src")
    save_dataset(dataset, tmp_path / "one", seed=3)
    save_dataset(dataset, tmp_path / "two", seed=3)
    for name in ("a_1.txt", "a_2.txt", "a_3.txt"):
        assert (tmp_path / "one" / "1_cat" / name).read_text() == (
            tmp_path / "two" / "1_cat" / name
        ).read_text()


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    dataset = make_dataset(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(
        DatasetError, match="already exists and is not empty; choose a new or empty folder, or set overwrite"
    ):
        save_dataset(dataset, out, seed=0)
    assert listing(out) == ["keep.txt"]

    save_dataset(dataset, out, seed=0, overwrite=True)
    assert "keep.txt" not in listing(out) and "1_cat/a_1.png" in listing(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp or old folders left


def test_an_empty_existing_folder_is_fine(tmp_path):
    dataset = make_dataset(tmp_path / "src")
    (tmp_path / "out").mkdir()
    assert save_dataset(dataset, tmp_path / "out", seed=0).written_images == 7


def test_refuses_to_write_into_or_over_the_source(tmp_path):
    dataset = make_dataset(tmp_path / "src")
    for target in (tmp_path / "src", tmp_path / "src" / "copies", tmp_path):
        with pytest.raises(DatasetError, match="overlaps the dataset's own folder"):
            save_dataset(dataset, target, seed=0, overwrite=True)
    assert len(listing(tmp_path / "src")) == 6


def failing_after(n: int):
    calls = {"count": 0}
    original = materialize._write_caption

    def write(path, text):
        calls["count"] += 1
        if calls["count"] > n:
            raise OSError(28, "No space left on device")
        original(path, text)

    return write


def test_failure_leaves_an_existing_destination_untouched(tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("old run", encoding="utf-8")
    monkeypatch.setattr(materialize, "_write_caption", failing_after(3))

    with pytest.raises(
        DatasetError,
        match=r"could not save the dataset to .*out \(\[Errno 28\] No space left on device\); nothing was changed",
    ):
        save_dataset(dataset, out, seed=0, overwrite=True)

    assert listing(out) == ["previous.txt"]
    assert (out / "previous.txt").read_text(encoding="utf-8") == "old run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_failure_creates_nothing_at_a_new_destination(tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path / "src")
    monkeypatch.setattr(materialize, "_write_caption", failing_after(0))
    with pytest.raises(DatasetError):
        save_dataset(dataset, tmp_path / "new", seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_skipped_problems_are_reported(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.png").write_bytes(b"")
    (src / "broken.txt").write_text("x", encoding="utf-8")
    dataset = make_dataset(src, on_problem=OnProblem.SKIP)
    report = save_dataset(dataset, tmp_path / "out", seed=0)
    assert [(Path(p.path).name, p.reason) for p in report.skipped] == [
        ("broken.png", ProblemReason.ZERO_BYTE)
    ]
    assert report.describe().endswith("; 1 bad file(s) left out")


def test_preview_shows_the_epochs_first_samples(tmp_path):
    dataset = make_dataset(tmp_path / "src")
    preview = preview_samples(dataset, epoch=2, seed=5, count=4)
    samples = draw_samples(dataset, epoch=2, seed=5)[:4]
    assert [caption for _, caption in preview] == [s.caption for s in samples]
    colours = {0: (10, 10, 200), 1: (200, 10, 10), 2: (10, 200, 10)}  # top.png, 3_cat/a.png, 3_cat/b.jpg
    for (img, _), sample in zip(preview, samples, strict=True):
        r, g, b = img.getpixel((4, 4))
        er, eg, eb = colours[sample.index]
        assert img.size == (8, 8) and abs(r - er) <= 3 and abs(g - eg) <= 3 and abs(b - eb) <= 3
    assert len(preview_samples(dataset, epoch=1, seed=0, count=100)) == 7


def test_reports(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (4, 4)).save(src / "nocap.png")
    dataset = make_dataset(src, on_problem=OnProblem.SKIP)
    assert problems_report(dataset) == (
        "1 file(s) left out (on_problem is 'skip'):\n"
        f"  - {src / 'nocap.png'}: missing caption (expected nocap.txt); "
        "add a caption file with the same name, or turn on folder_name_as_caption"
    )
    assert dataset_summary(dataset) == (
        "src: 1 images -> 1 samples per epoch\ncat: 2 images -> 6 samples per epoch\ntotal: 3 images -> 7 samples per epoch"
    )
    clean = make_dataset(tmp_path / "clean")
    assert problems_report(clean) == "No problems: 3 images, 7 samples per epoch."


def test_two_parts_writing_the_same_file_are_refused_before_writing(tmp_path):
    dataset = make_dataset(tmp_path / "src")
    part = dataset.spec.parts[0]
    twice = scan_dataset(DatasetSpec(parts=[part, DatasetPart(source=part.source, policy=CaptionPolicy())]))
    with pytest.raises(
        DatasetError,
        match=r"top\.png \(dataset part 1\) and .*top\.png \(part 0\) would both be saved as 1_src/top_1\.png",
    ):
        save_dataset(twice, tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()
