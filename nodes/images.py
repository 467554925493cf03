"""Conversions between ComfyUI's IMAGE tensors and PIL images, for every node module."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def pil_to_image(img: Image.Image) -> torch.Tensor:
    """A PIL image as ComfyUI's IMAGE: float32 [1, H, W, 3] in 0..1."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def image_to_pils(images: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE (float [B, H, W, C] in 0..1) to RGB PIL images.

    The tensor is copied first: IMAGE tensors are made under inference mode.
    """
    if images.ndim != 4:
        raise ValueError(f"expected an IMAGE batch [B, H, W, C], got a tensor of shape {tuple(images.shape)}")
    arrays = (images.detach().clone().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    out = []
    for array in arrays:
        if array.shape[-1] == 1:
            array = array[..., 0]
        out.append(Image.fromarray(array).convert("RGB"))
    return out
