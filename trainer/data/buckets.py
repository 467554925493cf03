"""Aspect-ratio buckets (as in kohya and SimpleTuner) and fitting an image into its bucket.

Each image trains near its own shape: buckets share one pixel budget (``resolution``²) in many
aspect ratios, an image goes to the bucket whose aspect ratio is closest, and a batch only holds
images of one bucket.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..config import CropMode
from ..options import ConfigError
from .images import probe_image, to_rgb
from .scan import ScannedDataset

Bucket = tuple[int, int]  # (width, height)


def _floor_to(value: float, step: int) -> int:
    return int(value // step) * step


@dataclass(frozen=True)
class BucketSet:
    """The buckets of one training resolution.

    Attributes:
        resolution: The side of the square whose area every bucket stays within.
        step: Bucket sides are multiples of this (the VAE and UNet need multiples of 8-64).
        buckets: ``(width, height)`` pairs, sorted by aspect ratio (narrowest first).
    """

    resolution: int
    step: int
    buckets: tuple[Bucket, ...]

    @classmethod
    def make(cls, resolution: int, *, min_side: int = 256, max_side: int = 2048, step: int = 64) -> BucketSet:
        """Buckets with area at most ``resolution``² and sides multiples of ``step`` in ``[min_side, max_side]``.

        For each width the tallest height that fits the area is taken (kohya's rule), both ways
        round, plus the square. Limits are tightened to what the resolution allows, so a tiny
        test resolution (64) still gets its square bucket.

        Args:
            resolution: Training resolution (512 for SD1.5, 1024 for SDXL/SD3).
            min_side: Smallest bucket side.
            max_side: Largest bucket side.
            step: Side granularity.

        Returns:
            The bucket set.
        """
        if step < 1:
            raise ConfigError("bucket_step", f"{step} must be at least 1")
        if resolution < step:
            raise ConfigError(
                "resolution", f"{resolution} is smaller than the bucket step {step}; use at least {step}"
            )
        if min_side > max_side:
            raise ConfigError(
                "min_bucket_resolution", f"{min_side} is larger than max_bucket_resolution {max_side}"
            )
        max_area = resolution * resolution
        square = min(_floor_to(resolution, step), max(_floor_to(max_side, step), step))
        low = min(max(math.ceil(min_side / step) * step, step), square)
        high = max(_floor_to(max_side, step), square)
        found = {(square, square)}
        for width in range(low, high + 1, step):
            height = min(high, _floor_to(max_area // width, step))
            if height >= low:
                found.update({(width, height), (height, width)})
        return cls(
            resolution=resolution, step=step, buckets=tuple(sorted(found, key=lambda b: (b[0] / b[1], b[0])))
        )

    @classmethod
    def square(cls, resolution: int, *, step: int = 64) -> BucketSet:
        """A single square bucket (training without aspect-ratio buckets)."""
        if resolution < step:
            raise ConfigError(
                "resolution", f"{resolution} is smaller than the bucket step {step}; use at least {step}"
            )
        side = _floor_to(resolution, step)
        return cls(resolution=resolution, step=step, buckets=((side, side),))

    def closest(self, width: int, height: int) -> Bucket:
        """The bucket whose aspect ratio is closest to ``width / height`` (larger area on ties)."""
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        target = math.log(width / height)
        return min(self.buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1], b[0]))

    def assign(self, width: int, height: int, *, allow_upscale: bool = False) -> Bucket:
        """The bucket an image of ``width`` x ``height`` trains in.

        Args:
            width: Upright image width.
            height: Upright image height.
            allow_upscale: Let an image smaller than its bucket be enlarged to fill it.

        Returns:
            ``(bucket_width, bucket_height)``. Without upscaling, an image that would have to grow
            to cover its bucket gets a bucket of its own size instead (scaled into the pixel
            budget, floored to ``step``, at least one ``step``); it is not in :attr:`buckets`.
        """
        bucket = self.closest(width, height)
        if allow_upscale or (bucket[0] <= width and bucket[1] <= height):
            return bucket
        shrink = min(1.0, math.sqrt(self.resolution * self.resolution / (width * height)))
        return (
            max(self.step, _floor_to(width * shrink, self.step)),
            max(self.step, _floor_to(height * shrink, self.step)),
        )


def assign_buckets(
    dataset: ScannedDataset, bucket_set: BucketSet, *, allow_upscale: bool = False
) -> list[Bucket]:
    """The bucket of every item, from image headers only (nothing is decoded).

    Returns:
        One ``(width, height)`` per item of ``dataset.items``.
    """
    return [
        bucket_set.assign(*probe_image(item.image_path), allow_upscale=allow_upscale)
        for item in dataset.items
    ]


def bucket_counts(
    dataset: ScannedDataset, bucket_set: BucketSet, *, allow_upscale: bool = False
) -> dict[Bucket, int]:
    """Samples per epoch in each bucket (an item counts ``repeats`` times), reading headers only.

    Returns:
        ``{(width, height): samples}``, what :func:`trainer.plan.make_plan` takes as ``bucket_counts``.
    """
    counts: Counter[Bucket] = Counter()
    for item, bucket in zip(
        dataset.items, assign_buckets(dataset, bucket_set, allow_upscale=allow_upscale), strict=True
    ):
        counts[bucket] += item.repeats
    return dict(sorted(counts.items()))


@dataclass(frozen=True)
class PreparedImage:
    """An image fitted to its bucket, with what SDXL's micro-conditioning (time ids) needs.

    Attributes:
        pixels: ``float32`` tensor ``(3, height, width)`` in ``[-1, 1]``.
        original_size: ``(height, width)`` of the image before resizing.
        crop_top_left: ``(top, left)`` of the crop in the resized (and flipped) image.
        target_size: ``(height, width)`` of the bucket.
        flipped: Whether the image was mirrored.
    """

    pixels: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    flipped: bool


def prepare_image(
    img: Image.Image, bucket: Bucket, *, crop: CropMode, flip: bool, rng: random.Random
) -> PreparedImage:
    """Resize ``img`` to cover ``bucket``, optionally mirror it, and crop it to the bucket.

    Same order as diffusers' SDXL training script: resize the shortest side to cover, flip, crop.

    Args:
        img: An upright image (converted to RGB if needed).
        bucket: ``(width, height)`` to produce.
        crop: Center or random crop.
        flip: Mirror with probability 0.5.
        rng: Source of the flip and crop decisions (seed it per sample for reproducibility).

    Returns:
        The prepared pixels and their size/crop conditioning.
    """
    crop = CropMode(crop)
    bucket_w, bucket_h = bucket
    img = to_rgb(img)
    width, height = img.size
    scale = max(bucket_w / width, bucket_h / height)
    resized_w, resized_h = max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))
    if (resized_w, resized_h) != (width, height):
        img = img.resize((resized_w, resized_h), Image.Resampling.LANCZOS)
    flipped = flip and rng.random() < 0.5
    if flipped:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if crop == CropMode.RANDOM:
        top, left = rng.randint(0, resized_h - bucket_h), rng.randint(0, resized_w - bucket_w)
    else:
        top, left = (resized_h - bucket_h) // 2, (resized_w - bucket_w) // 2
    img = img.crop((left, top, left + bucket_w, top + bucket_h))
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return PreparedImage(
        pixels=pixels,
        original_size=(height, width),
        crop_top_left=(top, left),
        target_size=(bucket_h, bucket_w),
        flipped=flipped,
    )
