"""The split GEGLU (trainer/engine/geglu.py) computes diffusers' GEGLU: same outputs and
gradients, in a frozen base and in a full fine-tune."""

from __future__ import annotations

import torch
from diffusers.models.activations import GEGLU

from trainer.config import Arch
from trainer.engine import geglu
from trainer.models.tiny import tiny_bundle


def test_split_geglu_gives_diffusers_outputs_and_gradients():
    torch.manual_seed(0)
    module = GEGLU(8, 12)
    x = torch.randn(2, 5, 8, requires_grad=True)
    want = module(x)
    want.square().sum().backward()
    want_grads = [x.grad.clone(), module.proj.weight.grad.clone(), module.proj.bias.grad.clone()]
    x.grad = module.proj.weight.grad = module.proj.bias.grad = None

    holder = torch.nn.Sequential(module)
    assert geglu.split(holder) == 1 and type(module) is geglu.SplitGEGLU
    got = module(x)
    got.square().sum().backward()
    torch.testing.assert_close(got, want)
    for g, w in zip([x.grad, module.proj.weight.grad, module.proj.bias.grad], want_grads, strict=True):
        torch.testing.assert_close(g, w)
    geglu.unsplit(holder)
    assert type(module) is GEGLU


def test_every_unet_geglu_is_split_and_a_wrapped_projection_is_left_alone():
    unet = tiny_bundle(Arch.SDXL, seed=0).denoiser
    count = sum(1 for m in unet.modules() if type(m) is GEGLU)
    assert count > 0 and geglu.split(unet) == count
    assert geglu.split(unet) == 0  # already split

    unet = tiny_bundle(Arch.SD15, seed=0).denoiser
    first = next(m for m in unet.modules() if type(m) is GEGLU)
    first.proj = torch.nn.Sequential(first.proj)  # stands in for a LoRA wrapper
    count = sum(1 for m in unet.modules() if type(m) is GEGLU)
    assert geglu.split(unet) == count - 1
    assert type(first) is GEGLU
