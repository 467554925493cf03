"""diffusers pipelines built from a ModelBundle, for validation renders during and after training."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import Arch
from .bundle import ModelBundle


def inference_scheduler(bundle: ModelBundle) -> Any:
    """A sampler for validation renders: Euler for the UNets (as SDXL ships), flow-matching Euler for SD3.

    Built from the training scheduler's config, so betas and prediction type match the model.
    """
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    if bundle.arch == Arch.SD3:
        return FlowMatchEulerDiscreteScheduler.from_config(bundle.noise_scheduler.config)
    # "trailing" spacing reaches t=999 at few steps (the "leading" default skips the noisiest step).
    return EulerDiscreteScheduler.from_config(
        bundle.noise_scheduler.config, prediction_type=bundle.prediction_type, timestep_spacing="trailing"
    )


def make_pipeline(bundle: ModelBundle, *, denoiser: nn.Module | None = None) -> Any:
    """A StableDiffusion / StableDiffusionXL / StableDiffusion3 pipeline sharing the bundle's modules.

    Nothing is copied: the pipeline uses the same module objects, so a training denoiser (with LoRA
    layers injected) renders as it is now. No safety checker.

    Args:
        bundle: The loaded model.
        denoiser: Use this UNet / transformer instead of ``bundle.denoiser`` (e.g. an unwrapped or EMA copy).

    Returns:
        A diffusers ``DiffusionPipeline`` with its progress bar turned off.
    """
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    model = denoiser if denoiser is not None else bundle.denoiser
    te, tok = bundle.text_encoders, bundle.tokenizers
    scheduler = inference_scheduler(bundle)
    if bundle.arch == Arch.SD15:
        pipe = StableDiffusionPipeline(
            vae=bundle.vae,
            text_encoder=te[0],
            tokenizer=tok[0],
            unet=model,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif bundle.arch == Arch.SDXL:
        pipe = StableDiffusionXLPipeline(
            vae=bundle.vae,
            text_encoder=te[0],
            text_encoder_2=te[1],
            tokenizer=tok[0],
            tokenizer_2=tok[1],
            unet=model,
            scheduler=scheduler,
        )
    elif bundle.arch == Arch.SD3:
        pipe = StableDiffusion3Pipeline(
            transformer=model,
            scheduler=scheduler,
            vae=bundle.vae,
            text_encoder=te[0],
            tokenizer=tok[0],
            text_encoder_2=te[1],
            tokenizer_2=tok[1],
            text_encoder_3=te[2],
            tokenizer_3=tok[2],
        )
    else:
        raise ValueError(f"no pipeline for arch {bundle.arch!r}; expected sd15, sdxl or sd3")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(
    pipe: Any,
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int = 0,
    steps: int = 20,
    guidance: float = 7.0,
    width: int = 512,
    height: int = 512,
    t5_max_length: int = 77,
) -> Any:
    """Render one image.

    Args:
        pipe: From :func:`make_pipeline`.
        prompt: The prompt.
        negative_prompt: The negative prompt ("" for none).
        seed: Noise seed; the same seed gives the same image on the same device.
        steps: Sampling steps.
        guidance: Classifier-free guidance scale (<= 1 turns it off).
        width: Image width in pixels; must be a multiple of the VAE factor (8 for real models).
        height: Image height in pixels.
        t5_max_length: SD3 only: T5 token length (77 matches training's default).

    Returns:
        A ``PIL.Image`` of ``width`` x ``height``.

    Raises:
        ValueError: Bad sizes or steps, with the value and the rule.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    if getattr(pipe, "transformer", None) is not None:
        factor *= int(pipe.transformer.config.patch_size)
    for name, size in (("width", width), ("height", height)):
        if size < factor or size % factor:
            raise ValueError(f"{name} must be a positive multiple of {factor} for this model, got {size}")
    device = getattr(pipe, "_execution_device", None) or pipe.device
    generator = torch.Generator(device="cpu" if torch.device(device).type == "mps" else device).manual_seed(
        int(seed)
    )
    kwargs: dict[str, Any] = dict(
        prompt=prompt,
        negative_prompt=negative_prompt or None,
        num_inference_steps=int(steps),
        guidance_scale=float(guidance),
        width=int(width),
        height=int(height),
        generator=generator,
        output_type="pil",
    )
    if getattr(pipe, "transformer", None) is not None:
        kwargs["max_sequence_length"] = int(t5_max_length)
    # no_grad, not inference_mode: the denoiser may be mid-training, and inference tensors cached
    # by a module would break its next backward pass.
    with torch.no_grad():
        return pipe(**kwargs).images[0]
