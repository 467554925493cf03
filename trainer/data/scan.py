"""Finding a dataset's images and captions, and every file that is wrong with it.

A source folder is read the way kohya reads ``train_data_dir``: a sub-folder named
``10_k4s4 style`` holds concept ``k4s4 style``, repeated 10 times an epoch, and is always read;
the folder's own images belong to a concept named after the folder, repeated once. All problems
are collected before anything is decided, so a user fixes their dataset in one pass.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..config import CaptionPolicy, DatasetPart, DatasetSpec, OnProblem
from .errors import DatasetError, ProblemReason
from .images import IMAGE_EXTENSIONS, is_image_file, load_image, probe_image

log = logging.getLogger("finetune")

__all__ = ["Item", "Problem", "ProblemReason", "ScannedDataset", "parse_kohya_folder", "scan_dataset"]

_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
# "Far below the smallest bucket": a shorter side under a quarter of the smallest bucket side
# would be enlarged more than 4x (a 1x1 image became a 64x64 bucket, 64x) - noise, not data.
TINY_FACTOR = 4

_FIXES: dict[ProblemReason, str] = {
    ProblemReason.UNREADABLE_IMAGE: "re-export it as PNG or JPEG, or delete it",
    ProblemReason.ZERO_BYTE: "copy it again or delete it",
    ProblemReason.IMAGE_TOO_LARGE: "downscale it",
    ProblemReason.IMAGE_TOO_SMALL: "use a larger image, or turn on allow_upscale to train it enlarged",
    ProblemReason.MISSING_CAPTION: "add a caption file with the same name, or turn on folder_name_as_caption",
    ProblemReason.EMPTY_CAPTION: "write a caption into it, or delete it and its image",
    ProblemReason.CAPTION_NOT_UTF8: "re-save it as UTF-8",
    ProblemReason.ORPHAN_CAPTION: "rename it to match its image, or delete it",
}


@dataclass(frozen=True)
class Problem:
    """A file that cannot be used, and why.

    Attributes:
        path: The offending file (the image for a missing caption, else the caption or image file).
        reason: What is wrong.
        detail: Extra facts (the decoder's message, the pixel count), or ``""``.
    """

    path: str
    reason: ProblemReason
    detail: str = ""

    @property
    def fix(self) -> str:
        """What the user can do about it."""
        return _FIXES[self.reason]

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.path}: {self.reason.value}{detail}"


@dataclass(frozen=True)
class Item:
    """One usable image with its caption (as read, before any caption policy)."""

    image_path: str
    caption: str
    concept: str
    repeats: int
    part_index: int


@dataclass
class ScannedDataset:
    """The result of scanning a :class:`DatasetSpec`: usable items in a fixed order, and the problems left out."""

    spec: DatasetSpec
    items: list[Item] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @classmethod
    def from_spec(cls, spec: DatasetSpec) -> ScannedDataset:
        """Scan ``spec``'s folders (see :func:`scan_dataset`)."""
        return scan_dataset(spec)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def samples_per_epoch(self) -> int:
        """Images drawn per epoch: the sum of every item's repeats."""
        return sum(item.repeats for item in self.items)

    def concept_counts(self) -> dict[str, int]:
        """Number of images per concept, in first-seen order."""
        return dict(Counter(item.concept for item in self.items))

    def concept_samples(self) -> dict[str, int]:
        """Samples per epoch per concept (images x repeats), in first-seen order."""
        counts: Counter[str] = Counter()
        for item in self.items:
            counts[item.concept] += item.repeats
        return dict(counts)

    def part(self, index: int) -> DatasetPart:
        """The dataset part item ``index`` came from."""
        return self.spec.parts[self.items[index].part_index]

    def policy(self, index: int) -> CaptionPolicy:
        """The caption policy that applies to item ``index``."""
        return self.part(index).policy

    def load_image(self, index: int) -> Image.Image:
        """Decode item ``index`` as upright RGB, on its source's alpha background."""
        return load_image(self.items[index].image_path, background=self.part(index).source.alpha_background)


def parse_kohya_folder(name: str) -> tuple[int, str] | None:
    """``"10_k4s4 style"`` -> ``(10, "k4s4 style")``; ``None`` for a name without a repeat count."""
    match = _KOHYA_FOLDER.match(name)
    if not match or not match.group(2).strip():
        return None
    return int(match.group(1)), match.group(2).strip()


def _folders(root: Path, *, recursive: bool) -> Iterator[tuple[Path, int, str]]:
    """Yield ``(folder, repeats, concept)`` for every folder whose images belong to the dataset."""
    # The chosen folder may itself be a kohya folder ("10_cat"); honour its count then.
    top = parse_kohya_folder(root.name) or (1, root.name)
    seen: set[Path] = set()

    def visit(folder: Path, repeats: int, concept: str, *, is_root: bool) -> Iterator[tuple[Path, int, str]]:
        real = folder.resolve()
        if real in seen:  # a symlink loop or two links to one folder
            return
        seen.add(real)
        if repeats < 1:
            raise DatasetError(
                f"{folder}: a kohya folder needs a repeat count of at least 1; rename it to '1_{concept}' or more",
                paths=[folder],
            )
        yield folder, repeats, concept
        subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        for sub in subfolders:
            kohya = parse_kohya_folder(sub.name)
            if kohya and (is_root or recursive):
                yield from visit(sub, *kohya, is_root=False)
            elif recursive:
                yield from visit(sub, repeats, concept, is_root=False)

    yield from visit(root, *top, is_root=True)


def _read_caption(path: Path) -> tuple[str | None, Problem | None]:
    """Read a caption file; multi-line captions are joined with spaces."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        return None, Problem(
            str(path), ProblemReason.MISSING_CAPTION, f"could not read it: {e.strerror or e}"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return None, Problem(
            str(path), ProblemReason.CAPTION_NOT_UTF8, f"byte 0x{raw[e.start]:02x} at offset {e.start}"
        )
    caption = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if not caption:
        return None, Problem(str(path), ProblemReason.EMPTY_CAPTION)
    return caption, None


def _scan_folder(
    folder: Path, repeats: int, concept: str, *, part_index: int, part: DatasetPart, smallest_side: int
) -> tuple[list[Item], list[Problem], int]:
    """Scan one folder's own files. Returns (items, problems, number of image files seen)."""
    source = part.source
    ext = source.caption_extension.lower()
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    # Reversed so that, of "a.txt" and "a.TXT", the first in sorted order wins.
    captions = {
        p.name[: -len(ext)]: p
        for p in reversed(files)
        if p.name.lower().endswith(ext) and not is_image_file(p)
    }
    images = [p for p in files if is_image_file(p)]
    items: list[Item] = []
    problems: list[Problem] = []
    for image in images:
        problems_before = len(problems)
        try:
            width, height = probe_image(image, verify=True)
        except DatasetError as e:
            problems.append(
                Problem(
                    str(image), e.reason or ProblemReason.UNREADABLE_IMAGE, str(e).removeprefix(f"{image}: ")
                )
            )
        else:
            if min(width, height) * TINY_FACTOR < smallest_side:
                problems.append(
                    Problem(
                        str(image),
                        ProblemReason.IMAGE_TOO_SMALL,
                        f"{width}x{height} px, far below the smallest bucket side of {smallest_side} px",
                    )
                )
        caption_file = captions.get(image.stem)
        caption: str | None
        if caption_file is not None:
            caption, problem = _read_caption(caption_file)
            if problem:
                problems.append(problem)
        elif source.folder_name_as_caption:
            caption = concept
        else:
            caption = None
            problems.append(
                Problem(
                    str(image),
                    ProblemReason.MISSING_CAPTION,
                    f"expected {image.stem}{source.caption_extension}",
                )
            )
        if caption is not None and len(problems) == problems_before:
            items.append(Item(str(image), caption, concept, repeats * part.repeat_factor, part_index))
    stems = {image.stem for image in images}
    for stem, caption_file in sorted(captions.items()):
        if stem not in stems:
            problems.append(Problem(str(caption_file), ProblemReason.ORPHAN_CAPTION))
    return items, problems, len(images)


def _scan_part(part_index: int, part: DatasetPart, *, smallest_side: int) -> tuple[list[Item], list[Problem]]:
    source = part.source
    if not source.folder.strip():
        raise DatasetError(
            f"dataset part {part_index}: no folder set; choose the folder that holds the images"
        )
    root = Path(source.folder).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist; check the path", paths=[root])
    if not root.is_dir():
        raise DatasetError(
            f"dataset folder {root} is a file, not a folder; choose the folder that holds the images",
            paths=[root],
        )
    items: list[Item] = []
    problems: list[Problem] = []
    image_files = 0
    try:
        for folder, repeats, concept in _folders(root, recursive=source.recursive):
            folder_items, folder_problems, seen = _scan_folder(
                folder, repeats, concept, part_index=part_index, part=part, smallest_side=smallest_side
            )
            items += folder_items
            problems += folder_problems
            image_files += seen
    except OSError as e:
        # A folder that cannot be listed (permissions, a vanished network drive) ends the scan.
        where = e.filename or root
        raise DatasetError(
            f"cannot read {where} ({e.strerror or e}); check that the folder is readable", paths=[where]
        ) from None
    if image_files == 0:
        where = (
            "or its sub-folders"
            if source.recursive
            else "(sub-folders not searched: recursive is off, only 'N_name' ones are read)"
        )
        raise DatasetError(
            f"no images found in {root} {where}; supported extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}",
            paths=[root],
        )
    return items, problems


def _problem_listing(problems: list[Problem]) -> str:
    return "\n".join(f"  - {p}; {p.fix}" for p in problems)


def scan_dataset(spec: DatasetSpec, *, smallest_bucket_side: int = 0) -> ScannedDataset:
    """Find every image and caption of ``spec``'s parts and check them.

    Images are checked cheaply: header read, structural verify, and a check that the file is not
    cut short (see :func:`~trainer.data.images.probe_image`); a good JPEG or PNG is not decoded.
    Items come in a deterministic order: parts in order, folders and files sorted by path.

    Args:
        spec: The dataset parts (folders, caption policies, repeat factors).
        smallest_bucket_side: The smallest bucket side of the run (0: no size check). An image
            whose shorter side is below 1/:data:`TINY_FACTOR` of it is a problem
            (``image too small``); runs that allow upscaling pass 0.

    Returns:
        The usable items and, for parts set to ``on_problem=skip``, the problems left out.

    Raises:
        DatasetError: when a folder is missing or has no images, when a part set to
            ``on_problem=stop`` has any problem (all of them are listed), or when nothing usable is left.
    """
    if not spec.parts:
        raise DatasetError("the dataset has no folders; add at least one dataset source")
    items: list[Item] = []
    skipped: list[Problem] = []
    blocking: list[Problem] = []
    for index, part in enumerate(spec.parts):
        part_items, part_problems = _scan_part(index, part, smallest_side=smallest_bucket_side)
        items += part_items
        (blocking if part.source.on_problem == OnProblem.STOP else skipped).extend(part_problems)
    if blocking:
        raise DatasetError(
            f"the dataset has {len(blocking)} problem file(s):\n{_problem_listing(blocking)}\n"
            "Fix or remove these files, or set on_problem to 'skip' to train without them.",
            paths=[p.path for p in blocking],
        )
    if not items:
        raise DatasetError(
            f"no usable images: all were left out because of these problems:\n{_problem_listing(skipped)}",
            paths=[p.path for p in skipped],
        )
    for problem in skipped:
        log.warning("dataset: leaving out %s", problem)
    return ScannedDataset(spec=spec, items=items, problems=skipped)
