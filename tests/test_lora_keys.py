"""Key conversion between peft-style names and the names LoRA files use."""

from __future__ import annotations

import pytest
import torch

from trainer.config import Arch
from trainer.lora import KeyStyle, canonical_module_name, file_layout, kohya_to_peft, peft_to_kohya
from trainer.lora.keys import folds_scale, from_file_keys, legacy_layouts, split_key, to_file_keys

MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _peft(module: str) -> dict[str, torch.Tensor]:
    return {
        f"{module}.lora_A.weight": torch.ones(2, 8),
        f"{module}.lora_B.weight": torch.zeros(8, 2),
        f"{module}.alpha": torch.tensor(1.0),
    }


def test_peft_to_kohya_names_and_back():
    kohya = peft_to_kohya(_peft(MODULE), prefix="lora_unet_")
    assert sorted(kohya) == [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
    ]
    back, unmatched = kohya_to_peft(
        {
            **kohya,
            "lora_unet_nonexistent_layer.lora_up.weight": torch.zeros(1),
            "lora_te_x.alpha": torch.tensor(1.0),
        },
        prefix="lora_unet_",
        module_names=[MODULE, "down_blocks.0.attentions.0.proj_in"],
    )
    assert sorted(back) == sorted(_peft(MODULE))
    assert unmatched == ["lora_unet_nonexistent_layer.lora_up.weight"]  # other prefixes are someone else's


def test_underscores_in_module_names_survive_the_round_trip():
    # kohya names are lossy ("to_out.0" and "time_emb_proj" contain '_'); the module list resolves it.
    names = [
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
        "mid_block.resnets.0.time_emb_proj",
    ]
    state = {k: v for n in names for k, v in _peft(n).items()}
    kohya = peft_to_kohya(state, prefix="lora_unet_")
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight" in kohya
    back, unmatched = kohya_to_peft(kohya, prefix="lora_unet_", module_names=names)
    assert set(back) == set(state) and unmatched == []


def test_layouts_per_arch():
    def summary(arch):
        return [(lay.label, lay.prefix, lay.style) for lay in file_layout(arch)]

    assert summary(Arch.SD15) == [
        ("denoiser", "lora_unet_", KeyStyle.KOHYA),
        ("text_encoder[0]", "lora_te_", KeyStyle.KOHYA),
    ]
    assert summary("sdxl") == [
        ("denoiser", "lora_unet_", KeyStyle.KOHYA),
        ("text_encoder[0]", "lora_te1_", KeyStyle.KOHYA),
        ("text_encoder[1]", "lora_te2_", KeyStyle.KOHYA),
    ]
    # SD3: the names diffusers' SD3 loader reads as they are (it converts nothing) and ComfyUI maps.
    assert summary(Arch.SD3) == [
        ("denoiser", "transformer.", KeyStyle.PEFT),
        ("text_encoder[0]", "text_encoder.", KeyStyle.PEFT),
        ("text_encoder[1]", "text_encoder_2.", KeyStyle.PEFT),
        ("text_encoder[2]", "lora_te3_", KeyStyle.KOHYA),
    ]
    assert [(lay.label, lay.prefix) for lay in legacy_layouts(Arch.SD3)] == [
        ("text_encoder[0]", "lora_te1_"),
        ("text_encoder[1]", "lora_te2_"),
    ]
    assert legacy_layouts(Arch.SDXL) == ()
    assert [folds_scale(a) for a in (Arch.SD15, Arch.SDXL, Arch.SD3)] == [False, False, True]
    with pytest.raises(ValueError, match="arch: 'auto' has no LoRA file layout; use one of sd15, sdxl, sd3"):
        file_layout(Arch.AUTO)


def test_sd3_transformer_keys_keep_peft_names():
    sd3 = file_layout(Arch.SD3)[0]
    state = _peft("transformer_blocks.0.attn.to_q")
    named = to_file_keys(state, sd3)
    assert sorted(named) == [
        "transformer.transformer_blocks.0.attn.to_q.alpha",
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
    ]
    back, unmatched = from_file_keys(
        {**named, "transformer.transformer_blocks.9.attn.to_q.lora_A.weight": torch.zeros(1)},
        sd3,
        module_names=["transformer_blocks.0.attn.to_q"],
    )
    assert sorted(back) == sorted(state)
    assert unmatched == ["transformer.transformer_blocks.9.attn.to_q.lora_A.weight"]


def test_canonical_names_match_what_loaders_expect():
    # transformers 5 CLIPTextModel, CLIPTextModelWithProjection, T5, and torch.compile wrappers.
    assert (
        canonical_module_name("encoder.layers.3.self_attn.q_proj", part="text_encoder")
        == "text_model.encoder.layers.3.self_attn.q_proj"
    )
    assert (
        canonical_module_name("text_model.encoder.layers.3.mlp.fc1", part="text_encoder")
        == "text_model.encoder.layers.3.mlp.fc1"
    )
    assert (
        canonical_module_name("encoder.block.0.layer.0.SelfAttention.q", part="text_encoder")
        == "encoder.block.0.layer.0.SelfAttention.q"
    )
    assert (
        canonical_module_name("_orig_mod.transformer_blocks.0.attn.to_q", part="denoiser")
        == "transformer_blocks.0.attn.to_q"
    )
    assert (
        canonical_module_name("down_blocks.0.resnets.0.conv1", part="denoiser")
        == "down_blocks.0.resnets.0.conv1"
    )


def test_split_key_refuses_non_lora_keys():
    assert split_key("a.b.lora_B.weight") == ("a.b", "lora_B.weight")
    with pytest.raises(KeyError, match="'a.b.weight' is not a LoRA key"):
        split_key("a.b.weight")
