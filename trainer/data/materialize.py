"""Writing a dataset's draws to disk: ``repeats`` copies of every image, each with its own caption.

What one does to feed another trainer: the caption policy is applied once per copy (copy ``k``
gets the caption drawn for epoch ``k``), and the repeats are baked in, so the output folders are
named ``1_<concept>`` (a trainer reading kohya names must not repeat them again).

The write is atomic: everything goes into a hidden temporary sibling folder which is renamed into
place at the end; on any failure it is removed and the destination is left as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .captions import draw_caption
from .errors import DatasetError
from .scan import Item, Problem, ScannedDataset, parse_kohya_folder

log = logging.getLogger("finetune")


@dataclass
class SaveReport:
    """What :func:`save_dataset` wrote."""

    written_images: int
    written_captions: int
    skipped: list[Problem] = field(default_factory=list)
    out_dir: str = ""

    def describe(self) -> str:
        """A one-line summary for a node's output."""
        left_out = f"; {len(self.skipped)} bad file(s) left out" if self.skipped else ""
        return f"wrote {self.written_images} images and {self.written_captions} captions to {self.out_dir}{left_out}"


def _copy_image(source: Path, destination: Path) -> None:
    # The original bytes: no re-encoding, so nothing is lost and metadata (EXIF) stays.
    shutil.copyfile(source, destination)


def _write_caption(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _concept_subpath(item: Item, source_root: Path) -> Path:
    """Where an item's copies go, relative to the output: ``1_<concept>/<sub-folders inside the concept folder>``."""
    # The scan built image paths under the unresolved source folder, so this never leaves it.
    parts = Path(item.image_path).parent.relative_to(source_root).parts
    kohya = [i for i, name in enumerate(parts) if parse_kohya_folder(name)]
    inner = parts[kohya[-1] + 1 :] if kohya else parts
    return Path(f"1_{item.concept}", *inner)


def _plan_files(dataset: ScannedDataset, seed: int) -> list[tuple[Path, Path, Path, str]]:
    """Every copy to write: (source image, relative image path, relative caption path, caption)."""
    planned: list[tuple[Path, Path, Path, str]] = []
    owners: dict[Path, tuple[str, int]] = {}
    for index, item in enumerate(dataset.items):
        part = dataset.part(index)
        image = Path(item.image_path)
        folder = _concept_subpath(item, Path(part.source.folder).expanduser())
        for k in range(1, item.repeats + 1):
            relative = folder / f"{image.stem}_{k}{image.suffix}"
            caption_file = folder / f"{image.stem}_{k}{part.source.caption_extension}"
            for written in (relative, caption_file):
                owner = owners.setdefault(written, (item.image_path, item.part_index))
                if owner != (item.image_path, item.part_index):
                    raise DatasetError(
                        f"{item.image_path} (dataset part {item.part_index}) and {owner[0]} (part {owner[1]}) would both "
                        f"be saved as {written}; rename one of them, or merge the parts before saving",
                        paths=[item.image_path, owner[0]],
                    )
            caption = draw_caption(item.caption, part.policy, seed=seed, epoch=k, index=index)
            planned.append((image, relative, caption_file, caption))
    return planned


def _check_destination(out: Path, dataset: ScannedDataset, *, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} is a file; choose a folder to save the dataset into", paths=[out])
    resolved = out.resolve()
    for part in dataset.spec.parts:
        source = Path(part.source.folder).expanduser().resolve()
        if _inside(resolved, source) or _inside(source, resolved):
            raise DatasetError(
                f"{out} overlaps the dataset's own folder {source}; save the copies somewhere else",
                paths=[out, source],
            )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DatasetError(
            f"{out} already exists and is not empty; choose a new or empty folder, or set overwrite to replace it",
            paths=[out],
        )


def _swap_in(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is moved aside first and deleted only after."""
    if not out.exists():
        os.rename(new, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except OSError:
        os.rename(old, out)
        raise
    try:
        shutil.rmtree(old)
    except OSError as e:
        log.warning("saved the dataset to %s but could not delete the replaced copy %s: %s", out, old, e)


def save_dataset(
    dataset: ScannedDataset, out_dir: str | os.PathLike, *, seed: int, overwrite: bool = False
) -> SaveReport:
    """Write ``repeats`` copies of every image, each with an independently drawn caption.

    Copy ``k`` (from 1) of ``cat.png`` is ``1_<concept>/cat_<k>.png`` with its caption in
    ``cat_<k><caption_extension>``, drawn by the item's caption policy with ``epoch=k``.

    Args:
        dataset: The scanned dataset.
        out_dir: Destination folder; must be new or empty unless ``overwrite``.
        seed: Seed of the caption draws.
        overwrite: Replace an existing non-empty ``out_dir``.

    Returns:
        Counts of what was written, and the bad files the scan left out.

    Raises:
        DatasetError: when ``out_dir`` is not empty (without ``overwrite``), overlaps a source
            folder, or a write fails (then nothing was changed).
    """
    out = Path(out_dir).expanduser()
    _check_destination(out, dataset, overwrite=overwrite)
    planned = _plan_files(dataset, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for image, relative_image, relative_caption, caption in planned:
            (staging / relative_image).parent.mkdir(parents=True, exist_ok=True)
            _copy_image(image, staging / relative_image)
            _write_caption(staging / relative_caption, caption)
        _swap_in(staging, out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise DatasetError(
            f"could not save the dataset to {out} ({e}); nothing was changed there", paths=[out]
        ) from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SaveReport(
        written_images=len(planned),
        written_captions=len(planned),
        skipped=list(dataset.problems),
        out_dir=str(out),
    )
