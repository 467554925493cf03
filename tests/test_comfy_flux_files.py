"""The random-weight Flux.1-dev files the GPU harness trains on (tests/comfy_flux.py), on the CPU.

The streamed writer is checked on its own (no ComfyUI needed). With ``COMFYUI_PATH`` set (run
with ComfyUI's python): the real-size layout is counted on the ``meta`` device (11.9B Flux
parameters, 4.76B T5) without building it, and a reduced-depth set (1 double + 1 single block,
real widths; T5-XXL whole, ≈ 5 GB, built once and cached like tests/comfy_models.py's
checkpoints) is loaded by ComfyUI's stock UNETLoader (fp8_e4m3fn), DualCLIPLoader (flux) and
VAELoader, which must detect Flux and render one step from them.
"""

from __future__ import annotations

import json
import os

import comfy_flux
import pytest
import torch
from comfy_models import available_gib, cached_flux, run_comfy
from safetensors import safe_open

needs_comfy = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH is not set")
GB = 1e9


def _header(path) -> dict:
    """The safetensors header (key -> dtype, shape) and metadata, read without loading a tensor."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size))


def test_the_streamed_file_reads_back_and_does_not_depend_on_the_threads(tmp_path):
    specs = [
        comfy_flux.TensorSpec("blocks.0.linear.weight", (96, 64), comfy_flux.FP8, "matrix"),
        comfy_flux.TensorSpec("blocks.0.norm.scale", (64,), torch.bfloat16, "norm"),
        comfy_flux.TensorSpec("blocks.0.linear.bias", (96,), torch.float16, "vector"),
        comfy_flux.TensorSpec("head.weight", (8, 4, 3, 3), torch.float32, "matrix"),
    ]
    one = comfy_flux.write_safetensors(tmp_path / "one.safetensors", specs, seed=3, metadata={"k": "v"})
    three = comfy_flux.write_safetensors(
        tmp_path / "three.safetensors", specs, seed=3, metadata={"k": "v"}, threads=3
    )
    assert one == three
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "three.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one.safetensors",
        "three.safetensors",
    ]  # no temp left
    with safe_open(tmp_path / "one.safetensors", framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == {
        s.key: (s.dtype, s.shape) for s in specs
    }
    weight = tensors["blocks.0.linear.weight"].float()
    assert 0.6 < weight.std().item() * 64**0.5 < 1.4  # N(0, 1/fan_in), through fp8
    assert abs(tensors["blocks.0.norm.scale"].float().mean().item() - 1.0) < 0.05
    assert tensors["blocks.0.linear.bias"].float().abs().max().item() < 0.1
    assert torch.equal(tensors["head.weight"], comfy_flux.draw(specs[3], 3))  # seeded by name
    assert not torch.equal(comfy_flux.draw(specs[3], 3), comfy_flux.draw(specs[3], 4))


@needs_comfy
def test_the_real_size_files_have_flux1_devs_parameters_in_fp8():
    import comfy_tiny

    comfy_tiny.import_comfy()
    unet = comfy_flux.flux_specs()
    t5 = comfy_flux.t5xxl_specs()
    assert (len(unet), sum(s.numel for s in unet)) == (780, 11_901_408_320)
    assert sum(s.nbytes for s in unet) / GB == pytest.approx(11.90, abs=0.01)  # fp8 matrices, bf16 vectors
    assert sum(s.numel for s in t5) == 4_762_310_656 and {s.dtype for s in t5} == {comfy_flux.FP8}
    blocks = {s.key.split(".")[0] + "." + s.key.split(".")[1] for s in unet if "blocks." in s.key}
    assert len([b for b in blocks if b.startswith("double_blocks.")]) == 19
    assert len([b for b in blocks if b.startswith("single_blocks.")]) == 38
    # ComfyUI's detection, from the keys, shapes and dtypes alone: Flux with Flux.1-dev's exact config
    found = comfy_flux.detected({"unet": unet, "t5xxl": t5, "clip_l": comfy_flux.clip_l_specs()})
    assert (found["unet"], found["unet_config"]) == ("Flux", comfy_flux.FLUX_DEV_CONFIG)
    assert (found["t5xxl"], found["t5xxl_dtype"], found["clip_l"]) == (
        "T5_XXL",
        "torch.float8_e4m3fn",
        "CLIP_L",
    )


@pytest.fixture(scope="module")
def reduced():
    if available_gib() < 12:
        pytest.skip(f"loading T5-XXL on the CPU needs ~12 GB of free memory; {available_gib():.1f} GB free")
    return cached_flux(depth=1, single_depth=1)


@needs_comfy
def test_the_reduced_files_are_laid_out_as_the_downloads(reduced):
    assert sorted(p.name for p in reduced.iterdir()) == sorted(name for _, name in comfy_flux.FILES.values())
    unet = _header(reduced / "flux1-dev.safetensors")
    assert unet["__metadata__"] == {"comfy_models.build": "flux unet seed 0 depth 1/1"}
    assert (unet["single_blocks.0.linear1.weight"]["dtype"], unet["single_blocks.0.linear1.weight"]["shape"]) == (
        "F8_E4M3", [21504, 3072],
    )  # fmt: skip
    assert (
        unet["double_blocks.0.img_attn.norm.query_norm.scale"]["dtype"] == "BF16"
    )  # BFL's name, not ".weight"
    assert unet["guidance_in.in_layer.weight"]["shape"] == [3072, 256]
    assert (unet["img_in.weight"]["shape"], unet["txt_in.weight"]["shape"]) == ([3072, 64], [3072, 4096])
    assert not any(k.startswith(("double_blocks.1.", "single_blocks.1.")) for k in unet)
    t5 = _header(reduced / "t5xxl_fp8_e4m3fn.safetensors")
    wi_1 = t5["encoder.block.23.layer.1.DenseReluDense.wi_1.weight"]  # what detect_te_model reads: T5-XXL
    assert (wi_1["dtype"], wi_1["shape"]) == ("F8_E4M3", [10240, 4096])
    assert t5["encoder.final_layer_norm.weight"]["dtype"] == "F8_E4M3"  # ComfyUI reads the T5's dtype here
    clip = _header(reduced / "clip_l.safetensors")
    assert clip["text_model.encoder.layers.11.mlp.fc1.weight"]["dtype"] == "F16"
    vae = _header(reduced / "ae.safetensors")
    assert vae["decoder.conv_in.weight"]["shape"] == [512, 16, 3, 3] and "post_quant_conv.weight" not in vae


@needs_comfy
def test_stock_loaders_detect_flux_and_render_from_the_reduced_files(reduced, tmp_path):
    run_comfy("check-flux", "--folder", str(reduced), "--out", str(tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    unet = report["unet"]
    assert (unet["class"], unet["model_class"], unet["latent_format"]) == ("Flux", "Flux", "Flux")
    assert unet["config"] == {
        "hidden_size": 3072, "depth": 1, "depth_single_blocks": 1, "guidance_embed": True,
        "context_in_dim": 4096, "vec_in_dim": 768, "num_heads": 24,
    }  # fmt: skip
    assert (unet["weight_dtype"], unet["norm_dtype"]) == ("torch.float8_e4m3fn", "torch.float8_e4m3fn")
    clip = report["clip"]
    assert clip["class"].startswith("FluxClipModel")
    assert (clip["t5_dtype"], clip["cond_shape"], clip["pooled_shape"]) == (
        "torch.float8_e4m3fn",
        [1, 256, 4096],
        [1, 768],
    )
    assert clip["cond_finite"]
    assert report["vae"] == {"class": "AutoencodingEngine", "latent_channels": 16}
    render = report["render"]
    assert (render["latent_shape"], render["image_shape"]) == ([1, 16, 8, 8], [1, 64, 64, 3])
    assert render["latent_finite"] and render["image_finite"]
    assert report["key_messages"] == []  # no missing, unexpected or left-over key


@needs_comfy
def test_the_t5xxl_file_fits_the_sd3_trainers_t5_encoder():
    """SD3 Medium's row gives the file-name trainer this fp8 T5-XXL: its tensors are exactly the
    shipped T5EncoderModel config's (shared.weight standing in for the tied embed_tokens), in fp8,
    which the trainer's loader casts to its compute dtype."""
    import comfy_tiny
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    from trainer.models.configs import CONFIG_ROOT

    comfy_tiny.import_comfy()
    config = T5Config.from_pretrained(str(CONFIG_ROOT / "sd3" / "text_encoder_3"), local_files_only=True)
    with init_empty_weights():
        wanted = {k: tuple(v.shape) for k, v in T5EncoderModel(config).state_dict().items()}
    specs = comfy_flux.t5xxl_specs()
    got = {s.key: tuple(s.shape) for s in specs}
    assert set(wanted) - set(got) == {"encoder.embed_tokens.weight"} and set(got) <= set(wanted)
    assert all(got[k] == wanted[k] for k in got)
    assert {s.dtype for s in specs} == {torch.float8_e4m3fn}
