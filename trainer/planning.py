"""The one way a run's step plan is made: dataset → buckets → :func:`trainer.plan.make_plan`.

The trainer, ``python -m trainer plan`` and the Step Plan / Dataset Preview nodes all call
:func:`plan_run`, so the step count a user is shown is the step count the trainer runs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .config import TrainConfig
from .data.buckets import Bucket, BucketSet, assign_buckets
from .data.scan import ScannedDataset, scan_dataset
from .plan import StepPlan, make_plan


@dataclass(frozen=True)
class RunPlan:
    """A plan with the bucket of every dataset item (what the batcher needs too)."""

    plan: StepPlan
    resolution: int
    item_buckets: list[Bucket]
    bucket_counts: dict[Bucket, int]


def bucket_set_for(config: TrainConfig, resolution: int) -> BucketSet:
    """Aspect-ratio buckets around ``resolution``², or one square bucket when buckets are off."""
    if not config.buckets:
        return BucketSet.square(resolution, step=config.bucket_step)
    return BucketSet.make(
        resolution,
        min_side=config.min_bucket_resolution,
        max_side=config.max_bucket_resolution,
        step=config.bucket_step,
    )


def scan_for_run(config: TrainConfig, resolution: int) -> ScannedDataset:
    """Scan the run's dataset with the run's size rule: images far below its smallest bucket are
    problems unless ``allow_upscale`` is on (``plan`` and the trainer both scan through here)."""
    smallest = 0
    if not config.allow_upscale:
        smallest = min(min(b) for b in bucket_set_for(config, resolution).buckets)
    return scan_dataset(config.dataset, smallest_bucket_side=smallest)


def plan_run(
    config: TrainConfig, dataset: ScannedDataset, *, resolution: int, num_processes: int = 1
) -> RunPlan:
    """Assign buckets from image headers and plan the run.

    Args:
        config: The run's options (batch, accumulation, epochs, cadences, bucket settings).
        dataset: The scanned dataset.
        resolution: The training resolution (``config.native_resolution(arch)``).
        num_processes: GPUs the run is spread over (the plan counts the global batch).
    """
    item_buckets = assign_buckets(
        dataset, bucket_set_for(config, resolution), allow_upscale=config.allow_upscale
    )
    counts: Counter[Bucket] = Counter()
    for item, bucket in zip(dataset.items, item_buckets, strict=True):
        counts[bucket] += item.repeats
    plan = make_plan(
        bucket_counts=counts,
        batch_size=config.batch_size,
        gradient_accumulation=config.gradient_accumulation,
        num_processes=num_processes,
        epochs=config.epochs,
        max_steps=config.max_steps,
        checkpoint_every=config.checkpoint_every,
        validation_every=config.validation_every,
        warmup=config.lr_warmup,
    )
    return RunPlan(plan, resolution, item_buckets, dict(sorted(counts.items())))
