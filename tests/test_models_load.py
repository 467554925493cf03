"""load_base_model: diffusers folders and single files load to exactly the weights they were saved from."""

import hashlib
import logging

import pytest
import torch

from trainer.config import Arch
from trainer.models.convert import bundle_to_original, clip_to_original, openclip_to_original, t5_to_original
from trainer.models.errors import ModelLoadError
from trainer.models.files import save_safetensors_atomic
from trainer.models.load import load_base_model
from trainer.models.tiny import TINY_TOKENIZER_DIR, save_tiny_checkpoint, tiny_bundle

ARCHS = [Arch.SD15, Arch.SDXL, Arch.SD3]
TOK = str(TINY_TOKENIZER_DIR)


def _flat(module):
    # transformers' CLIPTextModel has no "text_model." prefix any more, the projection model does.
    return {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}


def assert_same_weights(a, b):
    sa, sb = _flat(a), _flat(b)
    assert sorted(sa) == sorted(sb)
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert different == []


def assert_same_bundle(src, loaded):
    assert loaded.arch == src.arch
    assert type(loaded.denoiser) is type(src.denoiser)
    assert_same_weights(src.denoiser, loaded.denoiser)
    assert_same_weights(src.vae, loaded.vae)
    assert len(loaded.text_encoders) == len(src.text_encoders)
    for mine, theirs in zip(src.text_encoders, loaded.text_encoders, strict=True):
        assert type(mine) is type(theirs)
        if mine is not None:
            assert_same_weights(mine, theirs)
    assert loaded.vae_scaling_factor == pytest.approx(src.vae_scaling_factor)
    assert loaded.vae_shift_factor == pytest.approx(src.vae_shift_factor)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("load")
    out = {}
    for a in ARCHS:
        b = tiny_bundle(a, seed=3)
        out[a] = {
            "bundle": b,
            "folder": save_tiny_checkpoint(b, d / a.value, single_file=False),
            "file": save_tiny_checkpoint(b, d / f"{a.value}.safetensors", single_file=True),
        }
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_diffusers_folder_roundtrip(saved, arch):
    s = saved[arch]
    loaded = load_base_model(s["folder"])
    assert_same_bundle(s["bundle"], loaded)
    assert loaded.source == s["folder"]
    assert loaded.source_hash == ""
    assert loaded.prediction_type == ("flow" if arch == Arch.SD3 else "epsilon")
    assert type(loaded.noise_scheduler).__name__ == (
        "FlowMatchEulerDiscreteScheduler" if arch == Arch.SD3 else "DDPMScheduler"
    )
    assert [type(t).__name__ for t in loaded.tokenizers if t is not None] == [
        type(t).__name__ for t in s["bundle"].tokenizers if t is not None
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_single_file_roundtrip(saved, arch):
    s = saved[arch]
    loaded = load_base_model(s["file"], config_dir=s["folder"], tokenizer_dir=TOK)
    assert_same_bundle(s["bundle"], loaded)
    assert loaded.source_hash == hashlib.sha256(open(s["file"], "rb").read()).hexdigest()
    ids = [t("a photo of a cat").input_ids for t in loaded.tokenizers]
    assert ids == [t("a photo of a cat").input_ids for t in s["bundle"].tokenizers]


def test_sdxl_second_tokenizer_pads_with_exclamation(saved):
    loaded = load_base_model(
        saved[Arch.SDXL]["file"], config_dir=saved[Arch.SDXL]["folder"], tokenizer_dir=TOK
    )
    assert [t.pad_token for t in loaded.tokenizers] == ["<|endoftext|>", "!"]
    assert [t.model_max_length for t in loaded.tokenizers] == [77, 77]


def test_sd3_file_without_text_encoders_plus_separate_clip_files(saved, tmp_path):
    s = saved[Arch.SD3]
    b = s["bundle"]
    main = tmp_path / "sd3_noclip.safetensors"
    save_safetensors_atomic(bundle_to_original(b, include_text_encoders=False), str(main))
    # ComfyUI models/clip files: plain transformers layout, no prefix.
    paths = {}
    for name, fn, te in (
        ("clip_l", clip_to_original, b.text_encoders[0]),
        ("clip_g", clip_to_original, b.text_encoders[1]),
        ("t5xxl", t5_to_original, b.text_encoders[2]),
    ):
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_safetensors_atomic(fn(te.state_dict()), paths[name])
    loaded = load_base_model(str(main), config_dir=s["folder"], tokenizer_dir=TOK, **paths)
    assert_same_bundle(b, loaded)

    without_t5 = load_base_model(
        str(main), config_dir=s["folder"], tokenizer_dir=TOK, clip_l=paths["clip_l"], clip_g=paths["clip_g"]
    )
    assert without_t5.text_encoders[2] is None
    assert without_t5.tokenizers[2] is None
    assert_same_weights(b.text_encoders[1], without_t5.text_encoders[1])

    with pytest.raises(ModelLoadError) as e:
        load_base_model(str(main), config_dir=s["folder"], tokenizer_dir=TOK)
    assert str(e.value) == (
        f"{main} holds no weights for text encoder 1 (text_encoder, expected under 'text_encoders.clip_l.'); "
        "pass clip_l= a separate text-encoder file (ComfyUI models/clip)"
    )


def test_sd3_use_t5_false_skips_it(saved):
    s = saved[Arch.SD3]
    loaded = load_base_model(s["file"], config_dir=s["folder"], tokenizer_dir=TOK, use_t5=False)
    assert loaded.text_encoders[2] is None and loaded.tokenizers[2] is None
    folder = load_base_model(s["folder"], use_t5=False)
    assert folder.text_encoders[2] is None and folder.tokenizers[2] is None


def test_sdxl_bare_unet_with_separate_vae_and_openclip(saved, tmp_path):
    from trainer.models.convert import save_diffusion_model, vae_to_original

    s = saved[Arch.SDXL]
    b = s["bundle"]
    unet = save_diffusion_model(
        b.denoiser, Arch.SDXL, str(tmp_path / "unet.safetensors"), metadata={"k": "v"}
    )
    vae = tmp_path / "vae.safetensors"
    save_safetensors_atomic(vae_to_original(b.vae.state_dict()), str(vae))
    clip_l = tmp_path / "clip_l.safetensors"
    save_safetensors_atomic(clip_to_original(b.text_encoders[0].state_dict()), str(clip_l))
    clip_g = tmp_path / "clip_g_openclip.safetensors"
    save_safetensors_atomic(openclip_to_original(b.text_encoders[1].state_dict()), str(clip_g))
    loaded = load_base_model(
        unet, config_dir=s["folder"], tokenizer_dir=TOK, vae=str(vae), clip_l=str(clip_l), clip_g=str(clip_g)
    )
    assert_same_bundle(b, loaded)
    with pytest.raises(ModelLoadError, match=r"holds no VAE .*pass vae= a VAE \.safetensors file"):
        load_base_model(unet, config_dir=s["folder"], tokenizer_dir=TOK)


def test_missing_tokenizers_say_where_they_were_looked_for(saved):
    s = saved[Arch.SD15]
    with pytest.raises(ModelLoadError) as e:
        load_base_model(s["file"], config_dir=s["folder"])
    msg = str(e.value)
    assert msg.startswith("CLIP tokenizer for text encoder 1 not found: it needs vocab.json + merges.txt.")
    assert "ComfyUI/comfy/sd1_tokenizer" in msg


def test_sd3_needs_t5_tokenizer_when_t5_loaded(saved, tmp_path):
    import shutil

    clip_only = tmp_path / "clip_only"
    shutil.copytree(TINY_TOKENIZER_DIR, clip_only, ignore=shutil.ignore_patterns("t5_tokenizer"))
    s = saved[Arch.SD3]
    with pytest.raises(
        ModelLoadError, match="T5 tokenizer not found: it needs tokenizer.json or spiece.model"
    ):
        load_base_model(s["file"], config_dir=s["folder"], tokenizer_dir=str(clip_only))
    loaded = load_base_model(s["file"], config_dir=s["folder"], tokenizer_dir=str(clip_only), use_t5=False)
    assert loaded.text_encoders[2] is None


def test_arch_mismatch_and_wrong_config(saved, tmp_path):
    s = saved[Arch.SD15]
    with pytest.raises(ModelLoadError) as e:
        load_base_model(s["file"], arch=Arch.SDXL, config_dir=s["folder"], tokenizer_dir=TOK)
    assert str(e.value) == f"{s['file']} holds a sd15 model but arch=sdxl was asked; set arch to auto or sd15"
    # A tiny file without embedded configs against the shipped real-size ones: the error names
    # the config and the fix.
    bare = tmp_path / "bare.safetensors"
    save_safetensors_atomic(bundle_to_original(s["bundle"]), str(bare))
    with pytest.raises(
        ModelLoadError,
        match=r"the UNet weights do not fit the config in .*configs/sd15/unet .*pass config_dir=",
    ):
        load_base_model(str(bare), tokenizer_dir=TOK)


def test_prediction_type_detect_and_override(saved, tmp_path):
    s = saved[Arch.SD15]
    sd = bundle_to_original(s["bundle"])
    sd["v_pred"] = torch.tensor([])
    vfile = tmp_path / "vpred.safetensors"
    save_safetensors_atomic(sd, str(vfile))
    loaded = load_base_model(str(vfile), config_dir=s["folder"], tokenizer_dir=TOK)
    assert loaded.prediction_type == "v_prediction"
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    forced = load_base_model(s["folder"], prediction_type="v_prediction")
    assert forced.noise_scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(ModelLoadError, match="SD3 is a rectified-flow model"):
        load_base_model(saved[Arch.SD3]["folder"], prediction_type="epsilon")


def test_dtype_applies_to_every_part(saved, caplog):
    loaded = load_base_model(
        saved[Arch.SDXL]["file"],
        config_dir=saved[Arch.SDXL]["folder"],
        tokenizer_dir=TOK,
        dtype=torch.bfloat16,
    )
    dtypes = {p.dtype for m in (loaded.denoiser, loaded.vae, *loaded.text_encoders) for p in m.parameters()}
    assert dtypes == {torch.bfloat16}
    # diffusers' "should be kept in float32: []" on every cast is dropped (a real list is not).
    loaded.denoiser.to(torch.float32)
    assert not [r for r in caplog.records if "kept in float32" in r.getMessage()]
    modeling = logging.getLogger("diffusers.models.modeling_utils")
    assert modeling.filter(logging.makeLogRecord({"msg": "should be kept in float32: ['norm']"}))


def test_bad_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="model file not found"):
        load_base_model(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ModelLoadError, match="is a folder without model_index.json"):
        load_base_model(str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="unsupported model file type '.gguf'"):
        load_base_model(str(tmp_path / "m.gguf"))


def test_bundle_to_and_freeze(saved):
    b = tiny_bundle(Arch.SD15)
    b.freeze()
    assert not any(p.requires_grad for m in b.frozen_modules() for p in m.parameters())
    assert all(p.requires_grad for p in b.denoiser.parameters())
    b.to("cpu", torch.float16, vae_dtype=torch.float32)
    assert b.vae.dtype == torch.float32
    assert b.text_encoders[0].dtype == torch.float16
    assert b.denoiser.dtype == torch.float32
    assert (b.vae_scale_factor, b.latent_channels, b.denoiser_name) == (2, 4, "unet")


def test_diffusers_layout_denoiser_file_with_separate_parts(saved, tmp_path):
    s = saved[Arch.SD3]
    b = s["bundle"]
    den, vae = tmp_path / "transformer.safetensors", tmp_path / "vae.safetensors"
    save_safetensors_atomic(b.denoiser.state_dict(), str(den))
    save_safetensors_atomic(b.vae.state_dict(), str(vae))  # diffusers-layout VAE
    clips = {}
    for name, te in (("clip_l", b.text_encoders[0]), ("clip_g", b.text_encoders[1])):
        clips[name] = str(tmp_path / f"{name}.safetensors")
        save_safetensors_atomic(clip_to_original(te.state_dict()), clips[name])
    loaded = load_base_model(str(den), config_dir=s["folder"], tokenizer_dir=TOK, vae=str(vae), **clips)
    assert_same_weights(b.denoiser, loaded.denoiser)
    assert_same_weights(b.vae, loaded.vae)
    assert_same_weights(b.text_encoders[1], loaded.text_encoders[1])
    assert loaded.text_encoders[2] is None


@pytest.mark.parametrize("arch", [Arch.SD15, Arch.SDXL, Arch.SD3])
def test_tiny_single_file_carries_its_configs(tmp_path, arch):
    """A file we wrote loads like a real checkpoint would from ComfyUI's folder: no config_dir."""
    bundle = tiny_bundle(arch, seed=3)
    path = save_tiny_checkpoint(bundle, tmp_path / "tiny.safetensors", single_file=True)
    # The host passes its standard CLIP tokenizer folder; the embedded tiny vocabulary must win.
    loaded = load_base_model(path, tokenizer_dir=str(tmp_path / "no-such-tokenizer"))
    assert loaded.arch == arch
    ours, theirs = bundle.denoiser.state_dict(), loaded.denoiser.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
