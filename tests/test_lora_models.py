"""Tiny SD1.5 / SDXL / SD3 models for the LoRA tests, and the target presets measured on them.

The builders live here (imported by the other test_lora_* files) so the LoRA tests do not depend
on trainer/models; they are real diffusers/transformers architectures with a few channels.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from trainer.config import Arch, LoraTargets
from trainer.lora import target_modules


def tiny_sd15_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=4,
    ).eval()


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 16,
    ).eval()


def tiny_sd3_transformer(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()


def _clip_config(**extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1000,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=2,
        **extra,
    )


def tiny_clip(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(_clip_config()).eval()


def tiny_clip_with_projection(seed: int = 0) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_clip_config(projection_dim=16)).eval()


def tiny_t5(seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4, vocab_size=100, feed_forward_proj="gated-gelu"
    )
    return T5EncoderModel(config).eval()


def tiny_model(arch: Arch, seed: int = 0) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """(denoiser, text encoders in pipeline order) of a tiny ``arch`` model."""
    if arch is Arch.SD15:
        return tiny_sd15_unet(seed), [tiny_clip(seed + 1)]
    if arch is Arch.SDXL:
        return tiny_sdxl_unet(seed), [tiny_clip(seed + 1), tiny_clip_with_projection(seed + 2)]
    return tiny_sd3_transformer(seed), [
        tiny_clip_with_projection(seed + 1),
        tiny_clip_with_projection(seed + 2),
        tiny_t5(seed + 3),
    ]


def denoise(arch: Arch, denoiser: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """One deterministic forward pass of the tiny denoiser."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        if arch is Arch.SD3:
            pooled = torch.randn(1, 16, generator=g)
            return denoiser(
                latents,
                encoder_hidden_states=context,
                pooled_projections=pooled,
                timestep=torch.tensor([500]),
            ).sample
        extra = {}
        if arch is Arch.SDXL:
            extra = {
                "added_cond_kwargs": {
                    "text_embeds": torch.randn(1, 16, generator=g),
                    "time_ids": torch.randn(1, 6, generator=g),
                }
            }
        return denoiser(latents, torch.tensor([500]), encoder_hidden_states=context, **extra).sample


def encode(text_encoder: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(input_ids=torch.tensor([[0, 5, 17, 99, 2]])).last_hidden_state


# ------------------------------------------------------------------------------------------------
# Target presets


SD15_ATTENTION_BLOCKS = [
    "down_blocks.0.attentions.0.transformer_blocks.0",
    "mid_block.attentions.0.transformer_blocks.0",
    "up_blocks.1.attentions.0.transformer_blocks.0",
    "up_blocks.1.attentions.1.transformer_blocks.0",
]


def test_sd15_attention_preset_is_exactly_the_attention_projections():
    names = target_modules(Arch.SD15, LoraTargets.ATTENTION, tiny_sd15_unet(), part="denoiser")
    expected = sorted(
        f"{block}.{attn}.{proj}"
        for block in SD15_ATTENTION_BLOCKS
        for attn in ("attn1", "attn2")
        for proj in ("to_q", "to_k", "to_v", "to_out.0")
    )
    assert names == expected
    assert len(names) == 32


def test_sd15_ff_preset_adds_feed_forward_and_transformer_projections():
    unet = tiny_sd15_unet()
    attention = set(target_modules(Arch.SD15, "attention", unet, part="denoiser"))
    with_ff = set(target_modules(Arch.SD15, "attention+ff", unet, part="denoiser"))
    blocks = [b.rsplit(".transformer_blocks", 1)[0] for b in SD15_ATTENTION_BLOCKS]
    added = {f"{b}.ff.net.0.proj" for b in SD15_ATTENTION_BLOCKS} | {
        f"{b}.ff.net.2" for b in SD15_ATTENTION_BLOCKS
    }
    added |= {f"{b}.proj_in" for b in blocks} | {f"{b}.proj_out" for b in blocks}
    assert with_ff - attention == added
    assert attention < with_ff
    assert len(with_ff) == 48


def test_sd15_conv_preset_adds_resnets_and_samplers_but_not_the_stem():
    unet = tiny_sd15_unet()
    with_ff = set(target_modules(Arch.SD15, "attention+ff", unet, part="denoiser"))
    with_conv = set(target_modules(Arch.SD15, "attention+ff+conv", unet, part="denoiser"))
    added = with_conv - with_ff
    assert len(added) == 31
    assert {
        "down_blocks.0.resnets.0.conv1",
        "down_blocks.0.resnets.0.time_emb_proj",
        "down_blocks.1.resnets.0.conv_shortcut",
        "down_blocks.0.downsamplers.0.conv",
        "up_blocks.0.upsamplers.0.conv",
        "mid_block.resnets.1.conv2",
    } <= added
    assert not added & {"conv_in", "conv_out", "time_embedding.linear_1"}
    assert with_ff < with_conv


def test_sdxl_attention_preset_counts_every_transformer_layer():
    names = target_modules(Arch.SDXL, LoraTargets.ATTENTION, tiny_sdxl_unet(), part="denoiser")
    # down_blocks.1: 1 attention x 2 layers; up_blocks.0: 2 attentions x 2 layers; mid: 1 x 2 layers.
    assert len(names) == (2 + 4 + 2) * 8
    assert "up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_out.0" in names
    assert not any(n.startswith("add_embedding") for n in names)


def test_sd3_presets_cover_both_streams_and_skip_missing_context_layers(caplog):
    model = tiny_sd3_transformer()
    attention = target_modules(Arch.SD3, "attention", model, part="denoiser")
    assert attention == sorted(
        [
            f"transformer_blocks.0.attn.{p}"
            for p in (
                "to_q",
                "to_k",
                "to_v",
                "to_out.0",
                "add_q_proj",
                "add_k_proj",
                "add_v_proj",
                "to_add_out",
            )
        ]
        # The last block only reads the context stream: it has no to_add_out.
        + [
            f"transformer_blocks.1.attn.{p}"
            for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")
        ]
    )
    with_ff = target_modules(Arch.SD3, "attention+ff", model, part="denoiser")
    assert sorted(set(with_ff) - set(attention)) == [
        "transformer_blocks.0.ff.net.0.proj",
        "transformer_blocks.0.ff.net.2",
        "transformer_blocks.0.ff_context.net.0.proj",
        "transformer_blocks.0.ff_context.net.2",
        "transformer_blocks.1.ff.net.0.proj",
        "transformer_blocks.1.ff.net.2",
    ]
    with caplog.at_level(logging.WARNING, logger="finetune"):
        assert target_modules(Arch.SD3, "attention+ff+conv", model, part="denoiser") == with_ff
    assert "SD3 has no convolution layers" in caplog.text


def test_text_encoder_presets_for_clip_and_t5():
    clip = tiny_clip()
    # transformers 5 dropped the text_model. level of CLIPTextModel; keys.py puts it back for files.
    assert target_modules(Arch.SD15, "attention", clip, part="text_encoder") == sorted(
        f"encoder.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "k", "v", "out")
    )
    assert len(target_modules(Arch.SD15, "attention+ff", clip, part="text_encoder")) == 12
    projected = target_modules(Arch.SDXL, "attention+ff", tiny_clip_with_projection(), part="text_encoder")
    assert projected[0] == "text_model.encoder.layers.0.mlp.fc1"
    assert "text_projection" not in projected
    t5 = target_modules(Arch.SD3, "attention+ff+conv", tiny_t5(), part="text_encoder")
    assert t5 == sorted(
        [f"encoder.block.0.layer.0.SelfAttention.{p}" for p in "qkvo"]
        + [f"encoder.block.0.layer.1.DenseReluDense.{p}" for p in ("wi_0", "wi_1", "wo")]
    )


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        target_modules(Arch.SD15, "everything", tiny_clip(), part="text_encoder")
    assert str(err.value) == (
        "lora_targets: unknown preset 'everything'; valid presets are 'attention', 'attention+ff', 'attention+ff+conv'"
    )


def test_wrong_model_or_unresolved_arch_is_refused():
    with pytest.raises(
        ValueError, match="found no 'attention' layers for the denoiser of arch 'sd3' in UNet2DConditionModel"
    ):
        target_modules(Arch.SD3, "attention", tiny_sd15_unet(), part="denoiser")
    with pytest.raises(ValueError, match="'auto' must be resolved"):
        target_modules(Arch.AUTO, "attention", tiny_clip(), part="text_encoder")
    with pytest.raises(ValueError, match="part: 'unet' is not one of denoiser, text_encoder"):
        target_modules(Arch.SD15, "attention", tiny_clip(), part="unet")
