"""Shared pieces of the engine's training tests: tiny datasets on disk, configs, a fixed-timestep
loss to tell whether a model learned (random timesteps make single-step losses too noisy), and a
UNet call on fixed random inputs."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from trainer.config import Arch, CaptionPolicy, CropMode, DatasetPart, DatasetSource, DatasetSpec, TrainConfig
from trainer.data.buckets import BucketSet, assign_buckets
from trainer.data.order import Sample
from trainer.data.scan import scan_dataset
from trainer.engine.caching import TensorStore
from trainer.engine.inputs import InputBuilder, InputSettings
from trainer.engine.step import Objective, fixed_timestep_loss

COLOURS = [(230, 40, 40), (40, 80, 230), (40, 200, 90), (240, 200, 30)]


def make_images(
    folder: Path, sizes: list[tuple[int, int]], *, repeats: int = 1, caption: str | None = None
) -> Path:
    """Write one image per size (a coloured disc on white) with a caption; returns the dataset root.

    A ``<repeats>_things`` kohya sub-folder holds them.
    """
    sub = folder / f"{repeats}_things"
    sub.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        img = Image.new("RGB", (w, h), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        draw.ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=COLOURS[i % len(COLOURS)])
        img.save(sub / f"img{i}.png")
        text = caption if caption is not None else f"thing, colour {i}, disc, white background"
        (sub / f"img{i}.txt").write_text(text, encoding="utf-8")
    return folder


def spec_for(folder: Path, **policy) -> DatasetSpec:
    return DatasetSpec(
        parts=[DatasetPart(source=DatasetSource(folder=str(folder)), policy=CaptionPolicy(**policy))]
    )


def tiny_config(tmp: Path, data: Path, **overrides) -> TrainConfig:
    """A CPU-sized run: 64 px, rank 4, fp32, no validation unless asked."""
    values = dict(
        run_name="tiny",
        output_dir=str(tmp / "out"),
        dataset=spec_for(data),
        resolution=64,
        min_bucket_resolution=64,
        max_bucket_resolution=128,
        mixed_precision="fp32",
        lora_rank=4,
        lora_alpha=4.0,
        learning_rate=1e-3,
        lr_warmup=0.0,
        lr_scheduler="constant",
        epochs=1,
        seed=7,
        pause_while_host_busy=False,
    )
    values.update(overrides)
    return TrainConfig.from_dict(
        {k: v for k, v in values.items() if k != "dataset"} | {"dataset": _spec_dict(values["dataset"])}
    )


def _spec_dict(spec: DatasetSpec) -> dict:
    from trainer.options import to_dict

    return to_dict(spec)


def eval_inputs(bundle, folder: Path, *, resolution: int = 64):
    """Denoiser inputs of every image of ``folder`` (one batch: images must share a size)."""
    dataset = scan_dataset(spec_for(folder))
    buckets = assign_buckets(dataset, BucketSet.make(resolution, min_side=64, max_side=128))
    builder = InputBuilder(
        dataset=dataset,
        buckets=buckets,
        bundle=bundle,
        settings=InputSettings(seed=0, crop=CropMode.CENTER, flip=False),
        device=torch.device("cpu"),
        dtype=torch.float32,
        latent_store=TensorStore(mode="off"),
        text_store=TensorStore(mode="off"),
        vae_identity="test",
        text_identity="test",
    )
    samples = [
        Sample(index=i, epoch=1, caption=item.caption, position=i) for i, item in enumerate(dataset.items)
    ]
    with torch.no_grad():
        return builder.build(samples)


def eval_loss(bundle, inputs, config: TrainConfig) -> float:
    """Loss over fixed timesteps (UNet) or schedule indices (flow) with fixed noise."""
    objective = Objective.for_run(
        model_prediction=bundle.prediction_type, noise_scheduler=bundle.noise_scheduler, config=config
    )
    points = torch.tensor([50, 200, 400, 600, 800, 950])
    return fixed_timestep_loss(bundle.denoiser, bundle.arch, objective, inputs, points=points, seed=3)


ARCHS = {"sd15": Arch.SD15, "sdxl": Arch.SDXL, "sd3": Arch.SD3}


def unet_call(unet, arch: Arch):
    """A call of a tiny SD1.5/SDXL ``unet`` on fixed random inputs (batch 2, 16x16 latents)
    returning its prediction; each call runs the model again."""
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    added = None
    if arch == Arch.SDXL:
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(2, pooled, generator=g),
            "time_ids": torch.randn(2, 6, generator=g),
        }
    timesteps = torch.tensor([10, 500])
    return lambda: unet(x, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample
