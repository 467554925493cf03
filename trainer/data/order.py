"""The order samples are drawn in: each item ``repeats`` times an epoch, shuffled per (seed, epoch).

Every function here is pure: the same dataset, seed and epoch give the same order, so a resumed
run continues exactly where it stopped, and no global RNG is touched.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from .captions import draw_caption
from .scan import ScannedDataset


@dataclass(frozen=True)
class Sample:
    """One draw of an epoch.

    Attributes:
        index: The item's index in ``dataset.items``.
        epoch: Epoch number, counted from 1.
        caption: The caption this draw gets (policy applied; ``""`` when dropped).
        position: Where the draw sits in the epoch order; it seeds the caption, so an item's
            repeats within one epoch get different captions.
    """

    index: int
    epoch: int
    caption: str
    position: int = 0


def epoch_order(dataset: ScannedDataset, *, epoch: int, seed: int) -> list[int]:
    """Item indices for one epoch, each repeated ``repeats`` times, shuffled by ``(seed, epoch)``.

    Args:
        dataset: The scanned dataset.
        epoch: Epoch number, counted from 1.
        seed: The run's seed.

    Returns:
        ``dataset.samples_per_epoch`` item indices.
    """
    order = [i for i, item in enumerate(dataset.items) for _ in range(item.repeats)]
    random.Random(f"order:{seed}:{epoch}").shuffle(order)
    return order


def draw_samples(dataset: ScannedDataset, *, epoch: int, seed: int) -> list[Sample]:
    """One epoch's samples in order, each with the caption its part's policy draws for it.

    Args:
        dataset: The scanned dataset.
        epoch: Epoch number, counted from 1.
        seed: The run's seed.

    Returns:
        ``dataset.samples_per_epoch`` samples.
    """
    samples = []
    for position, index in enumerate(epoch_order(dataset, epoch=epoch, seed=seed)):
        caption = draw_caption(
            dataset.items[index].caption, dataset.policy(index), seed=seed, epoch=epoch, index=position
        )
        samples.append(Sample(index=index, epoch=epoch, caption=caption, position=position))
    return samples


def batch_samples(
    samples: Sequence[Sample],
    *,
    batch_size: int,
    bucket_of: Sequence[Hashable] | None = None,
    seed: int,
    epoch: int,
) -> list[list[Sample]]:
    """Cut an epoch's samples into batches that never mix buckets.

    Samples of one bucket keep their epoch order; the batches of all buckets are then shuffled by
    ``(seed, epoch)`` so buckets interleave. The number of batches is what
    :func:`trainer.plan.make_plan` counts: ``sum(ceil(n_b / batch_size))``.

    Args:
        samples: One epoch's samples (from :func:`draw_samples`).
        batch_size: Samples per batch (the global batch: per-GPU batch x processes).
        bucket_of: Bucket key of every item, indexed by ``Sample.index``; ``None`` batches in order.
        seed: The run's seed.
        epoch: Epoch number, counted from 1.

    Returns:
        Batches; only each bucket's last batch may be short.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if bucket_of is None:
        return [list(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
    groups: dict[Hashable, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(bucket_of[sample.index], []).append(sample)
    batches = [
        group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)
    ]
    random.Random(f"batches:{seed}:{epoch}").shuffle(batches)
    return batches
