"""The ``__metadata__`` of a LoRA file: kohya's ``ss_*`` keys plus Stability's ``modelspec.*``.

A1111/Forge, civitai and the LoRA-inspection tools read these keys, so they follow kohya's
sd-scripts (names, and values as ``str()`` of the Python value, JSON for the dicts). Every value is
a string because safetensors metadata is text only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import Arch, LoraTargets, OptimizerName, Precision, PredictionType, TrainConfig

BASE_MODEL_VERSION = {Arch.SD15: "sd_v1", Arch.SDXL: "sdxl_base_v1-0", Arch.SD3: "sd3"}
MODELSPEC_ARCHITECTURE = {
    Arch.SD15: "stable-diffusion-v1/lora",
    Arch.SDXL: "stable-diffusion-xl-v1-base/lora",
    Arch.SD3: "stable-diffusion-3-medium/lora",
}
# kohya's choice: SDXL LoRAs name SGM (their keys follow its layout for loaders), others diffusers.
MODELSPEC_IMPLEMENTATION = {
    Arch.SD15: "diffusers",
    Arch.SDXL: "https://github.com/Stability-AI/generative-models",
    Arch.SD3: "diffusers",
}
# What kohya writes for ss_optimizer: the optimizer class path.
OPTIMIZER_CLASS = {
    OptimizerName.ADAMW: "torch.optim.adamw.AdamW",
    OptimizerName.ADAMW_8BIT: "bitsandbytes.optim.adamw.AdamW8bit",
    OptimizerName.ADAFACTOR: "transformers.optimization.Adafactor",
}
MIXED_PRECISION = {Precision.BF16: "bf16", Precision.FP16: "fp16", Precision.FP32: "no"}  # accelerate's names
_FLOW = "flow"


def _resolution(resolution: int | tuple[int, int] | None, config: TrainConfig, arch: Arch) -> tuple[int, int]:
    if resolution is None:
        side = config.native_resolution(arch)
        return side, side
    if isinstance(resolution, int):
        return resolution, resolution
    width, height = resolution
    return int(width), int(height)


def _prediction(arch: Arch, prediction_type: PredictionType | str | None) -> str:
    if arch is Arch.SD3:
        return _FLOW
    if prediction_type is None:
        raise ValueError(
            "prediction_type: give the resolved objective (epsilon or v_prediction) of the UNet model"
        )
    try:
        value = PredictionType(prediction_type)
    except ValueError:
        raise ValueError(
            f"prediction_type: {prediction_type!r} is not a UNet objective; use epsilon or v_prediction"
        ) from None
    if value is PredictionType.AUTO:
        raise ValueError(
            "prediction_type: 'auto' must be resolved from the model (epsilon or v_prediction) before saving"
        )
    return value.value


def _caption_summary(config: TrainConfig) -> dict[str, Any]:
    """kohya has one caption policy per run; ours is per dataset part, so report the strongest setting."""
    policies = [part.policy for part in config.dataset.parts]
    if not policies:
        return {"shuffle": False, "keep_tokens": 0, "dropout": 0.0, "every_n": 0, "tag_dropout": 0.0}
    return {
        "shuffle": any(p.shuffle for p in policies),
        "keep_tokens": max(p.keep_tokens for p in policies),
        "dropout": max(p.caption_dropout_rate for p in policies),
        "every_n": max(p.caption_dropout_every_n_epochs for p in policies),
        "tag_dropout": max(p.tag_dropout_rate for p in policies),
    }


def _optimizer(config: TrainConfig) -> str:
    name = OPTIMIZER_CLASS[config.optimizer]
    if config.optimizer is OptimizerName.ADAFACTOR:
        return name
    args = f"weight_decay={config.weight_decay},betas=({config.adam_beta1}, {config.adam_beta2}),eps={config.adam_epsilon}"
    return f"{name}({args})"


def kohya_metadata(
    *,
    config: TrainConfig,
    arch: Arch | str,
    base_model_name: str,
    step: int,
    epoch: int,
    total_steps: int,
    num_train_images: int,
    dataset_dirs: Mapping[str, Mapping[str, int]],
    tag_frequency: Mapping[str, Mapping[str, int]],
    training_started_at: float,
    base_model_hash: str = "",
    base_model_legacy_hash: str = "",
    resolution: int | tuple[int, int] | None = None,
    bucket_info: Mapping[str, Any] | None = None,
    num_epochs: int | None = None,
    num_batches_per_epoch: int | None = None,
    num_processes: int = 1,
    prediction_type: PredictionType | str | None = None,
    saved_at: float | None = None,
    output_name: str | None = None,
    training_comment: str = "",
    trigger_phrase: str = "",
) -> dict[str, str]:
    """Metadata for one LoRA checkpoint, as kohya's sd-scripts writes it.

    Args:
        config: the run's config (rank, alpha, optimiser, schedule, caption policy ...).
        arch: ``sd15``, ``sdxl`` or ``sd3``.
        base_model_name: file or folder name of the base model (no directories: paths leak).
        step: optimizer steps done at this checkpoint.
        epoch: epochs done (kohya counts from 1 at the end of the first epoch).
        total_steps: the planned number of steps (``ss_max_train_steps``).
        num_train_images: images x repeats in one epoch (kohya's ``num_train_images``).
        dataset_dirs: folder name -> ``{"n_repeats": int, "img_count": int}``.
        tag_frequency: folder name -> {tag: count}.
        training_started_at: unix time the run started.
        base_model_hash: sha256 of the base model file (``ss_new_sd_model_hash``), if computed.
        base_model_legacy_hash: A1111's old 8-hex hash (``ss_sd_model_hash``), see :func:`legacy_model_hash`.
        resolution: training resolution, side or (width, height); default: the config's or the arch's native.
        bucket_info: kohya's bucket summary, e.g. ``{"buckets": {"0": {"resolution": [512, 512], "count": 40}}}``.
        num_epochs: planned epochs (default ``config.epochs``).
        num_batches_per_epoch: steps in an epoch, if known.
        num_processes: GPUs the run uses (for ``ss_total_batch_size``).
        prediction_type: the UNet's resolved objective; ignored for SD3 (rectified flow).
        saved_at: unix time of this save (default: ``training_started_at``); gives ``modelspec.date``.
        output_name: ``ss_output_name`` and ``modelspec.title`` (default ``config.run_name``).
        training_comment: free text (``ss_training_comment``).
        trigger_phrase: ``modelspec.trigger_phrase`` (e.g. the caption prefix), if any.

    Returns:
        ``ss_*`` and ``modelspec.*`` keys, every value a string.

    Raises:
        ValueError: an unresolved arch or prediction type.
    """
    arch = Arch(arch)
    if arch not in BASE_MODEL_VERSION:
        raise ValueError(f"arch: {arch.value!r} must be resolved to sd15, sdxl or sd3 before saving")
    prediction = _prediction(arch, prediction_type)
    width, height = _resolution(resolution, config, arch)
    captions = _caption_summary(config)
    flow_model = arch is Arch.SD3  # noise offset and min-SNR apply to the UNet objectives only
    te_lr = (config.text_encoder_lr or config.learning_rate) if config.train_text_encoder else 0.0
    name = output_name or config.run_name
    saved = training_started_at if saved_at is None else saved_at

    ss: dict[str, Any] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": config.lora_rank,
        "ss_network_alpha": float(config.lora_alpha),
        "ss_network_dropout": float(config.lora_dropout),
        "ss_base_model_version": BASE_MODEL_VERSION[arch],
        "ss_v2": False,
        "ss_v_parameterization": prediction == PredictionType.V_PREDICTION.value,
        "ss_prediction_type": prediction,
        "ss_sd_model_name": base_model_name,
        "ss_output_name": name,
        "ss_training_comment": training_comment,
        "ss_training_started_at": training_started_at,
        "ss_training_finished_at": saved,
        "ss_steps": step,
        "ss_epoch": epoch,
        "ss_max_train_steps": total_steps,
        "ss_num_epochs": config.epochs if num_epochs is None else num_epochs,
        "ss_num_train_images": num_train_images,
        "ss_learning_rate": config.learning_rate,
        "ss_unet_lr": config.learning_rate,
        "ss_text_encoder_lr": te_lr,
        "ss_lr_scheduler": config.lr_scheduler.value,
        "ss_lr_warmup_steps": config.warmup_steps(total_steps),
        "ss_optimizer": _optimizer(config),
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_mixed_precision": MIXED_PRECISION[config.mixed_precision],
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_gradient_accumulation_steps": config.gradient_accumulation,
        "ss_batch_size_per_device": config.batch_size,
        "ss_total_batch_size": config.batch_size * config.gradient_accumulation * num_processes,
        "ss_resolution": (width, height),
        "ss_enable_bucket": config.buckets,
        "ss_bucket_no_upscale": not config.allow_upscale,
        "ss_min_bucket_reso": config.min_bucket_resolution,
        "ss_max_bucket_reso": config.max_bucket_resolution,
        "ss_bucket_info": json.dumps(dict(bucket_info) if bucket_info is not None else None),
        "ss_flip_aug": config.flip,
        "ss_random_crop": config.crop.value == "random",
        "ss_cache_latents": config.cache_latents.value != "off",
        "ss_seed": config.seed,
        "ss_shuffle_caption": captions["shuffle"],
        "ss_keep_tokens": captions["keep_tokens"],
        "ss_caption_dropout_rate": captions["dropout"],
        "ss_caption_dropout_every_n_epochs": captions["every_n"],
        "ss_caption_tag_dropout_rate": captions["tag_dropout"],
        "ss_tag_frequency": json.dumps({k: dict(v) for k, v in tag_frequency.items()}),
        "ss_dataset_dirs": json.dumps({k: dict(v) for k, v in dataset_dirs.items()}),
        "ss_noise_offset": None if flow_model else config.noise_offset,
        "ss_min_snr_gamma": None if flow_model else config.min_snr_gamma,
    }
    if num_batches_per_epoch is not None:
        ss["ss_num_batches_per_epoch"] = num_batches_per_epoch
    if config.lora_targets is LoraTargets.ATTENTION_FF_CONV and arch is not Arch.SD3:
        # kohya records LoCon convolutions as network args; the conv layers share rank and alpha here.
        ss["ss_network_args"] = json.dumps(
            {"conv_dim": str(config.lora_rank), "conv_alpha": str(float(config.lora_alpha))}
        )
    if base_model_legacy_hash:
        ss["ss_sd_model_hash"] = base_model_legacy_hash
    if base_model_hash:
        ss["ss_new_sd_model_hash"] = base_model_hash

    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[arch],
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION[arch],
        "modelspec.title": name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.fromtimestamp(int(saved), tz=timezone.utc).isoformat(),
        "modelspec.prediction_type": {"v_prediction": "v"}.get(prediction, prediction),
    }
    if trigger_phrase:
        spec["modelspec.trigger_phrase"] = trigger_phrase
    return {key: str(value) for key, value in {**ss, **spec}.items()}


def legacy_model_hash(path: str | os.PathLike) -> str:
    """A1111's old model hash: sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


def file_sha256(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """sha256 of a whole file (A1111's "new" model hash); reads in chunks, so large checkpoints are fine."""
    digest = hashlib.sha256()
    with open(Path(path), "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
