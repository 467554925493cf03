"""The step plan: how many optimizer steps a run takes, and its default checkpoint, validation and warm-up cadence.

Pure arithmetic, so the dataset preview, the trainer and ``run.json`` all show the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .options import ConfigError


def round_up_to_round_number(n: int) -> int:
    """Round ``n`` up to a multiple of half its leading power of ten: 794 -> 800, 1234 -> 1500, 23 -> 25.

    Numbers below 10 are returned unchanged.
    """
    if n < 10:
        return n
    unit = 10 ** (len(str(n)) - 1) // 2
    return math.ceil(n / unit) * unit


@dataclass(frozen=True)
class StepPlan:
    """The numbers of a run, all in optimizer steps unless named otherwise.

    ``micro_batches_per_epoch`` counts global batches (``batch_size x num_processes`` images,
    one bucket each); ``epochs`` is how many epochs are started, fewer than asked when
    ``max_steps`` cuts the run short.
    """

    samples_per_epoch: int
    batch_size: int
    gradient_accumulation: int
    num_processes: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    checkpoint_every: int
    validation_every: int
    warmup_steps: int

    @property
    def global_batch(self) -> int:
        """Images per micro-batch over all processes."""
        return self.batch_size * self.num_processes

    def to_dict(self) -> dict[str, int]:
        """JSON-ready numbers (what ``run.json`` stores as its plan)."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """A one-paragraph human summary, e.g. for the dataset preview node."""
        per_step = f"batch {self.batch_size}"
        if self.num_processes > 1:
            per_step += f" x {self.num_processes} GPUs"
        if self.gradient_accumulation > 1:
            per_step += f" x {self.gradient_accumulation} accumulated"
        return (
            f"{self.samples_per_epoch:,} samples per epoch, {per_step} -> {self.steps_per_epoch:,} steps per epoch; "
            f"{self.epochs:,} epoch(s) = {self.total_steps:,} steps. "
            f"Checkpoint every {self.checkpoint_every:,} steps, validation every {self.validation_every:,}, "
            f"warm-up {self.warmup_steps:,} steps."
        )


def _micro_batches(
    samples_per_epoch: int | None, bucket_counts: Mapping[Any, int] | None, global_batch: int
) -> tuple[int, int]:
    """Return (samples per epoch, micro-batches per epoch); batches never mix buckets."""
    if bucket_counts is None:
        if samples_per_epoch is None:
            raise ValueError("make_plan needs samples_per_epoch or bucket_counts")
        return samples_per_epoch, math.ceil(samples_per_epoch / global_batch)
    if any(n < 0 for n in bucket_counts.values()):
        raise ValueError(f"bucket_counts must not be negative, got {dict(bucket_counts)}")
    total = sum(bucket_counts.values())
    if samples_per_epoch is not None and samples_per_epoch != total:
        raise ValueError(
            f"samples_per_epoch {samples_per_epoch} does not match the {total} samples in bucket_counts"
        )
    return total, sum(math.ceil(n / global_batch) for n in bucket_counts.values())


def make_plan(
    *,
    samples_per_epoch: int | None = None,
    bucket_counts: Mapping[Any, int] | None = None,
    batch_size: int,
    gradient_accumulation: int = 1,
    num_processes: int = 1,
    epochs: int,
    max_steps: int = 0,
    checkpoint_every: int = 0,
    validation_every: int = 0,
    warmup: float = 0.1,
) -> StepPlan:
    """Work out a run's step counts and cadences.

    Args:
        samples_per_epoch: Images drawn per epoch (sum of repeats). Not needed with ``bucket_counts``.
        bucket_counts: Samples per epoch in each bucket; a batch never mixes buckets, so each
            bucket's last batch may be short.
        batch_size: Images per micro-batch on each process.
        gradient_accumulation: Micro-batches per optimizer step.
        num_processes: Data-parallel processes (GPUs).
        epochs: Passes over the dataset.
        max_steps: Cap on the total steps (0 = no cap).
        checkpoint_every: Steps between checkpoints; 0 = one epoch rounded up to a round number.
        validation_every: Steps between validation renders; 0 = a quarter of the checkpoint cadence.
        warmup: Warm-up as a fraction of the total if below 1, else a step count.

    Returns:
        The plan. Example: 4,760 samples, batch 6, 30 epochs -> 794 steps/epoch, 23,820 steps,
        checkpoint 800, validation 200, warm-up 2,382.
    """
    for name, value in (
        ("batch_size", batch_size),
        ("gradient_accumulation", gradient_accumulation),
        ("num_processes", num_processes),
        ("epochs", epochs),
    ):
        if value < 1:
            raise ConfigError(name, f"{value} must be at least 1")
    for name, value in (
        ("max_steps", max_steps),
        ("checkpoint_every", checkpoint_every),
        ("validation_every", validation_every),
        ("lr_warmup", warmup),
    ):
        if value < 0:
            raise ConfigError(name, f"{value} must not be negative")
    if warmup >= 1 and not float(warmup).is_integer():
        raise ConfigError("lr_warmup", f"{warmup} is neither a fraction below 1 nor a whole step count")
    samples, micro = _micro_batches(samples_per_epoch, bucket_counts, batch_size * num_processes)
    if samples < 1:
        raise ConfigError("dataset", "has no samples to train on; add images or check the repeat counts")
    steps_per_epoch = math.ceil(micro / gradient_accumulation)
    total = steps_per_epoch * epochs
    if max_steps > 0:
        total = min(total, max_steps)
    checkpoint = checkpoint_every or min(round_up_to_round_number(steps_per_epoch), total)
    validation = validation_every or max(1, checkpoint // 4)
    warmup_steps = round(total * warmup) if warmup < 1 else int(warmup)
    return StepPlan(
        samples_per_epoch=samples,
        batch_size=batch_size,
        gradient_accumulation=gradient_accumulation,
        num_processes=num_processes,
        micro_batches_per_epoch=micro,
        steps_per_epoch=steps_per_epoch,
        epochs=math.ceil(total / steps_per_epoch),
        total_steps=total,
        checkpoint_every=checkpoint,
        validation_every=validation,
        warmup_steps=warmup_steps,
    )
