"""diffusers -> original conversion: exact round trips through diffusers' own single-file converters,
real-size key layouts checked on the meta device, and save_diffusion_model's file."""

import os

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    convert_sd3_transformer_checkpoint_to_diffusers,
)
from safetensors import safe_open

from trainer.config import Arch
from trainer.models.configs import shipped_config_dir
from trainer.models.convert import (
    ConversionError,
    denoiser_to_original,
    openclip_to_original,
    save_diffusion_model,
    sd3_transformer_to_original,
    unet_to_original,
    vae_to_original,
)
from trainer.models.tiny import tiny_bundle

ARCHS = [Arch.SD15, Arch.SDXL, Arch.SD3]


@pytest.fixture(scope="module")
def bundles():
    return {a: tiny_bundle(a, seed=7) for a in ARCHS}


def _assert_identical(expected: dict, got: dict):
    assert sorted(got) == sorted(expected)
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []


@pytest.mark.parametrize("arch", [Arch.SD15, Arch.SDXL])
def test_unet_roundtrip_tiny(bundles, arch):
    unet = bundles[arch].denoiser
    original = denoiser_to_original(unet, arch)
    back = convert_ldm_unet_checkpoint(
        {"model.diffusion_model." + k: v for k, v in original.items()}, unet.config
    )
    _assert_identical(unet.state_dict(), back)


def test_sd3_roundtrip_tiny(bundles):
    t = bundles[Arch.SD3].denoiser
    original = denoiser_to_original(t, Arch.SD3)
    assert original["final_layer.adaLN_modulation.1.weight"].shape == t.norm_out.linear.weight.shape
    # The swap really happened: the original's first half is diffusers' second half.
    half = t.norm_out.linear.weight.shape[0] // 2
    assert torch.equal(
        original["final_layer.adaLN_modulation.1.weight"][:half], t.norm_out.linear.weight[half:]
    )
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    _assert_identical(t.state_dict(), back)


@pytest.mark.parametrize("arch", ARCHS)
def test_vae_roundtrip_tiny(bundles, arch):
    vae = bundles[arch].vae
    original = vae_to_original(vae.state_dict())
    assert original["encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv as in the original
    back = convert_ldm_vae_checkpoint(original, vae.config)
    _assert_identical(vae.state_dict(), back)


def test_openclip_roundtrip(bundles):
    te = bundles[Arch.SDXL].text_encoders[1]
    original = openclip_to_original(te.state_dict())
    assert "transformer.resblocks.0.attn.in_proj_weight" in original
    assert original["text_projection"].shape == te.text_projection.weight.T.shape
    back = convert_open_clip_checkpoint(
        te,
        {"conditioner.embedders.1.model." + k: v for k, v in original.items()},
        prefix="conditioner.embedders.1.model.",
    )
    _assert_identical(te.state_dict(), back)


def _meta_model(cls, arch, sub):
    with torch.device("meta"):
        return cls.from_config(cls.load_config(str(shipped_config_dir(arch) / sub)))


@pytest.mark.parametrize(
    ("arch", "n_keys", "expected_keys"),
    [
        (
            Arch.SD15,
            686,
            [
                "input_blocks.3.0.op.weight",
                "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight",
                "middle_block.1.proj_in.weight",
            ],
        ),
        (
            Arch.SDXL,
            1680,
            [
                "label_emb.0.2.weight",
                "output_blocks.2.2.conv.weight",
                "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
            ],
        ),
    ],
)
def test_real_size_unet_layout_on_meta(arch, n_keys, expected_keys):
    unet = _meta_model(UNet2DConditionModel, arch, "unet")
    original = unet_to_original(unet.state_dict(), layers_per_block=unet.config.layers_per_block)
    assert len(original) == n_keys
    assert set(expected_keys) <= set(original)
    back = convert_ldm_unet_checkpoint(
        {"model.diffusion_model." + k: v for k, v in original.items()}, unet.config
    )
    assert {k: tuple(v.shape) for k, v in back.items()} == {
        k: tuple(v.shape) for k, v in unet.state_dict().items()
    }


def test_real_size_sd3_and_vae_layout_on_meta():
    t = _meta_model(SD3Transformer2DModel, Arch.SD3, "transformer")
    original = sd3_transformer_to_original(t.state_dict())
    assert tuple(original["joint_blocks.0.x_block.attn.qkv.weight"].shape) == (3 * 1536, 1536)
    assert tuple(original["pos_embed"].shape) == (1, 192 * 192, 1536)
    assert "joint_blocks.23.context_block.attn.proj.weight" not in original  # last block is context-only
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert {k: tuple(v.shape) for k, v in back.items()} == {
        k: tuple(v.shape) for k, v in t.state_dict().items()
    }
    vae = _meta_model(AutoencoderKL, Arch.SDXL, "vae")
    assert len(vae_to_original(vae.state_dict())) == 248


def test_save_diffusion_model_file(bundles, tmp_path):
    unet = bundles[Arch.SD15].denoiser
    path = tmp_path / "out" / "model.safetensors"
    assert save_diffusion_model(unet, Arch.SD15, str(path), metadata={"ss_output_name": "demo"}) == str(path)
    assert os.listdir(path.parent) == ["model.safetensors"]  # no temporary file left behind
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"format": "pt", "ss_output_name": "demo"}
        conv_in = f.get_tensor("input_blocks.0.0.weight")
    assert not any(k.startswith("model.diffusion_model.") for k in keys)
    assert torch.equal(conv_in, unet.conv_in.weight)
    # diffusers' single-file loader reads it back (bare layout, prefix re-added) to the same weights.
    with safe_open(str(path), framework="pt") as f:
        sd = {"model.diffusion_model." + k: f.get_tensor(k) for k in f.keys()}
    _assert_identical(unet.state_dict(), convert_ldm_unet_checkpoint(sd, unet.config))


def test_save_refuses_bad_metadata_and_lora(bundles, tmp_path):
    with pytest.raises(TypeError, match="metadata must map str to str"):
        save_diffusion_model(
            bundles[Arch.SD15].denoiser, Arch.SD15, str(tmp_path / "x.safetensors"), metadata={"steps": 5}
        )
    assert not (tmp_path / "x.safetensors").exists()
    from peft import LoraConfig

    unet = tiny_bundle(Arch.SD15).denoiser
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ConversionError, match="still has LoRA layers injected"):
        save_diffusion_model(unet, Arch.SD15, str(tmp_path / "y.safetensors"))


def test_unknown_keys_are_errors():
    with pytest.raises(
        ConversionError, match=r"1 UNet key\(s\) have no original-layout equivalent: extra.weight"
    ):
        unet_to_original(
            {"conv_in.weight": torch.zeros(1), "extra.weight": torch.zeros(1)}, layers_per_block=2
        )
    with pytest.raises(ConversionError, match="q/k/v projections incomplete"):
        sd3_transformer_to_original({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)})
