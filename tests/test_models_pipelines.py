"""Validation pipelines from tiny bundles render images of the asked size, reproducibly by seed."""

import numpy as np
import pytest

from trainer.config import Arch
from trainer.models.pipelines import make_pipeline, render
from trainer.models.tiny import tiny_bundle


@pytest.fixture(scope="module")
def pipes():
    return {a: make_pipeline(tiny_bundle(a, seed=2)) for a in (Arch.SD15, Arch.SDXL, Arch.SD3)}


@pytest.mark.parametrize("arch", [Arch.SD15, Arch.SDXL, Arch.SD3])
def test_render_size_and_seed(pipes, arch):
    pipe = pipes[arch]
    a = render(
        pipe, "a photo of a cat", negative_prompt="blurry", seed=5, steps=2, guidance=4.0, width=32, height=32
    )
    assert a.size == (32, 32)
    assert a.mode == "RGB"
    b = render(
        pipe, "a photo of a cat", negative_prompt="blurry", seed=5, steps=2, guidance=4.0, width=32, height=32
    )
    c = render(
        pipe, "a photo of a cat", negative_prompt="blurry", seed=6, steps=2, guidance=4.0, width=32, height=32
    )
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_non_square_render(pipes):
    img = render(pipes[Arch.SD15], "a cat", seed=0, steps=1, guidance=1.0, width=48, height=32)
    assert img.size == (48, 32)


def test_pipeline_shares_modules_and_takes_denoiser_override():
    b = tiny_bundle(Arch.SD15)
    other = tiny_bundle(Arch.SD15, seed=9).denoiser
    pipe = make_pipeline(b, denoiser=other)
    assert pipe.unet is other
    assert pipe.vae is b.vae and pipe.text_encoder is b.text_encoders[0]
    assert pipe.safety_checker is None
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert type(make_pipeline(tiny_bundle(Arch.SD3)).scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_bad_sizes_rejected(pipes):
    with pytest.raises(ValueError, match="width must be a positive multiple of 2 for this model, got 33"):
        render(pipes[Arch.SD15], "a cat", width=33, height=32, steps=1)
    with pytest.raises(ValueError, match="height must be a positive multiple of 4 for this model, got 30"):
        render(pipes[Arch.SD3], "a cat", width=32, height=30, steps=1)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        render(pipes[Arch.SD15], "a cat", width=32, height=32, steps=0)
