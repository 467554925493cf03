"""fp8 storage of a LoRA run's frozen base weights, computed in bf16.

A frozen ``nn.Linear`` / ``nn.Conv2d`` keeps its weight as ``float8_e4m3fn`` with one fp32 scale
per tensor (amax / 448, so the largest weight lands on fp8's largest normal value) and hands out
``weight`` upcast to the compute dtype at each use. That halves the base model's memory against
bf16 (SDXL's UNet: 4.8 → 2.4 GiB), as kohya's ``--fp8_base`` does, at the cost of one cast per
layer per forward. Everything that reads ``module.weight`` — the layer's own forward, peft's LoRA
wrapper around it, the grouped q/k/v products — gets the upcast tensor, so LoRA layers work
unchanged; the LoRA weights themselves (trained, fp32) are never touched.

The small input/output convolutions (fewer than :data:`MIN_WEIGHTS` weights) stay as they are:
they cost nothing and are where rounding hurts most.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
#: Layers smaller than this keep their weight (SDXL's conv_in/conv_out have 11,520).
MIN_WEIGHTS = 65_536


class _Fp8Weight:
    """Mixed into a Linear/Conv2d class: ``weight`` is the fp8 buffer, upcast on read."""

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    compute_dtype: torch.dtype

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.weight_fp8.to(self.compute_dtype) * self.weight_scale.to(self.compute_dtype)


class Fp8Linear(_Fp8Weight, nn.Linear):
    """An ``nn.Linear`` whose frozen weight is stored in fp8."""


class Fp8Conv2d(_Fp8Weight, nn.Conv2d):
    """An ``nn.Conv2d`` whose frozen weight is stored in fp8."""


_CLASSES: dict[type, type] = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d}


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 tensor, fp32 scale)`` with ``fp8 * scale ≈ weight`` (per-tensor scaling)."""
    w = weight.detach().float()
    amax = w.abs().max().clamp(min=1e-12)
    scale = (amax / FP8_MAX).reshape(())
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def store_fp8(model: nn.Module, *, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Store every frozen Linear/Conv2d weight of ``model`` in fp8; returns how many layers.

    Call it after the LoRA layers are added (peft wraps the original layer as ``base_layer``; the
    base layer is converted, the trained ``lora_A``/``lora_B`` are not, since they need gradients).

    Args:
        model: the denoiser, already on its device.
        compute_dtype: the dtype the weights are upcast to at each use (the autocast dtype).
    """
    count = 0
    for module in model.modules():
        cls = _CLASSES.get(type(module))
        if cls is None:
            continue
        weight = module.weight
        if weight.requires_grad or weight.numel() < MIN_WEIGHTS:
            continue
        data, scale = quantize(weight)
        del module._parameters["weight"]
        module.register_buffer("weight_fp8", data)
        module.register_buffer("weight_scale", scale.to(weight.device))
        module.compute_dtype = compute_dtype
        module.__class__ = cls
        count += 1
    return count


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (fp8 ones count one byte each)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
