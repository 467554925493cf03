"""Grouped LoRA projections (trainer/lora/projections.py): a UNet attention's q/k/v LoRAs as one
product give peft's outputs and gradients (to rounding); SD3's joint attention is left to peft."""

from __future__ import annotations

import pytest
import torch
from train_helpers import unet_call

from trainer.config import Arch, TrainConfig
from trainer.engine.runtime import Runtime
from trainer.engine.setup import prepare_trainables
from trainer.lora import projections
from trainer.models.tiny import tiny_bundle

ARCHS = [Arch.SD15, Arch.SDXL]


def _lora_model(arch: Arch, **options):
    config = TrainConfig.from_dict(
        {"mixed_precision": "fp32", "lora_rank": 4, "lora_alpha": 8.0, "seed": 1, **options}
    )
    bundle = tiny_bundle(arch, seed=0)
    trainables = prepare_trainables(bundle, config, Runtime(precision="fp32", device="cpu"))
    with torch.no_grad():  # LoRA B starts at zero; random values make every product count
        for p in trainables.denoiser:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    return bundle.denoiser, trainables.denoiser


def _forward_backward(model, params, arch: Arch, *, bf16: bool = False):
    for p in params:
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False, enabled=bf16):
        out = unet_call(model, arch)().float()
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in params]


def _attentions(model) -> list:
    return [m for m in model.modules() if hasattr(m, "set_processor")]


@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_projections_give_pefts_outputs_and_gradients(arch):
    model, params = _lora_model(arch)
    want_out, want_grads = _forward_backward(model, params, arch)
    originals = [type(m.processor) for m in _attentions(model)]

    assert projections.install(model) == len(_attentions(model))
    assert projections.install(model) == 0  # already grouped
    got_out, got_grads = _forward_backward(model, params, arch)
    torch.testing.assert_close(got_out, want_out, rtol=1e-4, atol=1e-5)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    projections.uninstall(model)
    assert [type(m.processor) for m in _attentions(model)] == originals


@pytest.mark.parametrize("arch", ARCHS)
def test_under_bf16_autocast_grouping_stays_within_pefts_bf16_error(arch):
    model, params = _lora_model(arch)
    _, exact = _forward_backward(model, params, arch)
    _, peft = _forward_backward(model, params, arch, bf16=True)
    projections.install(model)
    _, grouped = _forward_backward(model, params, arch, bf16=True)

    def error(grads):  # mean relative error of the LoRA gradients against fp32
        pairs = [(g, e) for g, e in zip(grads, exact, strict=True) if float(e.norm()) > 0]
        return sum(float((g - e).norm() / e.norm()) for g, e in pairs) / len(pairs)

    print(f"{arch.value}: bf16 gradient error vs fp32, peft {error(peft):.4f}, grouped {error(grouped):.4f}")
    assert error(grouped) <= 1.25 * error(peft)


def test_sd3_joint_attention_is_not_grouped():
    model, _ = _lora_model(Arch.SD3)
    assert projections.install(model) == 0


def test_layers_that_are_not_plain_lora_keep_pefts_forward():
    model, _ = _lora_model(Arch.SD15, lora_dropout=0.1)  # dropout draws per projection
    assert projections.install(model) == 0
    model = tiny_bundle(Arch.SD15, seed=0).denoiser  # no LoRA at all
    assert projections.install(model) == 0


def test_a_call_it_does_not_cover_goes_to_the_replaced_processor():
    model, _ = _lora_model(Arch.SD15)
    projections.install(model)
    attn = next(m for m in model.modules() if hasattr(m, "set_processor"))
    calls = []
    original = attn.processor.original

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    attn.processor.original = spy
    tokens = torch.randn(1, 4, attn.to_q.in_features)
    mask = torch.zeros(1, 4, 4)
    attn(tokens)
    assert calls == []
    attn(tokens, attention_mask=mask)
    assert len(calls) == 1
