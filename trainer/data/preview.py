"""What a dataset preview shows: the first samples of an epoch as drawn, and what was left out."""

from __future__ import annotations

from PIL import Image

from .order import draw_samples
from .scan import ScannedDataset


def preview_samples(
    dataset: ScannedDataset, *, epoch: int, seed: int, count: int
) -> list[tuple[Image.Image, str]]:
    """The first ``count`` samples of an epoch, decoded, with the caption each gets.

    Args:
        dataset: The scanned dataset.
        epoch: Epoch number, counted from 1.
        seed: The run's seed (the same seed shows what training will see).
        count: How many samples (fewer if the epoch is shorter).

    Returns:
        ``(image, caption)`` pairs in draw order; images are upright RGB.
    """
    if count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    samples = draw_samples(dataset, epoch=epoch, seed=seed)[:count]
    return [(dataset.load_image(sample.index), sample.caption) for sample in samples]


def dataset_summary(dataset: ScannedDataset) -> str:
    """Images and samples per concept, e.g. ``"k4s4 style: 476 images x 10 = 4,760 samples"``."""
    images = dataset.concept_counts()
    samples = dataset.concept_samples()
    lines = [
        f"{concept}: {images[concept]:,} images -> {samples[concept]:,} samples per epoch"
        for concept in images
    ]
    lines.append(f"total: {len(dataset):,} images -> {dataset.samples_per_epoch:,} samples per epoch")
    return "\n".join(lines)


def problems_report(dataset: ScannedDataset) -> str:
    """A human list of the files the scan left out and how to fix each, or a line saying there are none."""
    if not dataset.problems:
        return f"No problems: {len(dataset):,} images, {dataset.samples_per_epoch:,} samples per epoch."
    lines = [f"{len(dataset.problems)} file(s) left out (on_problem is 'skip'):"]
    lines += [f"  - {problem}; {problem.fix}" for problem in dataset.problems]
    return "\n".join(lines)
