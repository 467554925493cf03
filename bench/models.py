"""Models for the benchmark: real-size architectures with random weights, built on the device
from the shipped configs (no weights exist here), or the tiny test models for ``--smoke``."""

from __future__ import annotations

import dataclasses
import json

import torch
from torch import nn

from trainer.config import Arch
from trainer.models.bundle import ModelBundle
from trainer.models.configs import CONFIG_ROOT, scheduler_for
from trainer.models.tiny import tiny_bundle, tiny_tokenizers

ARCHS = {"sd15": Arch.SD15, "sdxl": Arch.SDXL, "sd3": Arch.SD3}

# The text encoders of each architecture: (config sub-folder, transformers class).
_TEXT_ENCODERS = {
    "sd15": [("text_encoder", "CLIPTextModel")],
    "sdxl": [("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection")],
    "sd3": [
        ("text_encoder", "CLIPTextModelWithProjection"),
        ("text_encoder_2", "CLIPTextModelWithProjection"),
        ("text_encoder_3", "T5EncoderModel"),
    ],
}


def build_denoiser(arch: str, device: torch.device | str, *, smoke: bool = False, seed: int = 0) -> nn.Module:
    """The denoiser with random weights: real size from the shipped config, or tiny for ``smoke``.

    Args:
        arch: sd15 | sdxl | sd3.
        device: where to build it (real-size models are built on the GPU directly).
        smoke: the tiny test model instead (CPU smoke runs).
        seed: initialisation seed (the same seed gives the same weights on the same device).
    """
    if smoke:
        return tiny_bundle(ARCHS[arch], seed=seed).denoiser.to(device)
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    sub = "transformer" if arch == "sd3" else "unet"
    cls = SD3Transformer2DModel if arch == "sd3" else UNet2DConditionModel
    config = json.loads((CONFIG_ROOT / arch / sub / "config.json").read_text())
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls.from_config(config)
    return model


def _text_encoder(arch: str, sub: str, class_name: str, device: torch.device | str) -> nn.Module:
    import transformers

    cls = getattr(transformers, class_name)
    config = cls.config_class.from_pretrained(str(CONFIG_ROOT / arch / sub), local_files_only=True)
    with torch.device(device):
        return cls(config).eval()


def _vae(arch: str, device: torch.device | str) -> nn.Module:
    from diffusers import AutoencoderKL

    config = json.loads((CONFIG_ROOT / arch / "vae" / "config.json").read_text())
    with torch.device(device):
        return AutoencoderKL.from_config(config).eval()


def real_bundle(arch: str, device: torch.device | str, *, with_t5: bool = True, seed: int = 0) -> ModelBundle:
    """A whole real-size model with random weights (denoiser, VAE, text encoders) and the tiny
    tokenizers (their ids are valid for the real vocabularies), for end-to-end runs through ``train``.

    Args:
        arch: sd15 | sdxl | sd3.
        device: where the parts are built (the trainer places them again anyway).
        with_t5: SD3: build T5-XXL (4.7B parameters); False leaves its slot empty (zeros).
        seed: initialisation seed.
    """
    a = ARCHS[arch]
    tokenizers = tiny_tokenizers(a)
    torch.manual_seed(seed)
    encoders: list[nn.Module | None] = []
    for sub, class_name in _TEXT_ENCODERS[arch]:
        if class_name == "T5EncoderModel" and not with_t5:
            encoders.append(None)
            tokenizers[len(encoders) - 1] = None
            continue
        encoders.append(_text_encoder(arch, sub, class_name, device))
    vae = _vae(arch, device)
    denoiser = build_denoiser(arch, device, seed=seed).eval()
    prediction = "flow" if a == Arch.SD3 else "epsilon"
    return ModelBundle(
        arch=a,
        denoiser=denoiser,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=scheduler_for(a, prediction_type=prediction),
        prediction_type=prediction,
        source="",
        vae_scaling_factor=float(vae.config.scaling_factor),
        vae_shift_factor=float(vae.config.shift_factor or 0.0),
    )


def step_bundle(arch: str, device: torch.device | str, *, smoke: bool = False, seed: int = 0) -> ModelBundle:
    """The denoiser at real size (tiny for ``smoke``) with the tiny VAE and text encoders: what a
    cached-latent step needs, without spending memory on parts it never calls."""
    tiny = tiny_bundle(ARCHS[arch], seed=seed)
    return dataclasses.replace(tiny, denoiser=build_denoiser(arch, device, smoke=smoke, seed=seed).eval())
