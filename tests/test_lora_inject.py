"""add_lora / remove_lora / merge_lora on tiny real models."""

from __future__ import annotations

import copy

import pytest
import torch
from test_lora_models import denoise, encode, tiny_clip, tiny_sd15_unet

from trainer.config import Arch
from trainer.lora import add_lora, lora_layers, lora_parameters, merge_lora, remove_lora, target_modules

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"


def _randomize_b(module: torch.nn.Module, seed: int) -> None:
    """Training stand-in: give every lora_B non-zero values (lora_B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(module).values():
            weight = layer.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=g) * 0.1)


def test_add_lora_freezes_the_base_and_starts_as_a_no_op():
    unet = tiny_sd15_unet()
    before = denoise(Arch.SD15, unet)
    names = target_modules(Arch.SD15, "attention", unet, part="denoiser")
    params = add_lora(unet, names, rank=4, alpha=4.0, seed=1)

    assert len(params) == 2 * len(names) == 64
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params)
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}
    assert params == lora_parameters(unet)
    assert sorted(lora_layers(unet)) == names
    assert torch.equal(denoise(Arch.SD15, unet), before)


def test_lora_weights_stay_fp32_on_a_bf16_base():
    clip = tiny_clip().to(torch.bfloat16)
    names = target_modules(Arch.SD15, "attention+ff", clip, part="text_encoder")
    params = add_lora(clip, names, rank=2, alpha=1.0, seed=0)
    assert {p.dtype for p in params} == {torch.float32}
    layer = lora_layers(clip)["encoder.layers.0.self_attn.q_proj"]
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    assert encode(clip).dtype == torch.bfloat16


def test_init_is_seeded_per_module_and_ignores_the_global_rng():
    def lora_a(seed: int, names: list[str]) -> torch.Tensor:
        unet = tiny_sd15_unet()
        torch.manual_seed(12345 + seed)  # a different global RNG state every time
        add_lora(unet, names, rank=4, alpha=4.0, seed=seed)
        return lora_layers(unet)[Q].lora_A["default"].weight.detach().clone()

    all_names = target_modules(Arch.SD15, "attention", tiny_sd15_unet(), part="denoiser")
    first = lora_a(7, all_names)
    assert torch.equal(first, lora_a(7, all_names))
    assert torch.equal(first, lora_a(7, [Q]))  # the same layer gets the same init whatever else is LoRA'd
    assert not torch.equal(first, lora_a(8, all_names))
    # kaiming_uniform(a=sqrt(5)) bound is 1/sqrt(fan_in); to_q has 32 inputs.
    assert first.abs().max().item() <= 1 / 32**0.5
    assert first.abs().max().item() > 0.5 / 32**0.5


def test_merge_applies_alpha_over_rank_on_linear_and_conv():
    unet = tiny_sd15_unet()
    w_q = unet.get_submodule(Q).weight.detach().clone()
    w_conv = unet.get_submodule(CONV).weight.detach().clone()
    add_lora(unet, [Q, CONV], rank=4, alpha=2.0, seed=3)
    _randomize_b(unet, 5)
    layers = lora_layers(unet)
    down_q, up_q = (
        layers[Q].lora_A["default"].weight.detach().clone(),
        layers[Q].lora_B["default"].weight.detach().clone(),
    )
    down_c, up_c = (
        layers[CONV].lora_A["default"].weight.detach().clone(),
        layers[CONV].lora_B["default"].weight.detach().clone(),
    )
    assert tuple(down_c.shape) == (4, 32, 3, 3) and tuple(up_c.shape) == (
        32,
        4,
        1,
        1,
    )  # kohya's conv LoRA shapes
    with_lora = denoise(Arch.SD15, unet)

    assert merge_lora(unet) == 2
    assert not lora_layers(unet) and not hasattr(unet, "peft_config")
    assert type(unet.get_submodule(Q)) is torch.nn.Linear
    delta_q = unet.get_submodule(Q).weight.detach() - w_q
    torch.testing.assert_close(delta_q, 0.5 * up_q @ down_q, atol=1e-6, rtol=1e-5)
    delta_c = unet.get_submodule(CONV).weight.detach() - w_conv
    expected_c = 0.5 * (up_c.flatten(1) @ down_c.flatten(1)).reshape(w_conv.shape)  # ComfyUI's formula
    torch.testing.assert_close(delta_c, expected_c, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(denoise(Arch.SD15, unet), with_lora, atol=1e-5, rtol=1e-5)


def test_remove_lora_restores_the_original_layers():
    unet = tiny_sd15_unet()
    original = copy.deepcopy(unet)
    names = target_modules(Arch.SD15, "attention+ff+conv", unet, part="denoiser")
    add_lora(unet, names, rank=2, alpha=2.0, seed=0)
    _randomize_b(unet, 1)
    assert not torch.equal(denoise(Arch.SD15, unet), denoise(Arch.SD15, original))
    assert remove_lora(unet) == len(names) == 79
    assert torch.equal(denoise(Arch.SD15, unet), denoise(Arch.SD15, original))
    assert [n for n, _ in unet.named_modules()] == [n for n, _ in original.named_modules()]


def test_bad_arguments_are_refused_with_the_value():
    unet = tiny_sd15_unet()
    with pytest.raises(ValueError, match="rank: 0 must be a whole number >= 1"):
        add_lora(unet, [Q], rank=0, alpha=1.0)
    with pytest.raises(ValueError, match=r"dropout: 1.5 must be in \[0, 1\)"):
        add_lora(unet, [Q], rank=1, alpha=1.0, dropout=1.5)
    with pytest.raises(
        ValueError, match="1 name\\(s\\) are not modules of UNet2DConditionModel, e.g. 'attn1.to_q'"
    ):
        add_lora(unet, ["attn1.to_q"], rank=1, alpha=1.0)
    with pytest.raises(
        ValueError, match="'conv_norm_out' is a GroupNorm; LoRA goes on Linear and Conv2d layers only"
    ):
        add_lora(unet, ["conv_norm_out"], rank=1, alpha=1.0)
    add_lora(unet, [Q], rank=1, alpha=1.0)
    with pytest.raises(ValueError, match="already has a LoRA adapter 'default'; call remove_lora"):
        add_lora(unet, [Q], rank=1, alpha=1.0)
