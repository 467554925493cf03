"""ModelBundle: every part of a base model the trainer needs, loaded and ready."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import Arch
from .files import sha256_file

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


@dataclass
class ModelBundle:
    """A base model split into the parts a trainer touches.

    Attributes:
        arch: SD15, SDXL or SD3 (never AUTO).
        denoiser: ``UNet2DConditionModel`` (SD1.5/SDXL) or ``SD3Transformer2DModel`` (SD3).
        vae: ``AutoencoderKL``.
        text_encoders: SD1.5 ``[CLIPTextModel]``; SDXL ``[CLIPTextModel, CLIPTextModelWithProjection]``;
            SD3 ``[CLIP-L with projection, CLIP-G with projection, T5EncoderModel or None]``.
        tokenizers: One tokenizer per text encoder slot, in the same order.
        noise_scheduler: ``DDPMScheduler`` (UNets) or ``FlowMatchEulerDiscreteScheduler`` (SD3) for training.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"flow"``.
        source: The file or folder it was loaded from ("" for models built in memory).
        vae_scaling_factor: latents = (vae.encode(x) - shift) * scale.
        vae_shift_factor: 0 for SD1.5/SDXL, 0.0609 for SD3.
    """

    arch: Arch
    denoiser: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module | None]
    tokenizers: list[Any]
    noise_scheduler: Any
    prediction_type: str
    source: str = ""
    vae_scaling_factor: float = 0.18215
    vae_shift_factor: float = 0.0
    _source_hash: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.arch == Arch.AUTO:
            raise ValueError("ModelBundle.arch must be a concrete architecture (sd15, sdxl or sd3), not auto")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if len(self.tokenizers) != len(self.text_encoders):
            raise ValueError(
                f"{len(self.text_encoders)} text encoder slots but {len(self.tokenizers)} tokenizers; they must pair up"
            )

    @property
    def source_hash(self) -> str:
        """sha256 of the source file (kohya's base-model hash); "" for folders and in-memory models.

        Computed on first use and remembered: hashing a 6 GB checkpoint takes seconds, and it is
        only metadata.
        """
        if self._source_hash is None:
            self._source_hash = (
                sha256_file(self.source) if self.source and os.path.isfile(self.source) else ""
            )
        return self._source_hash

    @property
    def is_flow(self) -> bool:
        """True for rectified-flow models (SD3)."""
        return self.prediction_type == "flow"

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along one side (8 for the real models)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def denoiser_name(self) -> str:
        """The component's name in a diffusers folder: "unet" or "transformer"."""
        return "transformer" if self.arch == Arch.SD3 else "unet"

    def frozen_modules(self) -> list[nn.Module]:
        """The VAE and the text encoders that exist (the parts a LoRA run never trains)."""
        return [self.vae, *[te for te in self.text_encoders if te is not None]]

    def to(
        self,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        *,
        vae_dtype: torch.dtype | None = None,
        include_denoiser: bool = False,
    ) -> ModelBundle:
        """Move the frozen parts (VAE, text encoders) and optionally the denoiser.

        Args:
            device: Target device.
            dtype: Target dtype for the text encoders (and the denoiser if included); None keeps it.
            vae_dtype: dtype for the VAE; defaults to ``dtype``. SDXL's VAE overflows in fp16, so
                callers usually keep it in fp32 or bf16.
            include_denoiser: Also move the denoiser (the trainer usually lets accelerate place it).

        Returns:
            self, for chaining.
        """
        vae_dtype = vae_dtype or dtype
        self.vae.to(device=device, dtype=vae_dtype)
        for te in self.text_encoders:
            if te is not None:
                te.to(device=device, dtype=dtype)
        if include_denoiser:
            self.denoiser.to(device=device, dtype=dtype)
        return self

    def freeze(self, *, vae: bool = True, text_encoders: bool = True, denoiser: bool = False) -> ModelBundle:
        """Turn off gradients and put the chosen parts in eval mode.

        Returns:
            self, for chaining.
        """
        parts: list[nn.Module] = []
        if vae:
            parts.append(self.vae)
        if text_encoders:
            parts.extend(te for te in self.text_encoders if te is not None)
        if denoiser:
            parts.append(self.denoiser)
        for m in parts:
            m.requires_grad_(False)
            m.eval()
        return self
