"""Saving LoRA files in the formats ComfyUI loads, and loading them back into fresh models."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from test_lora_models import denoise, encode, tiny_model

from trainer.config import Arch
from trainer.lora import (
    LoraMismatchError,
    add_lora,
    canonical_module_name,
    load_lora,
    lora_layers,
    lora_state_dict,
    part_state_dict,
    peft_to_kohya,
    read_lora,
    save_lora,
    target_modules,
)
from trainer.lora.keys import peft_to_prefixed

PREFIXES = {
    Arch.SD15: ["lora_unet_", "lora_te_"],
    Arch.SDXL: ["lora_unet_", "lora_te1_", "lora_te2_"],
    Arch.SD3: ["transformer.", "text_encoder.", "text_encoder_2.", "lora_te3_"],
}


def _train(
    arch: Arch, *, preset: str = "attention+ff+conv", rank: int = 4, alpha: float = 2.0, seed: int = 0
):
    """A tiny model with LoRA on the denoiser and every text encoder, lora_B set as if trained."""
    denoiser, encoders = tiny_model(arch)
    add_lora(
        denoiser, target_modules(arch, preset, denoiser, part="denoiser"), rank=rank, alpha=alpha, seed=seed
    )
    for te in encoders:
        add_lora(te, target_modules(arch, preset, te, part="text_encoder"), rank=rank, alpha=alpha, seed=seed)
    g = torch.Generator().manual_seed(seed + 99)
    with torch.no_grad():
        for module in [denoiser, *encoders]:
            for layer in lora_layers(module).values():
                w = layer.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    return denoiser, encoders


def _kohya_name(prefix: str, canonical: str) -> str:
    return prefix + canonical.replace(".", "_") if prefix.startswith("lora_") else prefix + canonical


def _expected_modules(arch: Arch, denoiser, encoders) -> set[str]:
    """The file module names implied by the model's LoRA layers."""
    prefixes = PREFIXES[arch]
    names = {
        _kohya_name(prefixes[0], canonical_module_name(n, part="denoiser")) for n in lora_layers(denoiser)
    }
    for prefix, te in zip(prefixes[1:], encoders, strict=True):
        names |= {_kohya_name(prefix, canonical_module_name(n, part="text_encoder")) for n in lora_layers(te)}
    return names


@pytest.mark.parametrize("arch", [Arch.SD15, Arch.SDXL, Arch.SD3])
def test_every_saved_key_maps_to_a_lora_layer_and_covers_all(arch):
    denoiser, encoders = _train(arch)
    tensors = lora_state_dict(denoiser, encoders, arch)
    modules = {}
    for key in tensors:
        module, _, entry = (
            key.rpartition(".lora_") if ".lora_" in key else (key[: -len(".alpha")], "", "alpha")
        )
        modules.setdefault(module, set()).add(entry)
    assert set(modules) == _expected_modules(arch, denoiser, encoders)
    # SD3: peft names with alpha/rank folded into lora_B (no .alpha); T5 keeps kohya names.
    for module, entries in modules.items():
        if arch is Arch.SD3 and not module.startswith("lora_"):
            assert entries == {"A.weight", "B.weight"}
        elif arch is Arch.SD3:
            assert entries == {"down.weight", "up.weight"}
        else:
            assert entries == {"down.weight", "up.weight", "alpha"}


def test_sd15_key_names_shapes_and_dtypes():
    denoiser, encoders = _train(Arch.SD15, rank=4, alpha=2.0)
    tensors = lora_state_dict(denoiser, encoders, Arch.SD15)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{q}.lora_down.weight"].shape == (4, 32)
    assert tensors[f"{q}.lora_up.weight"].shape == (32, 4)
    assert tensors[f"{q}.lora_down.weight"].dtype == torch.float16
    alpha = tensors[f"{q}.alpha"]
    assert alpha.shape == () and alpha.dtype == torch.float32 and alpha.item() == 2.0
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape == (4, 32, 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (32, 4, 1, 1)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert {f"{te}.lora_down.weight", f"{te}.lora_up.weight", f"{te}.alpha"} <= set(tensors)
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in tensors
    assert all(t.is_contiguous() for t in tensors.values())
    # 79 UNet layers (attention+ff+conv) + 2 CLIP layers x 6, three entries each.
    assert len(tensors) == (79 + 12) * 3


def test_sdxl_and_sd3_text_encoder_prefixes():
    sdxl = lora_state_dict(*_train(Arch.SDXL, preset="attention"), Arch.SDXL)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in sdxl
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in sdxl
    assert "lora_unet_up_blocks_0_attentions_1_transformer_blocks_1_attn2_to_k.alpha" in sdxl

    denoiser, encoders = _train(Arch.SD3, preset="attention")
    sd3 = lora_state_dict(denoiser, encoders, Arch.SD3, dtype=torch.float32)
    q = "transformer.transformer_blocks.0.attn.to_q"
    assert sd3[f"{q}.lora_A.weight"].shape == (4, 16)
    # lora_B carries alpha/rank = 2/4: diffusers' SD3 loader refuses .alpha keys.
    trained_b = lora_layers(denoiser)["transformer_blocks.0.attn.to_q"].lora_B["default"].weight
    assert torch.equal(sd3[f"{q}.lora_B.weight"], trained_b * 0.5)
    assert not [k for k in sd3 if k.endswith(".alpha")]
    assert "transformer.transformer_blocks.0.attn.to_add_out.lora_A.weight" in sd3
    assert "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight" in sd3
    assert "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj.lora_B.weight" in sd3
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in sd3


@pytest.mark.parametrize("arch", [Arch.SD15, Arch.SDXL, Arch.SD3])
def test_a_saved_file_reproduces_the_trained_model_in_a_fresh_one(arch, tmp_path):
    denoiser, encoders = _train(arch, alpha=3.0)
    path = save_lora(
        tmp_path / "run" / "lora.safetensors",
        lora_state_dict(denoiser, encoders, arch, dtype=torch.float32),
        {"ss_network_dim": "4"},
    )

    fresh_denoiser, fresh_encoders = tiny_model(arch)
    assert not torch.allclose(denoise(arch, fresh_denoiser), denoise(arch, denoiser), atol=1e-4)
    report = load_lora(path, fresh_denoiser, fresh_encoders, arch)

    torch.testing.assert_close(denoise(arch, fresh_denoiser), denoise(arch, denoiser), atol=1e-5, rtol=0)
    for fresh, trained in zip(fresh_encoders, encoders, strict=True):
        torch.testing.assert_close(encode(fresh), encode(trained), atol=1e-5, rtol=0)
    # SD3 files hold alpha/rank inside lora_B, so they load at scale 1 (alpha = rank): the same update.
    assert report.ranks == [4] and report.alphas == ([4.0] if arch is Arch.SD3 else [3.0])
    assert report.modules["denoiser"] == len(lora_layers(denoiser))
    assert report.injected == ["denoiser"] + [f"text_encoder[{i}]" for i in range(len(encoders))]
    assert report.metadata["ss_network_dim"] == "4"


def test_sd3_files_of_earlier_versions_still_load(tmp_path):
    """transformer.*.alpha + kohya lora_te1_/lora_te2_ text encoders: what versions before the
    diffusers-compatible layout wrote (ComfyUI loads them too)."""
    denoiser, encoders = _train(Arch.SD3, preset="attention", alpha=3.0)
    old = peft_to_prefixed(part_state_dict(denoiser, part="denoiser"), prefix="transformer.")
    for prefix, te in zip(("lora_te1_", "lora_te2_", "lora_te3_"), encoders, strict=True):
        old |= peft_to_kohya(part_state_dict(te, part="text_encoder"), prefix=prefix)
    path = save_lora(tmp_path / "old.safetensors", old)

    fresh_denoiser, fresh_encoders = tiny_model(Arch.SD3)
    report = load_lora(path, fresh_denoiser, fresh_encoders, Arch.SD3)
    assert report.alphas == [3.0] and report.skipped == []
    assert report.modules == {
        "denoiser": len(lora_layers(denoiser)),
        **{f"text_encoder[{i}]": len(lora_layers(te)) for i, te in enumerate(encoders)},
    }
    torch.testing.assert_close(
        denoise(Arch.SD3, fresh_denoiser), denoise(Arch.SD3, denoiser), atol=1e-5, rtol=0
    )
    for fresh, trained in zip(fresh_encoders, encoders, strict=True):
        torch.testing.assert_close(encode(fresh), encode(trained), atol=1e-5, rtol=0)


def test_loading_into_a_model_prepared_for_resume_replaces_its_weights(tmp_path):
    denoiser, encoders = _train(Arch.SD15, preset="attention", alpha=8.0)
    path = save_lora(
        tmp_path / "a.safetensors", lora_state_dict(denoiser, encoders, Arch.SD15, dtype=torch.float32)
    )
    resumed, resumed_encoders = tiny_model(Arch.SD15)
    # The trainer re-creates the LoRA from the config (fresh init), then loads the checkpoint into it.
    params = add_lora(
        resumed, target_modules(Arch.SD15, "attention", resumed, part="denoiser"), rank=4, alpha=8.0, seed=42
    )
    add_lora(
        resumed_encoders[0],
        target_modules(Arch.SD15, "attention", resumed_encoders[0], part="text_encoder"),
        rank=4,
        alpha=8.0,
    )
    report = load_lora(path, resumed, resumed_encoders, Arch.SD15)
    assert report.injected == []
    assert report.modules == {"denoiser": 32, "text_encoder[0]": 8}
    assert all(p.requires_grad for p in params)  # the optimiser's parameters are the ones loaded into
    torch.testing.assert_close(denoise(Arch.SD15, resumed), denoise(Arch.SD15, denoiser), atol=1e-5, rtol=0)


def test_alpha_in_the_file_is_what_the_merge_applies(tmp_path):
    denoiser, encoders = _train(Arch.SD15, preset="attention", rank=4, alpha=1.0)
    tensors = lora_state_dict(denoiser, encoders, Arch.SD15, alpha=1.0, dtype=torch.float32)
    q = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"
    name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    base = lora_layers(denoiser)[name].get_base_layer().weight.detach().clone()
    from trainer.lora import merge_lora

    merge_lora(denoiser)
    implied = (
        tensors[f"{q}.alpha"].item()
        / tensors[f"{q}.lora_down.weight"].shape[0]
        * (tensors[f"{q}.lora_up.weight"] @ tensors[f"{q}.lora_down.weight"])
    )
    torch.testing.assert_close(
        denoiser.get_submodule(name).weight.detach() - base, implied, atol=1e-6, rtol=1e-5
    )
    assert tensors[f"{q}.alpha"].item() == 1.0


def test_alpha_guard_and_nothing_to_save():
    denoiser, encoders = _train(Arch.SD15, preset="attention", alpha=2.0)
    with pytest.raises(ValueError, match="alpha: 16 was asked for but denoiser layer '.*' applies alpha 2.0"):
        lora_state_dict(denoiser, encoders, Arch.SD15, alpha=16)
    bare, bare_encoders = tiny_model(Arch.SD15)
    with pytest.raises(
        ValueError, match="the model has no LoRA adapter 'default'; call add_lora\\(\\) before saving"
    ):
        lora_state_dict(bare, bare_encoders, Arch.SD15)
    with pytest.raises(ValueError, match="text_encoders: sd15 has 1 text encoder\\(s\\) but 2 were given"):
        lora_state_dict(denoiser, encoders * 2, Arch.SD15)


def test_nan_weights_are_refused_before_writing():
    denoiser, encoders = _train(Arch.SD15, preset="attention")
    layer = lora_layers(denoiser)["mid_block.attentions.0.transformer_blocks.0.attn1.to_k"]
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(
        ValueError,
        match="denoiser layer 'mid_block.attentions.0.transformer_blocks.0.attn1.to_k': lora_B.weight has NaN/inf",
    ):
        lora_state_dict(denoiser, encoders, Arch.SD15)


def test_save_is_atomic_with_metadata_and_addnet_hash(tmp_path):
    denoiser, encoders = _train(Arch.SD15, preset="attention")
    tensors = lora_state_dict(denoiser, encoders, Arch.SD15)
    path = tmp_path / "ckpt.safetensors"
    save_lora(path, tensors, {"ss_network_alpha": "2.0"})
    first = path.read_bytes()

    with pytest.raises(ValueError, match="metadata \\['ss_steps'\\] must map strings to strings"):
        save_lora(path, tensors, {"ss_steps": 800})
    assert path.read_bytes() == first  # a refused save leaves the old file alone
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]  # no temporary files left behind

    loaded, metadata = read_lora(path)
    assert set(loaded) == set(tensors)
    assert metadata["ss_network_alpha"] == "2.0"
    header_len = int.from_bytes(first[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(first[8 + header_len :]).hexdigest()
    header = json.loads(first[8 : 8 + header_len])
    q_alpha = header["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]
    assert q_alpha["dtype"] == "F32" and q_alpha["shape"] == []
    with safe_open(str(path), "pt") as handle:
        assert handle.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha").item() == 2.0
    with pytest.raises(ValueError, match="path: '.*ckpt.pt' must end in .safetensors"):
        save_lora(tmp_path / "ckpt.pt", tensors)


def test_a_file_for_another_model_gives_the_promised_message(tmp_path):
    path = save_lora(
        tmp_path / "sd15.safetensors", lora_state_dict(*_train(Arch.SD15, preset="attention"), Arch.SD15)
    )
    sd3, sd3_encoders = tiny_model(Arch.SD3)
    with pytest.raises(LoraMismatchError) as err:
        load_lora(path, sd3, sd3_encoders, Arch.SD3)
    message = str(err.value)
    assert message.startswith(
        f"{path}: 120 of 120 key(s) match no LoRA layer of this sd3 model (with 3 text encoder(s) given), e.g. "
    )
    assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj.alpha" in message
    assert message.endswith(
        "Was the file made for another model type or another set of text encoders? Pass strict=False to load the layers that match."
    )
    assert len(err.value.unmatched) == 120
    assert not lora_layers(sd3)  # nothing was touched


def test_text_encoder_weights_without_a_text_encoder(tmp_path):
    path = save_lora(
        tmp_path / "te.safetensors", lora_state_dict(*_train(Arch.SD15, preset="attention"), Arch.SD15)
    )
    unet, _ = tiny_model(Arch.SD15)
    with pytest.raises(
        LoraMismatchError,
        match="24 of 120 key\\(s\\) match no LoRA layer of this sd15 model \\(with 0 text encoder\\(s\\) given\\)",
    ):
        load_lora(path, unet, [], Arch.SD15)
    report = load_lora(path, unet, [], Arch.SD15, strict=False)
    assert report.modules == {"denoiser": 32}
    assert len(report.skipped) == 24 and report.skipped[0].startswith("lora_te_text_model_encoder_layers_0_")


def test_other_targets_than_the_prepared_model_are_refused(tmp_path):
    path = save_lora(
        tmp_path / "attn.safetensors", lora_state_dict(*_train(Arch.SD15, preset="attention"), Arch.SD15)
    )
    unet, encoders = tiny_model(Arch.SD15)
    add_lora(unet, target_modules(Arch.SD15, "attention+ff", unet, part="denoiser"), rank=4, alpha=2.0)
    with pytest.raises(
        LoraMismatchError,
        match="the denoiser has LoRA on 48 layers but the file has 32: missing from the file: down_blocks.0.attentions.0.proj_in",
    ):
        load_lora(path, unet, encoders, Arch.SD15)


def test_shape_and_rank_mismatches_name_the_layer(tmp_path):
    tensors = lora_state_dict(*_train(Arch.SD15, preset="attention", rank=4), Arch.SD15)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors[f"{q}.lora_down.weight"] = torch.zeros(4, 7, dtype=torch.float16)
    path = save_lora(tmp_path / "bad.safetensors", tensors)
    unet, encoders = tiny_model(Arch.SD15)
    with pytest.raises(
        LoraMismatchError,
        match=r"1 LoRA layer\(s\) do not fit the model: denoiser layer 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q': lora_A \(4, 7\) / lora_B \(32, 4\) do not fit its weight \(32, 32\)",
    ):
        load_lora(path, unet, encoders, Arch.SD15)

    good = save_lora(
        tmp_path / "good.safetensors",
        lora_state_dict(*_train(Arch.SD15, preset="attention", rank=4), Arch.SD15),
    )
    add_lora(unet, target_modules(Arch.SD15, "attention", unet, part="denoiser"), rank=8, alpha=8.0)
    with pytest.raises(LoraMismatchError, match="has rank 8 in the model but 4 in the file"):
        load_lora(good, unet, encoders, Arch.SD15)


def test_missing_and_corrupt_files_are_named(tmp_path):
    unet, encoders = tiny_model(Arch.SD15)
    with pytest.raises(FileNotFoundError, match="nope.safetensors: no such LoRA file"):
        load_lora(tmp_path / "nope.safetensors", unet, encoders, Arch.SD15)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="broken.safetensors is not a readable .safetensors file"):
        load_lora(broken, unet, encoders, Arch.SD15)


def test_mixed_ranks_and_alphas_in_one_file_are_kept_per_layer(tmp_path):
    denoiser, encoders = _train(Arch.SD15, preset="attention", rank=4, alpha=2.0)
    tensors = lora_state_dict(denoiser, encoders, Arch.SD15, dtype=torch.float32)
    k = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k"
    tensors[f"{k}.lora_down.weight"] = torch.full((2, 64), 0.1)
    tensors[f"{k}.lora_up.weight"] = torch.full((64, 2), 0.2)
    tensors[f"{k}.alpha"] = torch.tensor(0.5)
    path = save_lora(tmp_path / "mixed.safetensors", tensors)
    unet, unet_encoders = tiny_model(Arch.SD15)
    report = load_lora(path, unet, unet_encoders, Arch.SD15)
    assert report.ranks == [2, 4] and report.alphas == [0.5, 2.0]
    layers = lora_layers(unet)
    mixed = layers["mid_block.attentions.0.transformer_blocks.0.attn1.to_k"]
    assert mixed.r["default"] == 2 and mixed.scaling["default"] == 0.25
    assert layers["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"].scaling["default"] == 0.5
    assert torch.equal(mixed.lora_B["default"].weight, torch.full((64, 2), 0.2))


def test_lora_can_be_added_in_two_steps_with_one_adapter():
    unet, _ = tiny_model(Arch.SD15)
    first = add_lora(unet, ["mid_block.attentions.0.proj_in"], rank=2, alpha=2.0)
    second = add_lora(unet, ["mid_block.resnets.0.conv1"], rank=4, alpha=1.0)
    layers = lora_layers(unet)
    assert sorted(layers) == ["mid_block.attentions.0.proj_in", "mid_block.resnets.0.conv1"]
    assert layers["mid_block.attentions.0.proj_in"].scaling["default"] == 1.0
    assert layers["mid_block.resnets.0.conv1"].scaling["default"] == 0.25
    assert all(p.requires_grad for p in first + second)
