"""Getting a model ready to train: load it, freeze what stays frozen, add LoRA or unfreeze, place
it on the device in the right dtypes, and switch on gradient checkpointing (compilation and the
other speed switches are in :mod:`.speed`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import nn

from ..config import Arch, Method, Precision, TrainConfig
from ..lora import add_lora, target_modules
from ..models.bundle import ModelBundle
from ..options import ConfigError
from .runtime import Runtime

log = logging.getLogger("finetune")

# SD3's T5-XXL (4.7B parameters) is never trained: its LoRA would dwarf the rest and no loader
# expects one; kohya and diffusers train the CLIP encoders only.
_T5_SLOT = 2


def load_model(config: TrainConfig) -> ModelBundle:
    """Load the base model named by the config, on the CPU in fp32 (placement comes after).

    Raises:
        ConfigError: no base model given.
        ModelLoadError: the files cannot be loaded (the message names them).
    """
    from ..models.load import load_base_model

    if not config.base_model:
        raise ConfigError("base_model", "is empty; choose a diffusers folder or a .safetensors checkpoint")
    return load_base_model(
        config.base_model,
        arch=config.arch,
        tokenizer_dir=config.tokenizer_dir,
        config_dir=config.config_dir,
        clip_l=config.clip_l,
        clip_g=config.clip_g,
        t5xxl=config.t5xxl,
        use_t5=config.use_t5,
        allow_pickle=config.allow_pickle,
        prediction_type=config.prediction_type.value,
        dtype=torch.float32,
    )


@dataclass
class Trainables:
    """What the optimizer updates.

    Attributes:
        denoiser: the denoiser's trainable parameters (LoRA or all).
        text: the text encoders' trainable parameters (empty unless ``train_text_encoder``).
        named: every trainable parameter under a stable name (the resume state's keys).
        text_encoder_slots: which text-encoder slots train.
    """

    denoiser: list[nn.Parameter] = field(default_factory=list)
    text: list[nn.Parameter] = field(default_factory=list)
    named: dict[str, nn.Parameter] = field(default_factory=dict)
    text_encoder_slots: list[int] = field(default_factory=list)

    @property
    def all(self) -> list[nn.Parameter]:
        return self.denoiser + self.text


def trainable_text_slots(bundle: ModelBundle, config: TrainConfig) -> list[int]:
    """The text-encoder slots a run trains (CLIP ones only for SD3)."""
    if not config.train_text_encoder:
        return []
    return [
        i
        for i, te in enumerate(bundle.text_encoders)
        if te is not None and not (bundle.arch == Arch.SD3 and i == _T5_SLOT)
    ]


def _named(module: nn.Module, prefix: str) -> dict[str, nn.Parameter]:
    return {f"{prefix}.{n}": p for n, p in module.named_parameters() if p.requires_grad}


def place_frozen(bundle: ModelBundle, runtime: Runtime, *, device: torch.device) -> None:
    """Freeze the VAE and text encoders and give them their dtypes, on ``device`` (the training
    device, or the CPU when they wait there for the caching and their validation renders).

    The text encoders run in the compute dtype; the VAE too, except in fp16 runs (SDXL's VAE
    overflows in fp16: it stays fp32).
    """
    # The model arrives in fp32; casting to fp32 again only makes diffusers log a warning.
    compute = None if runtime.compute_dtype == torch.float32 else runtime.compute_dtype
    vae_dtype = None if runtime.precision == Precision.FP16 else compute
    bundle.freeze(vae=True, text_encoders=True)
    _place(bundle.vae, device, vae_dtype)
    for te in bundle.text_encoders:
        if te is not None:
            _place(te, device, compute)


def prepare_trainables(
    bundle: ModelBundle,
    config: TrainConfig,
    runtime: Runtime,
    *,
    half_weights: bool = False,
    frozen_placed: bool = False,
) -> Trainables:
    """Freeze the model, then make the trained part trainable and place everything.

    LoRA: the base weights go to the device in the compute dtype (bf16/fp16 on GPU) and the LoRA
    weights stay fp32. Full: the denoiser (and trained text encoders) stay fp32 master weights and
    run under autocast, or, with ``half_weights`` (memory_mode's "bf16 weights"), the denoiser
    trains in the compute dtype itself: weights, gradients and optimizer state at half the size.
    The VAE and text encoders are placed by :func:`place_frozen` (here, unless ``frozen_placed``).

    Returns:
        The trainable parameters, already on the device.
    """
    # The model arrives in fp32; casting to fp32 again only makes diffusers log a warning.
    compute = None if runtime.compute_dtype == torch.float32 else runtime.compute_dtype
    if not frozen_placed:
        place_frozen(bundle, runtime, device=runtime.device)
    bundle.freeze(vae=False, text_encoders=False, denoiser=True)
    slots = trainable_text_slots(bundle, config)
    out = Trainables(text_encoder_slots=slots)
    if config.method == Method.LORA:
        _place(bundle.denoiser, runtime.device, compute)
        names = target_modules(bundle.arch, config.lora_targets, bundle.denoiser, part="denoiser")
        out.denoiser = add_lora(
            bundle.denoiser,
            names,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            seed=config.seed,
        )
        for slot in slots:
            te = bundle.text_encoders[slot]
            te_names = target_modules(bundle.arch, config.lora_targets, te, part="text_encoder")
            out.text += add_lora(
                te,
                te_names,
                rank=config.lora_rank,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                seed=config.seed + 1 + slot,
            )
        # peft creates the LoRA layers on the CPU; move them next to their base layers.
        bundle.denoiser.to(runtime.device)
        for slot in slots:
            bundle.text_encoders[slot].to(runtime.device)
    else:
        _place(bundle.denoiser, runtime.device, compute if half_weights else None)
        bundle.denoiser.requires_grad_(True)
        out.denoiser = [p for p in bundle.denoiser.parameters()]
        for slot in slots:
            te = bundle.text_encoders[slot]
            te.to(device=runtime.device)
            te.requires_grad_(True)
            out.text += list(te.parameters())
    out.named = _named(bundle.denoiser, "denoiser")
    for slot in slots:
        out.named.update(_named(bundle.text_encoders[slot], f"text_encoder_{slot}"))
    bundle.denoiser.train()
    for slot in slots:
        bundle.text_encoders[slot].train()
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(bundle, slots, preserve_rng_state=config.lora_dropout > 0)
    return out


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    # diffusers warns on any .to(dtype=...), even a no-op one: only pass a dtype that changes something.
    if dtype is None:
        module.to(device=device)
    else:
        module.to(device=device, dtype=dtype)


def enable_gradient_checkpointing(
    bundle: ModelBundle, slots: list[int], *, preserve_rng_state: bool = True
) -> None:
    """Recompute activations in backward for the denoiser and any trained text encoder.

    Args:
        preserve_rng_state: replay the forward's random draws in the recomputation. Only LoRA
            dropout draws any (the denoisers' own dropout is 0), so without it the generator's
            state is not saved: one less host call per block, and none inside a CUDA graph.
    """

    def checkpointed(module, *args):
        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state
        )

    bundle.denoiser.enable_gradient_checkpointing(checkpointed)
    for slot in slots:
        te = bundle.text_encoders[slot]
        # transformers 5 renamed the switch; the old name still works there but warns.
        if hasattr(te, "activation_checkpointing_enable"):
            te.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(te, "gradient_checkpointing_enable"):
            te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
