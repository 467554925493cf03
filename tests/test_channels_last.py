"""Channels-last UNets (trainer/engine/channels_last.py): after the conversion every convolution
but the first reads NHWC, outputs and gradients stay those of the NCHW model, and the per-channel
GroupNorm computes nn.GroupNorm. Plus the compiled glue methods of speed.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from train_helpers import unet_call

from trainer.config import Arch, TrainConfig
from trainer.engine import channels_last
from trainer.engine.runtime import Runtime
from trainer.engine.setup import prepare_trainables
from trainer.engine.speed import compile_methods, compile_regions
from trainer.models.tiny import tiny_bundle


def _nchw_conv_inputs(unet, run) -> list[str]:
    names = {m: n for n, m in unet.named_modules()}
    seen: list[str] = []

    def hook(module, args):
        if not args[0].is_contiguous(memory_format=torch.channels_last):
            seen.append(names[module])

    handles = [m.register_forward_pre_hook(hook) for m in unet.modules() if isinstance(m, nn.Conv2d)]
    run()
    for h in handles:
        h.remove()
    return seen


def test_a_converted_unet_stays_nhwc_and_computes_the_same():
    arch = Arch.SDXL
    bundle = tiny_bundle(arch, seed=0)
    config = TrainConfig(mixed_precision="fp32", lora_rank=4, lora_alpha=4.0, seed=1)
    trainables = prepare_trainables(bundle, config, Runtime(precision="fp32", device="cpu"))
    with torch.no_grad():
        for p in trainables.denoiser:
            p.normal_(0, 0.1)  # lora_B starts at zero; give the LoRA a part in the output
    unet = bundle.denoiser
    run = unet_call(unet, arch)

    def loss_and_grads():
        for p in trainables.denoiser:
            p.grad = None
        out = run()
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in trainables.denoiser]

    want, want_grads = loss_and_grads()

    # In training, diffusers makes a ResNet shortcut's input contiguous (NCHW) for DDP's sake; the
    # compiled blocks' layout optimisation absorbs that copy, so the layout is checked in eval.
    unet.eval()
    # Weights alone: the transformer stages hand NCHW to the convolutions after them.
    unet.to(memory_format=torch.channels_last)
    assert len(_nchw_conv_inputs(unet, run)) > 1

    assert channels_last.convert(unet) is True
    assert _nchw_conv_inputs(unet, run) == ["conv_in"]  # the latents arrive NCHW
    unet.train()
    assert any(type(m) is channels_last.ChannelsLastGroupNorm for m in unet.modules())
    got, got_grads = loss_and_grads()
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-6)

    channels_last.restore(unet)
    assert not any(
        type(m) in (channels_last.ChannelsLastGroupNorm, channels_last.ChannelsLastTransformer2D)
        for m in unet.modules()
    )


@pytest.mark.parametrize("arch", [Arch.SD3, Arch.SD15])
def test_sd3_and_sd15_are_left_as_they_are(arch):
    # SD3 has no convolutions to speak of; SD1.5's 1x1-convolution stages meet inductor faults.
    model = tiny_bundle(arch, seed=0).denoiser
    assert channels_last.convert(model) is False
    assert all(p.is_contiguous() for p in model.parameters())
    assert not any(type(m) is channels_last.ChannelsLastGroupNorm for m in model.modules())


@pytest.mark.parametrize("affine", [True, False])
def test_per_channel_group_norm_computes_group_norm(affine):
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 24, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    # Channel means far from zero: the per-group variance must include the spread of the means.
    x = torch.randn(2, 24, 5, 7) * 3 + torch.arange(24.0).view(1, 24, 1, 1)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    want = norm(x)
    want_grads = torch.autograd.grad(want.square().sum(), [x, *norm.parameters()])

    norm.__class__ = channels_last.ChannelsLastGroupNorm
    got = norm(x)
    got_grads = torch.autograd.grad(got.square().sum(), [x, *norm.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3)
    assert got.is_contiguous(memory_format=torch.channels_last)
    # An NCHW input takes nn.GroupNorm's own path.
    plain = x.detach().contiguous()
    assert torch.equal(norm(plain), nn.GroupNorm.forward(norm, plain))


def test_glue_methods_compile_once_per_instance_and_not_inside_a_region():
    import torch._dynamo

    torch._dynamo.reset()
    unet = tiny_bundle(Arch.SD15, seed=0).denoiser
    run = unet_call(unet, Arch.SD15)
    with torch.no_grad():
        want = run()
    stages = [m for m in unet.modules() if type(m).__name__ == "Transformer2DModel"]
    assert compile_methods(unet, backend="eager") == 2 * len(stages)
    assert all("_get_output_for_continuous_inputs" in vars(m) for m in stages)
    with torch.no_grad():
        torch.testing.assert_close(run(), want)

    unet = tiny_bundle(Arch.SD15, seed=0).denoiser
    assert compile_regions(unet, class_names=("Transformer2DModel",), backend="eager") == len(stages)
    assert compile_methods(unet, backend="eager") == 0  # left to the compiled stage
    torch._dynamo.reset()


def test_a_method_name_without_its_class_is_an_error():
    with pytest.raises(ValueError, match="'forward' is not 'Class.method'"):
        compile_methods(nn.Linear(2, 2), methods=("forward",))
