"""Validation renders with the weights being trained, without disturbing the run.

The denoiser goes to eval mode (LoRA dropout off) under ``no_grad`` and comes back to train mode;
the global RNG state is saved and restored around the render, so a run with validation draws the
same training noise as one without (and resume stays exact).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..config import TrainConfig
from ..models.bundle import ModelBundle
from ..runfolder import RunFolder, atomic_write_bytes
from .failures import writing
from .runtime import Runtime

log = logging.getLogger("finetune")


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put modules in eval mode and restore each one's mode afterwards."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def _eager() -> contextlib.AbstractContextManager:
    """Run compiled blocks eagerly: under no_grad and at the render size they would recompile,
    which costs compile time and uses up the recompile budget the training shapes need."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def render_prompts(
    bundle: ModelBundle,
    denoiser: nn.Module,
    *,
    prompts: list[str],
    config: TrainConfig,
    runtime: Runtime,
    resolution: int,
) -> list[Image.Image]:
    """Render each validation prompt with the in-training weights at the validation seed.

    Args:
        bundle: the model (VAE, text encoders, scheduler).
        denoiser: the unwrapped denoiser being trained.
        prompts: one render each.
        config: validation options (negative prompt, seed, steps, guidance, size).
        runtime: device and autocast.
        resolution: default width/height when the config leaves them 0.
    """
    from ..models.pipelines import make_pipeline, render

    width = config.validation_width or resolution
    height = config.validation_height or resolution
    modules = [denoiser, *[te for te in bundle.text_encoders if te is not None]]
    devices = [runtime.device.index or 0] if runtime.device.type == "cuda" else []
    images = []
    with (
        eval_mode(*modules),
        torch.no_grad(),
        torch.random.fork_rng(devices=devices),
        runtime.autocast(),
        _eager(),
    ):
        pipe = make_pipeline(bundle, denoiser=denoiser)
        for prompt in prompts:
            images.append(
                render(
                    pipe,
                    prompt,
                    negative_prompt=config.validation_negative_prompt,
                    seed=config.validation_seed,
                    steps=config.validation_steps,
                    guidance=config.validation_guidance,
                    width=width,
                    height=height,
                )
            )
    return images


def save_samples(folder: RunFolder, step: int, images: list[Image.Image]) -> list[str]:
    """Write ``samples/step00200-<i>.png`` atomically; returns the paths."""
    import io

    paths = []
    for i, img in enumerate(images):
        path: Path = folder.sample_path(step, i)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        with writing(path):
            atomic_write_bytes(path, buf.getvalue())
        paths.append(str(path))
    return paths
