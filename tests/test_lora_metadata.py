"""kohya ss_* / modelspec metadata of LoRA files."""

from __future__ import annotations

import hashlib
import json

import pytest

from trainer.config import Arch, CaptionPolicy, DatasetPart, DatasetSpec, LoraTargets, TrainConfig
from trainer.lora import file_sha256, kohya_metadata, legacy_model_hash

STARTED = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def _config(**changes) -> TrainConfig:
    policy = CaptionPolicy(shuffle=True, keep_tokens=1, caption_dropout_rate=0.05, tag_dropout_rate=0.1)
    values = dict(
        run_name="k4s4-style",
        lora_rank=32,
        lora_alpha=16.0,
        batch_size=6,
        epochs=30,
        dataset=DatasetSpec(parts=[DatasetPart(policy=policy), DatasetPart()]),
    )
    values.update(changes)
    return TrainConfig(**values)


def _metadata(arch=Arch.SD15, **changes):
    args = dict(
        config=_config(),
        arch=arch,
        base_model_name="v1-5-pruned-emaonly.safetensors",
        base_model_hash="ab" * 32,
        base_model_legacy_hash="6ce0161689",
        step=800,
        epoch=2,
        total_steps=23_820,
        num_train_images=4_760,
        num_batches_per_epoch=794,
        dataset_dirs={"10_k4s4 style": {"n_repeats": 10, "img_count": 476}},
        tag_frequency={"10_k4s4 style": {"k4s4 style": 476, "red hat": 12}},
        bucket_info={"buckets": {"0": {"resolution": [512, 512], "count": 476}}, "mean_img_ar_error": 0.0},
        training_started_at=STARTED,
        saved_at=STARTED + 3600,
        prediction_type="epsilon",
    )
    args.update(changes)
    return kohya_metadata(**args)


def test_every_value_is_a_string_with_kohyas_numbers():
    meta = _metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    expected = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "32",
        "ss_network_alpha": "16.0",
        "ss_network_dropout": "0.0",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_v_parameterization": "False",
        "ss_prediction_type": "epsilon",
        "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
        "ss_sd_model_hash": "6ce0161689",
        "ss_new_sd_model_hash": "ab" * 32,
        "ss_steps": "800",
        "ss_epoch": "2",
        "ss_max_train_steps": "23820",
        "ss_num_epochs": "30",
        "ss_num_train_images": "4760",
        "ss_num_batches_per_epoch": "794",
        "ss_learning_rate": "0.0001",
        "ss_unet_lr": "0.0001",
        "ss_text_encoder_lr": "0.0",
        "ss_lr_scheduler": "cosine",
        "ss_lr_warmup_steps": "2382",
        "ss_optimizer": "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.999),eps=1e-08)",
        "ss_mixed_precision": "bf16",
        "ss_batch_size_per_device": "6",
        "ss_total_batch_size": "6",
        "ss_gradient_accumulation_steps": "1",
        "ss_resolution": "(512, 512)",
        "ss_enable_bucket": "True",
        "ss_min_bucket_reso": "256",
        "ss_max_bucket_reso": "2048",
        "ss_seed": "42",
        "ss_shuffle_caption": "True",
        "ss_keep_tokens": "1",
        "ss_caption_dropout_rate": "0.05",
        "ss_caption_dropout_every_n_epochs": "0",
        "ss_caption_tag_dropout_rate": "0.1",
        "ss_noise_offset": "0.0",
        "ss_min_snr_gamma": "0.0",
        "ss_training_comment": "",
        "ss_training_started_at": "1700000000.0",
        "ss_training_finished_at": "1700003600.0",
        "ss_output_name": "k4s4-style",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "k4s4-style",
        "modelspec.resolution": "512x512",
        "modelspec.date": "2023-11-14T23:13:20+00:00",
        "modelspec.prediction_type": "epsilon",
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert "ss_network_args" not in meta


def test_json_fields_round_trip():
    meta = _metadata()
    assert json.loads(meta["ss_tag_frequency"]) == {"10_k4s4 style": {"k4s4 style": 476, "red hat": 12}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_k4s4 style": {"n_repeats": 10, "img_count": 476}}
    assert json.loads(meta["ss_bucket_info"])["buckets"]["0"] == {"resolution": [512, 512], "count": 476}
    assert json.loads(_metadata(bucket_info=None)["ss_bucket_info"]) is None


def test_sdxl_v_prediction_text_encoder_and_conv():
    config = _config(
        train_text_encoder=True,
        text_encoder_lr=5e-5,
        lora_targets=LoraTargets.ATTENTION_FF_CONV,
        gradient_accumulation=4,
    )
    meta = _metadata(
        Arch.SDXL, config=config, prediction_type="v_prediction", resolution=(1024, 768), num_processes=2
    )
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["ss_v_parameterization"] == "True"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["ss_text_encoder_lr"] == "5e-05"
    assert meta["ss_resolution"] == "(1024, 768)" and meta["modelspec.resolution"] == "1024x768"
    assert meta["ss_total_batch_size"] == str(6 * 4 * 2)
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "32", "conv_alpha": "16.0"}


def test_sd3_is_flow_with_native_resolution():
    meta = _metadata(Arch.SD3, prediction_type=None)
    assert meta["ss_base_model_version"] == "sd3"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-medium/lora"
    assert meta["ss_prediction_type"] == "flow" and meta["modelspec.prediction_type"] == "flow"
    assert meta["ss_resolution"] == "(1024, 1024)"
    assert meta["ss_noise_offset"] == "None" and meta["ss_min_snr_gamma"] == "None"


def test_unresolved_choices_are_refused():
    with pytest.raises(ValueError, match="prediction_type: 'auto' must be resolved"):
        _metadata(prediction_type="auto")
    with pytest.raises(
        ValueError, match="prediction_type: 'flow' is not a UNet objective; use epsilon or v_prediction"
    ):
        _metadata(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type: give the resolved objective"):
        _metadata(prediction_type=None)
    with pytest.raises(ValueError, match="arch: 'auto' must be resolved to sd15, sdxl or sd3 before saving"):
        _metadata(Arch.AUTO)


def test_model_file_hashes(tmp_path):
    data = bytes(range(256)) * 8192  # 2 MiB
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert legacy_model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
