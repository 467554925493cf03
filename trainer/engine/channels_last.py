"""Channels-last UNets: activations stay NHWC from the first convolution to the last.

cuDNN runs bf16 convolutions in NHWC; handed NCHW tensors it transposes every input and output
(7 ms and 200 kernels of an SDXL 1024 px LoRA step on an H100). Channels-last weights alone do
not keep the activations NHWC, because diffusers' ``Transformer2DModel`` ends with
``.contiguous()``: every attention stage hands NCHW back to the next convolution.
:class:`ChannelsLastTransformer2D` leaves that copy out, so its output has its input's layout.
Its input side needs no change: for an NHWC input, diffusers' permute-and-reshape to tokens is a
view, and its GroupNorm, compiled as :mod:`.speed` does, reads NHWC directly. Only UNets whose
stages project with linear layers (SDXL) are converted; see :func:`convert` for SD1.5.

Compiled GroupNorm on NHWC is slow as written: each group's statistics reduce over channels that
lie apart in memory (in an SDXL step some of those kernels ran at a sixth of the memory
bandwidth). :class:`ChannelsLastGroupNorm` takes the statistics per channel first, a reduction
over pixels that reads memory in order, then combines a group's channels exactly: its variance is
the mean of the channels' variances plus the variance of their means.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn


class ChannelsLastGroupNorm(nn.GroupNorm):
    """``GroupNorm`` with per-channel statistics combined per group (same result to rounding).

    Any input other than a 4-D NHWC tensor goes through ``nn.GroupNorm``'s own forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        batch, channels = x.shape[:2]
        shape = (batch, self.num_groups, channels // self.num_groups)
        # fp32 statistics and output, as autocast runs group_norm.
        xf = x.float()
        var_c, mean_c = torch.var_mean(xf, dim=(2, 3), correction=0)
        mean_c, var_c = mean_c.view(shape), var_c.view(shape)
        mean = mean_c.mean(-1, keepdim=True)
        var = (var_c + (mean_c - mean).square()).mean(-1, keepdim=True)
        rstd = torch.rsqrt(var + self.eps)
        scale = rstd.expand(shape).reshape(batch, channels)
        shift = (-mean * rstd).expand(shape).reshape(batch, channels)
        if self.affine:
            weight = self.weight.float()
            scale, shift = scale * weight, shift * weight + self.bias.float()
        out = xf * scale[:, :, None, None] + shift[:, :, None, None]
        return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)


class ChannelsLastTransformer2D(Transformer2DModel):
    """``Transformer2DModel`` with linear projections whose output keeps the input's NHWC layout
    (same parameters)."""

    def _get_output_for_continuous_inputs(
        self, hidden_states, residual, batch_size, height, width, inner_dim
    ):
        # (B, H*W, C) tokens reshaped to (B, H, W, C) and permuted to NCHW sizes are NHWC in memory.
        hidden_states = self.proj_out(hidden_states)
        return hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2) + residual


def convert(model: nn.Module, *, group_norm: bool = True) -> bool:
    """Make a UNet channels-last: 4-D weights NHWC, transformer stages keeping NHWC and (with
    ``group_norm``) GroupNorms taking per-channel statistics.

    The first convolution turns an NCHW input NHWC (cuDNN follows the weight's layout), so callers
    pass inputs as they are. LoRA and full-model saves make tensors contiguous, so files do not
    change. Left as they are: a model without ResNet blocks (SD3's transformer, whose only
    convolution is the patch embedding) and a UNet whose transformer stages project with 1x1
    convolutions (SD1.5). Compiled channels-last with dynamic shapes, SD1.5 met two inductor
    faults in torch 2.11: its stages' permuted views ("cannot determine truth value of
    Relational") and a stride assertion at its 8x8 level. :func:`restore` turns the classes back.

    Returns:
        Whether ``model`` was converted.
    """
    from diffusers.models.resnet import ResnetBlock2D

    stages = [m for m in model.modules() if type(m) is Transformer2DModel and m.is_input_continuous]
    if not any(isinstance(m, ResnetBlock2D) for m in model.modules()):
        return False
    if not all(stage.use_linear_projection for stage in stages):
        return False
    model.to(memory_format=torch.channels_last)
    for stage in stages:
        stage.__class__ = ChannelsLastTransformer2D
    for module in model.modules():
        if group_norm and type(module) is nn.GroupNorm:
            module.__class__ = ChannelsLastGroupNorm
    return True


def restore(model: nn.Module) -> None:
    """Turn the classes :func:`convert` changed back (weights keep their layout)."""
    for module in model.modules():
        if type(module) is ChannelsLastTransformer2D:
            module.__class__ = Transformer2DModel
        elif type(module) is ChannelsLastGroupNorm:
            module.__class__ = nn.GroupNorm
