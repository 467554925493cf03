"""detect_arch / inspect_checkpoint and the guarded file reading, on tiny files of every architecture."""

import hashlib
import re

import pytest
import torch

from trainer.config import Arch
from trainer.models.convert import bundle_to_original, denoiser_to_original, vae_to_original
from trainer.models.detect import detect_arch, inspect_checkpoint
from trainer.models.errors import ModelLoadError
from trainer.models.files import read_safetensors_header, save_safetensors_atomic
from trainer.models.load import load_base_model
from trainer.models.tiny import TINY_TOKENIZER_DIR, save_tiny_checkpoint, tiny_bundle

ARCHS = [Arch.SD15, Arch.SDXL, Arch.SD3]


@pytest.fixture(scope="module")
def bundles():
    return {a: tiny_bundle(a) for a in ARCHS}


@pytest.fixture(scope="module")
def files(bundles, tmp_path_factory):
    d = tmp_path_factory.mktemp("detect")
    out = {}
    for a, b in bundles.items():
        out[a] = save_tiny_checkpoint(b, d / f"{a.value}.safetensors", single_file=True)
        out[(a, "folder")] = save_tiny_checkpoint(b, d / a.value, single_file=False)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_single_files_detected_with_parts(files, arch):
    header = read_safetensors_header(files[arch])
    info = inspect_checkpoint(header, source=files[arch])
    assert info.arch == arch
    assert info.layout == "ldm"
    assert info.has_vae is True
    assert (
        info.text_encoders == {Arch.SD15: [True], Arch.SDXL: [True, True], Arch.SD3: [True, True, True]}[arch]
    )
    assert detect_arch(list(header)) == arch  # names alone are enough


@pytest.mark.parametrize("arch", ARCHS)
def test_bare_and_diffusers_layout_denoisers_detected(bundles, arch):
    bare = denoiser_to_original(bundles[arch].denoiser, arch)
    assert inspect_checkpoint(bare).layout == "bare"
    assert detect_arch(bare) == arch
    diffusers_sd = bundles[arch].denoiser.state_dict()
    assert inspect_checkpoint(diffusers_sd).layout == "diffusers"
    assert detect_arch(diffusers_sd) == arch


def test_sd3_without_text_encoders(bundles):
    sd = bundle_to_original(bundles[Arch.SD3], include_text_encoders=False)
    info = inspect_checkpoint(sd)
    assert (info.arch, info.text_encoders, info.has_vae) == (Arch.SD3, [False, False, False], True)


def test_v_pred_marker(bundles):
    sd = dict(bundle_to_original(bundles[Arch.SD15]))
    sd["v_pred"] = torch.tensor([])
    assert inspect_checkpoint(sd).v_prediction is True


def test_truncated_file_gets_clear_error(files, tmp_path):
    data = open(files[Arch.SD15], "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as e:
        load_base_model(str(cut))
    assert str(e.value) == f"file is truncated or not a safetensors file: {cut}"
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a model at all" * 10)
    with pytest.raises(ModelLoadError, match="file is truncated or not a safetensors file"):
        load_base_model(str(garbage))


def test_vae_only_file_named(bundles, tmp_path):
    path = tmp_path / "vae.safetensors"
    save_safetensors_atomic(vae_to_original(bundles[Arch.SD15].vae.state_dict()), str(path))
    with pytest.raises(ModelLoadError) as e:
        load_base_model(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: looks like a VAE-only file; supported: SD1.5, SDXL, SD3 Medium")
    assert e.value.path == str(path)


@pytest.mark.parametrize(
    ("keys", "looks_like"),
    [
        ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": [8]}, "a Flux model"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [4, 32]}, "a LoRA file"),
        (
            {
                "model.diffusion_model.joint_blocks.0.x_block.attn.ln_q.weight": [64],
                "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": [3, 3],
            },
            "an SD3.5 model",
        ),
        (
            {
                "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3],
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 1024],
                "cond_stage_model.model.token_embedding.weight": [49408, 1024],
            },
            "an SD2.x model",
        ),
        (
            {"model.diffusion_model.input_blocks.0.0.weight": [320, 9, 3, 3]},
            "an inpainting model (9 input channels)",
        ),
        ({"text_model.encoder.layers.0.mlp.fc1.weight": [64, 32]}, "a text-encoder file"),
    ],
)
def test_unsupported_files_say_what_they_look_like(keys, looks_like):
    with pytest.raises(ModelLoadError) as e:
        detect_arch(keys, source="x.safetensors")
    assert str(e.value).startswith(f"x.safetensors: looks like {looks_like}")
    assert "supported: SD1.5, SDXL, SD3 Medium" in str(e.value)


def test_sdxl_refiner_refused():
    keys = {
        "model.diffusion_model.input_blocks.0.0.weight": [384, 4, 3, 3],
        "model.diffusion_model.label_emb.0.0.weight": [1536, 2560],
        "conditioner.embedders.0.model.text_projection": [1280, 1280],
    }
    with pytest.raises(ModelLoadError, match="looks like an SDXL refiner"):
        detect_arch(keys)


def test_unknown_file_lists_keys():
    with pytest.raises(ModelLoadError, match=re.escape("first tensor names: a.weight, b.bias")):
        detect_arch(["b.bias", "a.weight"])


def test_pickle_refused_then_allowed(bundles, files, tmp_path):
    b = bundles[Arch.SD15]
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": bundle_to_original(b), "global_step": 3}, ckpt)
    with pytest.raises(ModelLoadError, match=r"refusing to load pickle file .*model\.ckpt"):
        load_base_model(str(ckpt))
    folder = files[(Arch.SD15, "folder")]
    loaded = load_base_model(
        str(ckpt), allow_pickle=True, config_dir=folder, tokenizer_dir=str(TINY_TOKENIZER_DIR)
    )
    assert loaded.arch == Arch.SD15
    assert torch.equal(loaded.denoiser.conv_in.weight, b.denoiser.conv_in.weight)
    assert loaded.source_hash == hashlib.sha256(ckpt.read_bytes()).hexdigest()
