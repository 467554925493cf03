"""Epoch batches: single-bucket, seeded, sharded over ranks, resumable, and as many steps as the plan."""

from __future__ import annotations

from collections import Counter

import pytest
from train_helpers import make_images, spec_for

from trainer.data.order import Sample
from trainer.data.scan import scan_dataset
from trainer.engine.batches import epoch_steps, shard_steps
from trainer.plan import make_plan


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    make_images(root / "a", [(8, 8)] * 5, repeats=3)  # 15 draws
    make_images(root / "b", [(16, 8)] * 4, repeats=1)  # 4 draws
    make_images(root / "c", [(8, 16)] * 2, repeats=2)  # 4 draws
    ds = scan_dataset(spec_for(root))
    assert ds.samples_per_epoch == 23
    return ds


def buckets_of(ds):
    # Bucket = the image's own size here: three buckets of 15, 4 and 4 draws.
    from PIL import Image

    return [Image.open(item.image_path).size for item in ds.items]


@pytest.mark.parametrize(
    "batch,accum,procs", [(1, 1, 1), (2, 1, 1), (4, 1, 1), (3, 2, 1), (2, 1, 2), (4, 3, 2), (5, 2, 3)]
)
def test_steps_equal_the_plan_and_each_draw_is_seen_once(dataset, batch, accum, procs):
    bucket_of = buckets_of(dataset)
    counts = Counter()
    for item, b in zip(dataset.items, bucket_of, strict=True):
        counts[b] += item.repeats
    plan = make_plan(
        bucket_counts=counts, batch_size=batch, gradient_accumulation=accum, num_processes=procs, epochs=1
    )
    per_rank = [
        epoch_steps(
            dataset,
            bucket_of,
            epoch=1,
            seed=3,
            batch_size=batch,
            gradient_accumulation=accum,
            num_processes=procs,
            rank=r,
        )
        for r in range(procs)
    ]
    assert all(len(steps) == plan.steps_per_epoch for steps in per_rank)
    positions = Counter()
    for steps in per_rank:
        for step in steps:
            assert 1 <= len(step.micro_batches) <= accum
            for micro in step.micro_batches:
                assert 1 <= len(micro) <= batch
                assert len({bucket_of[s.index] for s in micro}) == 1
                positions.update(s.position for s in micro)
    assert set(positions) == set(range(23))
    if procs == 1:
        assert set(positions.values()) == {1}


def test_order_depends_on_seed_and_epoch_and_skip_resumes(dataset):
    bucket_of = buckets_of(dataset)

    def flat(**kw):
        return [
            [s.position for m in st.micro_batches for s in m]
            for st in epoch_steps(dataset, bucket_of, batch_size=2, **kw)
        ]

    a = flat(epoch=1, seed=1)
    assert a == flat(epoch=1, seed=1)
    assert a != flat(epoch=2, seed=1)
    assert a != flat(epoch=1, seed=2)
    assert flat(epoch=1, seed=1, skip=4) == a[4:]


def test_short_global_batch_gives_every_rank_a_draw():
    draws = [Sample(index=i, epoch=1, caption="", position=i) for i in range(3)]
    steps = [shard_steps([draws[:1], draws[1:]], epoch=1, num_processes=2, rank=r) for r in range(2)]
    assert [[s.position for s in st.micro_batches[0]] for st in steps[0]] == [[0], [1]]
    assert [[s.position for s in st.micro_batches[0]] for st in steps[1]] == [[0], [2]]
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        shard_steps([draws], epoch=1, num_processes=2, rank=2)
