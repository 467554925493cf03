"""Deterministic optimizer steps for one epoch: single-bucket batches, shuffled, sharded, resumable.

The data side makes the epoch's batches (``trainer.data.order``): every draw of the epoch
(repeats included) in a ``(seed, epoch)`` order with its caption, grouped by bucket and cut into
*global* batches of ``batch_size x num_processes`` draws, the batch list shuffled by
``(seed, epoch)``. This module cuts that stream into optimizer steps of ``gradient_accumulation``
global batches, and gives rank ``r`` the draws ``r, r + N, r + 2N, ...`` of each global batch, so
every draw is seen once per epoch across ranks and the count of steps is exactly the plan's
(``trainer.plan.make_plan(bucket_counts=...)``). A bucket's last global batch may be short; when
it has fewer draws than ranks, the ranks left without one re-use a draw of that batch (as
accelerate's ``even_batches`` does) so no rank idles in a collective.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from ..data.order import Sample, batch_samples, draw_samples
from ..data.scan import ScannedDataset


@dataclass(frozen=True)
class StepBatches:
    """The micro-batches of one optimizer step on this rank.

    Attributes:
        epoch: epoch number, counted from 1 (as the data side counts).
        index: 0-based optimizer step within the epoch.
        micro_batches: single-bucket batches accumulated into one optimizer step.
    """

    epoch: int
    index: int
    micro_batches: tuple[tuple[Sample, ...], ...]

    @property
    def num_samples(self) -> int:
        return sum(len(m) for m in self.micro_batches)


def steps_for_batches(num_batches: int, *, gradient_accumulation: int) -> int:
    """Optimizer steps an epoch of ``num_batches`` global batches makes (its last step may be short)."""
    return math.ceil(num_batches / gradient_accumulation) if num_batches else 0


def rank_slice(batch: Sequence[Sample], *, rank: int, num_processes: int) -> tuple[Sample, ...]:
    """Rank ``rank``'s share of a global batch: every ``num_processes``-th draw from ``rank`` on.

    A batch shorter than the number of ranks gives the ranks without a draw a copy of one.
    """
    mine = tuple(batch[rank::num_processes])
    return mine or (batch[rank % len(batch)],)


def shard_steps(
    batches: Sequence[Sequence[Sample]],
    *,
    epoch: int,
    gradient_accumulation: int = 1,
    num_processes: int = 1,
    rank: int = 0,
    skip: int = 0,
) -> list[StepBatches]:
    """Cut an epoch's stream of global batches into this rank's optimizer steps.

    Args:
        batches: the epoch's global batches (single-bucket, ``batch_size x num_processes`` draws
            at most), in training order.
        epoch: epoch number (counted from 1), stored on each step.
        gradient_accumulation: global batches per optimizer step.
        num_processes: ranks training together.
        rank: this rank, ``0 <= rank < num_processes``.
        skip: leave out the first ``skip`` optimizer steps (resuming mid-epoch).

    Returns:
        The steps from ``skip`` on; each has at least one micro-batch of at least one draw.
    """
    if num_processes < 1 or not 0 <= rank < num_processes:
        raise ValueError(f"rank {rank} is outside 0..{num_processes - 1}")
    if gradient_accumulation < 1:
        raise ValueError(f"gradient_accumulation must be 1 or more (got {gradient_accumulation})")
    n_steps = steps_for_batches(len(batches), gradient_accumulation=gradient_accumulation)
    steps = []
    for s in range(max(0, skip), n_steps):
        group = batches[s * gradient_accumulation : (s + 1) * gradient_accumulation]
        mine = tuple(rank_slice(b, rank=rank, num_processes=num_processes) for b in group)
        steps.append(StepBatches(epoch=epoch, index=s, micro_batches=mine))
    return steps


def epoch_steps(
    dataset: ScannedDataset,
    bucket_of: Sequence[Hashable],
    *,
    epoch: int,
    seed: int,
    batch_size: int,
    gradient_accumulation: int = 1,
    num_processes: int = 1,
    rank: int = 0,
    skip: int = 0,
) -> list[StepBatches]:
    """This rank's optimizer steps of one epoch, from the dataset down.

    Args:
        dataset: the scanned dataset.
        bucket_of: the bucket key of every item (index = item index).
        epoch: epoch number, counted from 1.
        seed: the run's seed (order, captions and batch shuffle).
        batch_size: per-GPU batch size.
        gradient_accumulation, num_processes, rank, skip: see :func:`shard_steps`.
    """
    if len(bucket_of) != len(dataset.items):
        raise ValueError(f"bucket_of has {len(bucket_of)} entries for {len(dataset.items)} items")
    samples = draw_samples(dataset, epoch=epoch, seed=seed)
    global_batch = batch_size * num_processes
    batches = batch_samples(samples, batch_size=global_batch, bucket_of=bucket_of, seed=seed, epoch=epoch)
    return shard_steps(
        batches,
        epoch=epoch,
        gradient_accumulation=gradient_accumulation,
        num_processes=num_processes,
        rank=rank,
        skip=skip,
    )
