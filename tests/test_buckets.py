"""Aspect-ratio buckets: the set, assignment (with and without upscaling), image fitting, counts."""

from __future__ import annotations

import math
import random

import pytest
import torch
from PIL import Image

from trainer.config import CropMode, DatasetPart, DatasetSource, DatasetSpec
from trainer.data.buckets import BucketSet, bucket_counts, prepare_image
from trainer.data.scan import scan_dataset
from trainer.options import ConfigError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def test_bucket_set_limits():
    bucket_set = BucketSet.make(1024)
    assert (1024, 1024) in bucket_set.buckets
    for w, h in bucket_set.buckets:
        assert w * h <= 1024 * 1024
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 2048 and 256 <= h <= 2048
        assert (h, w) in bucket_set.buckets
    assert (2048, 512) in bucket_set.buckets and (1088, 960) in bucket_set.buckets
    ratios = [w / h for w, h in bucket_set.buckets]
    assert ratios == sorted(ratios)


def test_tiny_resolution_keeps_its_square():
    assert BucketSet.make(64).buckets == ((64, 64),)
    assert BucketSet.make(100, step=32).buckets == ((96, 96),)
    assert BucketSet.square(520).buckets == ((512, 512),)
    with pytest.raises(ConfigError, match="resolution: 32 is smaller than the bucket step 64"):
        BucketSet.make(32)


def test_two_to_one_image_gets_a_two_to_one_bucket():
    bucket_set = BucketSet.make(512)
    w, h = bucket_set.assign(2000, 1000)
    assert (w, h) == (704, 320)  # ratio 2.2; the next one, 640x384, is 1.67
    best = min(abs(math.log(bw / bh) - math.log(2)) for bw, bh in bucket_set.buckets)
    assert abs(math.log(w / h) - math.log(2)) == best
    assert w * h <= 512 * 512
    assert bucket_set.assign(1000, 2000) == (h, w)
    assert bucket_set.assign(3000, 3000) == (512, 512)


def test_no_upscale_puts_small_images_in_their_own_smaller_bucket():
    bucket_set = BucketSet.make(512)
    assert bucket_set.assign(300, 300) == (256, 256)
    assert bucket_set.assign(300, 300, allow_upscale=True) == (512, 512)
    assert bucket_set.assign(500, 330) == (448, 320)
    assert bucket_set.assign(40, 40) == (64, 64)  # never below one step


def test_prepare_image_center_crop_and_time_ids():
    img = Image.new("RGB", (128, 64), RED)
    img.paste(BLUE, (64, 0, 128, 64))
    prepared = prepare_image(img, (64, 64), crop=CropMode.CENTER, flip=False, rng=random.Random(0))
    assert prepared.pixels.shape == (3, 64, 64) and prepared.pixels.dtype == torch.float32
    assert prepared.original_size == (64, 128)
    assert prepared.crop_top_left == (0, 32)
    assert prepared.target_size == (64, 64)
    assert prepared.pixels[:, 10, 5].tolist() == [1.0, -1.0, -1.0]
    assert prepared.pixels[:, 10, 60].tolist() == [-1.0, -1.0, 1.0]
    assert not prepared.flipped


def test_prepare_image_resizes_to_cover_then_random_crop_and_flip():
    img = Image.new("RGB", (256, 128), RED)
    img.paste(BLUE, (128, 0, 256, 128))
    rng_state = random.Random(5)
    expected_flip = rng_state.random() < 0.5
    expected_top, expected_left = rng_state.randint(0, 0), rng_state.randint(0, 64)
    prepared = prepare_image(img, (64, 64), crop=CropMode.RANDOM, flip=True, rng=random.Random(5))
    assert prepared.original_size == (128, 256)
    assert prepared.crop_top_left == (expected_top, expected_left)
    assert prepared.flipped == expected_flip
    assert float(prepared.pixels.min()) >= -1.0 and float(prepared.pixels.max()) <= 1.0

    flips = [
        prepare_image(img, (64, 64), crop=CropMode.CENTER, flip=True, rng=random.Random(s)) for s in range(20)
    ]
    flipped = next(p for p in flips if p.flipped)
    assert flipped.pixels[:, 10, 2].tolist() == [-1.0, -1.0, 1.0]  # blue now on the left
    assert any(not p.flipped for p in flips)


def test_bucket_counts_read_headers_and_count_repeats(tmp_path):
    wide = tmp_path / "3_wide"
    wide.mkdir()
    Image.new("RGB", (128, 64)).save(wide / "w.png")
    (wide / "w.txt").write_text("wide", encoding="utf-8")
    square = tmp_path / "2_square"
    square.mkdir()
    Image.new("RGB", (64, 64)).save(square / "s.png")
    (square / "s.txt").write_text("square", encoding="utf-8")
    # Stored wide but EXIF says "rotate 90": it trains as a tall image.
    tall = Image.new("RGB", (128, 64))
    exif = tall.getexif()
    exif[0x0112] = 6
    tall.save(square / "t.png", exif=exif)
    (square / "t.txt").write_text("tall", encoding="utf-8")

    dataset = scan_dataset(DatasetSpec(parts=[DatasetPart(source=DatasetSource(folder=str(tmp_path)))]))
    bucket_set = BucketSet.make(64, min_side=32, max_side=128, step=16)
    counts = bucket_counts(dataset, bucket_set)
    assert bucket_set.assign(128, 64) == (80, 48)
    assert counts == {(48, 80): 2, (64, 64): 2, (80, 48): 3}
    assert sum(counts.values()) == dataset.samples_per_epoch
