"""Epoch order and sample drawing: repeats, determinism, per-part policies, bucket-pure batches."""

from __future__ import annotations

import math
from collections import Counter

from trainer.config import CaptionPolicy, DatasetPart, DatasetSource, DatasetSpec
from trainer.data.order import Sample, batch_samples, draw_samples, epoch_order
from trainer.data.scan import Item, ScannedDataset
from trainer.plan import make_plan


def fake_dataset() -> ScannedDataset:
    """Three items in two parts; order and captions never touch the files."""
    spec = DatasetSpec(
        parts=[
            DatasetPart(
                source=DatasetSource(folder="a"),
                policy=CaptionPolicy(prefix="one", shuffle=True, keep_tokens=1),
            ),
            DatasetPart(source=DatasetSource(folder="b"), policy=CaptionPolicy(prefix="two")),
        ]
    )
    items = [
        Item("a/x.png", "red, green, blue, cyan", "x", 4, 0),
        Item("a/y.png", "cat, dog", "y", 1, 0),
        Item("b/z.png", "plain caption", "z", 3, 1),
    ]
    return ScannedDataset(spec=spec, items=items)


def test_each_item_appears_repeats_times():
    dataset = fake_dataset()
    order = epoch_order(dataset, epoch=1, seed=0)
    assert len(order) == dataset.samples_per_epoch == 8
    assert Counter(order) == {0: 4, 1: 1, 2: 3}


def test_order_is_deterministic_and_changes_with_epoch_and_seed():
    dataset = fake_dataset()
    first = epoch_order(dataset, epoch=1, seed=42)
    assert epoch_order(dataset, epoch=1, seed=42) == first
    assert epoch_order(dataset, epoch=2, seed=42) != first
    assert epoch_order(dataset, epoch=1, seed=43) != first


def test_draw_samples_applies_each_parts_policy():
    dataset = fake_dataset()
    samples = draw_samples(dataset, epoch=1, seed=0)
    assert [s.index for s in samples] == epoch_order(dataset, epoch=1, seed=0)
    assert [s.position for s in samples] == list(range(8))
    assert all(s.epoch == 1 for s in samples)
    for s in samples:
        if s.index == 2:
            assert s.caption == "two, plain caption"
        elif s.index == 1:
            assert s.caption == "one, cat, dog" or s.caption == "one, dog, cat"
        else:
            assert s.caption.startswith("one, ") and sorted(s.caption.split(", ")[1:]) == [
                "blue",
                "cyan",
                "green",
                "red",
            ]
    # An item drawn 4 times in one epoch does not get 4 identical shuffles.
    assert len({s.caption for s in samples if s.index == 0}) > 1
    assert draw_samples(dataset, epoch=1, seed=0) == samples


def test_batches_never_mix_buckets_and_match_the_plan():
    dataset = fake_dataset()
    buckets = [(64, 64), (64, 64), (128, 32)]
    samples = draw_samples(dataset, epoch=3, seed=1)
    batches = batch_samples(samples, batch_size=2, bucket_of=buckets, seed=1, epoch=3)
    assert all(len({buckets[s.index] for s in batch}) == 1 for batch in batches)
    assert sorted(s.position for batch in batches for s in batch) == list(range(8))
    counts = Counter(buckets[i] for i in epoch_order(dataset, epoch=3, seed=1))
    assert counts == {(64, 64): 5, (128, 32): 3}
    assert len(batches) == sum(math.ceil(n / 2) for n in counts.values()) == 5
    assert make_plan(bucket_counts=counts, batch_size=2, epochs=1).micro_batches_per_epoch == len(batches)
    assert batch_samples(samples, batch_size=2, bucket_of=buckets, seed=1, epoch=3) == batches


def test_batches_without_buckets_keep_the_order():
    samples = [Sample(index=i % 3, epoch=1, caption=str(i), position=i) for i in range(7)]
    batches = batch_samples(samples, batch_size=3, seed=0, epoch=1)
    assert [[s.position for s in b] for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
