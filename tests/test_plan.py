"""The step plan: the design's worked examples, round-number cadences, buckets, caps and errors."""

from __future__ import annotations

import pytest

from trainer.options import ConfigError
from trainer.plan import StepPlan, make_plan, round_up_to_round_number


def test_design_example_476_images_10_repeats_batch_6_30_epochs():
    plan = make_plan(samples_per_epoch=476 * 10, batch_size=6, epochs=30)
    assert plan == StepPlan(
        samples_per_epoch=4760,
        batch_size=6,
        gradient_accumulation=1,
        num_processes=1,
        micro_batches_per_epoch=794,
        steps_per_epoch=794,
        epochs=30,
        total_steps=23_820,
        checkpoint_every=800,
        validation_every=200,
        warmup_steps=2_382,
    )


def test_two_concepts_with_their_own_repeats():
    plan = make_plan(samples_per_epoch=100 * 10 + 40 * 25, batch_size=4, epochs=1)
    assert (plan.samples_per_epoch, plan.steps_per_epoch) == (2000, 500)
    assert plan.checkpoint_every == 500 and plan.validation_every == 125


@pytest.mark.parametrize(
    ("n", "rounded"),
    [
        (794, 800),
        (1234, 1500),
        (23, 25),
        (7, 7),
        (1, 1),
        (10, 10),
        (100, 100),
        (101, 150),
        (500, 500),
        (9999, 10000),
    ],
)
def test_round_numbers(n, rounded):
    assert round_up_to_round_number(n) == rounded


def test_checkpoint_never_after_the_last_step():
    plan = make_plan(samples_per_epoch=23, batch_size=1, epochs=1)
    assert (plan.total_steps, plan.checkpoint_every, plan.validation_every) == (23, 23, 5)
    assert make_plan(samples_per_epoch=3, batch_size=4, epochs=1).validation_every == 1


def test_buckets_never_share_a_batch():
    counts = {(64, 64): 5, (96, 32): 5}
    assert make_plan(bucket_counts=counts, batch_size=4, epochs=1).micro_batches_per_epoch == 4
    assert make_plan(samples_per_epoch=10, batch_size=4, epochs=1).micro_batches_per_epoch == 3
    plan = make_plan(samples_per_epoch=10, bucket_counts=counts, batch_size=4, epochs=2)
    assert (plan.samples_per_epoch, plan.steps_per_epoch, plan.total_steps) == (10, 4, 8)
    with pytest.raises(
        ValueError, match="samples_per_epoch 11 does not match the 10 samples in bucket_counts"
    ):
        make_plan(samples_per_epoch=11, bucket_counts=counts, batch_size=4, epochs=1)


def test_processes_and_accumulation():
    plan = make_plan(
        samples_per_epoch=4760, batch_size=6, num_processes=2, gradient_accumulation=2, epochs=30
    )
    assert plan.global_batch == 12
    assert (plan.micro_batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (397, 199, 5970)
    assert (plan.checkpoint_every, plan.validation_every, plan.warmup_steps) == (200, 50, 597)


def test_max_steps_caps_and_explicit_cadences_win():
    plan = make_plan(
        samples_per_epoch=4760, batch_size=6, epochs=30, max_steps=1000, checkpoint_every=300, warmup=50
    )
    assert (plan.total_steps, plan.epochs) == (1000, 2)
    assert (plan.checkpoint_every, plan.validation_every, plan.warmup_steps) == (300, 75, 50)
    assert make_plan(samples_per_epoch=4760, batch_size=6, epochs=1, max_steps=10_000).total_steps == 794
    assert make_plan(samples_per_epoch=4760, batch_size=6, epochs=1, validation_every=7).validation_every == 7


def test_describe_and_to_dict():
    plan = make_plan(samples_per_epoch=4760, batch_size=6, epochs=30)
    assert plan.describe() == (
        "4,760 samples per epoch, batch 6 -> 794 steps per epoch; 30 epoch(s) = 23,820 steps. "
        "Checkpoint every 800 steps, validation every 200, warm-up 2,382 steps."
    )
    assert plan.to_dict()["total_steps"] == 23_820
    assert list(plan.to_dict()) == [
        "samples_per_epoch",
        "batch_size",
        "gradient_accumulation",
        "num_processes",
        "micro_batches_per_epoch",
        "steps_per_epoch",
        "epochs",
        "total_steps",
        "checkpoint_every",
        "validation_every",
        "warmup_steps",
    ]
    multi = make_plan(samples_per_epoch=100, batch_size=2, num_processes=4, gradient_accumulation=3, epochs=1)
    assert "batch 2 x 4 GPUs x 3 accumulated -> 5 steps per epoch" in multi.describe()


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="batch_size: 0 must be at least 1"):
        make_plan(samples_per_epoch=10, batch_size=0, epochs=1)
    with pytest.raises(ConfigError, match="dataset: has no samples"):
        make_plan(samples_per_epoch=0, batch_size=1, epochs=1)
    with pytest.raises(ConfigError, match="lr_warmup: 2.5 is neither"):
        make_plan(samples_per_epoch=10, batch_size=1, epochs=1, warmup=2.5)
    with pytest.raises(ValueError, match="needs samples_per_epoch or bucket_counts"):
        make_plan(batch_size=1, epochs=1)
