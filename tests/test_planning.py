"""The plan counts per aspect bucket, as the batcher does, for every caller."""

from PIL import Image

from trainer.config import DatasetPart, DatasetSource, DatasetSpec, TrainConfig
from trainer.data.scan import scan_dataset
from trainer.planning import plan_run


def _dataset(tmp_path):
    folder = tmp_path / "1_mixed"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), "red").save(folder / f"square{i}.png")
        (folder / f"square{i}.txt").write_text("a square")
        Image.new("RGB", (128, 64), "blue").save(folder / f"wide{i}.png")
        (folder / f"wide{i}.txt").write_text("a wide one")
    return scan_dataset(DatasetSpec(parts=[DatasetPart(source=DatasetSource(folder=str(tmp_path)))]))


def test_batches_never_mix_buckets_so_each_bucket_rounds_up(tmp_path):
    dataset = _dataset(tmp_path)
    config = TrainConfig(batch_size=2, epochs=3, min_bucket_resolution=64)
    run_plan = plan_run(config, dataset, resolution=128)
    # 3 square + 3 wide samples: ceil(3/2) + ceil(3/2) = 4 steps, not ceil(6/2) = 3.
    assert sorted(run_plan.bucket_counts.values()) == [3, 3]
    assert len(run_plan.bucket_counts) == 2
    assert run_plan.plan.steps_per_epoch == 4
    assert run_plan.plan.total_steps == 12


def test_buckets_off_puts_everything_in_one_square(tmp_path):
    dataset = _dataset(tmp_path)
    config = TrainConfig(batch_size=2, epochs=3, buckets=False)
    run_plan = plan_run(config, dataset, resolution=64)
    assert run_plan.bucket_counts == {(64, 64): 6}
    assert run_plan.plan.steps_per_epoch == 3
