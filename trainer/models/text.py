"""Prompt encoding exactly as the diffusers pipelines do it, usable while the text encoders train."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Arch
from .bundle import ModelBundle


@dataclass
class TextEmbeds:
    """What the denoiser is conditioned on.

    Attributes:
        prompt_embeds: (batch, tokens, dim) — SD1.5 (B, 77, 768); SDXL (B, 77, 2048);
            SD3 (B, 77 + t5_max_length, 4096).
        pooled_embeds: (batch, dim) — SDXL (B, 1280); SD3 (B, 2048); None for SD1.5.
    """

    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor | None = None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEmbeds:
        pooled = self.pooled_embeds.to(device=device, dtype=dtype) if self.pooled_embeds is not None else None
        return TextEmbeds(self.prompt_embeds.to(device=device, dtype=dtype), pooled)


def _ids(tokenizer, prompts: list[str], max_length: int, device) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def _clip_hidden(encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states, first output) of a CLIP encoder — the first output is the projected
    pooled embedding for ``CLIPTextModelWithProjection``."""
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def encode_prompts(
    bundle: ModelBundle, prompts: list[str], *, device: torch.device | str, t5_max_length: int = 77
) -> TextEmbeds:
    """Encode prompts the way the model's diffusers pipeline does.

    SD1.5: the CLIP encoder's last hidden state. SDXL: both encoders' penultimate hidden states
    concatenated, pooled = the second encoder's projected pooled output. SD3: CLIP-L and CLIP-G
    penultimate states concatenated, zero-padded to the T5 width and followed by the T5 states
    along the sequence (zeros when T5 is not loaded); pooled = both CLIP pooled outputs concatenated.

    No ``torch.no_grad`` here: the caller decides (text-encoder training needs gradients).

    Args:
        bundle: The model.
        prompts: One string per sample ("" is the unconditional prompt).
        device: Where the token ids go (the encoders must already be there).
        t5_max_length: SD3 only: T5 sequence length (diffusers' SD3 training script uses 77).

    Returns:
        :class:`TextEmbeds`.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    prompts = list(prompts)
    tok, te = bundle.tokenizers, bundle.text_encoders
    if bundle.arch == Arch.SD15:
        ids = _ids(tok[0], prompts, tok[0].model_max_length, device)
        return TextEmbeds(te[0](ids)[0], None)
    if bundle.arch == Arch.SDXL:
        h1, _ = _clip_hidden(te[0], _ids(tok[0], prompts, tok[0].model_max_length, device))
        h2, pooled = _clip_hidden(te[1], _ids(tok[1], prompts, tok[1].model_max_length, device))
        return TextEmbeds(torch.cat([h1, h2], dim=-1), pooled)
    if bundle.arch == Arch.SD3:
        h1, p1 = _clip_hidden(te[0], _ids(tok[0], prompts, tok[0].model_max_length, device))
        h2, p2 = _clip_hidden(te[1], _ids(tok[1], prompts, tok[1].model_max_length, device))
        clip = torch.cat([h1, h2], dim=-1)
        joint_dim = int(bundle.denoiser.config.joint_attention_dim)
        if te[2] is not None and tok[2] is not None:
            t5 = te[2](_ids(tok[2], prompts, t5_max_length, device))[0]
        else:
            t5 = torch.zeros(len(prompts), t5_max_length, joint_dim, device=clip.device, dtype=clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return TextEmbeds(torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat([p1, p2], dim=-1))
    raise ValueError(f"cannot encode prompts for arch {bundle.arch!r}")


def sdxl_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL's micro-conditioning vector: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    Args:
        original_size: (height, width) of the image before resizing/cropping.
        crop_top_left: (top, left) of the crop in the resized image.
        target_size: (height, width) of the training crop.

    Returns:
        A float tensor of shape (6,); stack one per sample for a batch.
    """
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
