"""Recognise what a single weight file holds from its tensor names (and shapes, when given).

Understands the original (ldm / ComfyUI "checkpoint") layout with ``model.diffusion_model.`` etc.,
bare diffusion-model files without that prefix (ComfyUI's ``models/diffusion_models``), and
diffusers-layout denoiser files. Everything else gets a :class:`ModelLoadError` saying what the
file looks like.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import Arch
from .errors import ModelLoadError

LDM_PREFIX = "model.diffusion_model."
SUPPORTED = "supported: SD1.5, SDXL, SD3 Medium"

# Prefixes of the parts a full original-layout checkpoint may carry besides the denoiser.
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIXES: dict[Arch, list[str]] = {
    Arch.SD15: ["cond_stage_model.transformer."],
    Arch.SDXL: ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."],
    Arch.SD3: ["text_encoders.clip_l.", "text_encoders.clip_g.", "text_encoders.t5xxl."],
}


@dataclass
class CheckpointInfo:
    """What a single file holds.

    Attributes:
        arch: The detected architecture.
        layout: ``"ldm"`` (prefixed full checkpoint), ``"bare"`` (denoiser alone, original keys)
            or ``"diffusers"`` (denoiser alone, diffusers keys).
        has_vae: The file carries a VAE under ``first_stage_model.``.
        text_encoders: For each text-encoder slot of the arch, whether the file carries it.
        v_prediction: The file is marked as a v-prediction model (ComfyUI's ``v_pred`` key).
    """

    arch: Arch
    layout: str
    has_vae: bool = False
    text_encoders: list[bool] = field(default_factory=list)
    v_prediction: bool = False


def _shape(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if hasattr(value, "shape"):
        return tuple(value.shape)
    if isinstance(value, Mapping) and "shape" in value:  # a safetensors header entry
        return tuple(value["shape"])
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return None


def _where(source: str) -> str:
    return f"{source}: " if source else ""


def _fail(source: str, looks_like: str, hint: str = "") -> ModelLoadError:
    msg = f"{_where(source)}looks like {looks_like}; {SUPPORTED}"
    if hint:
        msg += f". {hint}"
    return ModelLoadError(msg, path=source)


def _find_shape(shapes: Mapping[str, Any], suffix: str, prefixes: Iterable[str]) -> tuple[int, ...] | None:
    for p in prefixes:
        s = _shape(shapes.get(p + suffix))
        if s is not None:
            return s
    return None


def _context_dim(shapes: Mapping[str, Any], keys: Iterable[str]) -> int | None:
    for k in keys:
        if k.endswith("attn2.to_k.weight"):
            s = _shape(shapes.get(k))
            if s is not None and len(s) == 2:
                return s[1]
    return None


def inspect_checkpoint(keys: Iterable[str] | Mapping[str, Any], *, source: str = "") -> CheckpointInfo:
    """Recognise a single weight file.

    Args:
        keys: The tensor names, or a mapping from names to tensors / shapes / safetensors header
            entries (shapes let SD2 and inpainting models be told apart from SD1.5).
        source: The file name, used in error messages.

    Returns:
        The recognised :class:`CheckpointInfo`.

    Raises:
        ModelLoadError: The file is not a supported base model; the message says what it looks like.
    """
    shapes: Mapping[str, Any] = keys if isinstance(keys, Mapping) else {}
    names = [k for k in keys if k != "__metadata__"]
    key_set = set(names)
    if not names:
        raise ModelLoadError(f"{_where(source)}the file holds no tensors", path=source)

    def has_prefix(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in names)

    def has_part(part: str) -> bool:
        return any(part in k for k in names)

    if (
        has_part("lora_down")
        or has_part("lora_up")
        or has_part(".lora_A.")
        or has_part(".lora_B.")
        or has_prefix("lora_")
    ):
        raise _fail(
            source,
            "a LoRA file, not a base model",
            "Load it with a LoRA loader and pick a base checkpoint here",
        )
    if has_part("double_blocks.") or has_part("single_transformer_blocks.") or has_part("single_blocks."):
        raise _fail(source, "a Flux model")

    v_pred = "v_pred" in key_set
    has_vae = has_prefix(VAE_PREFIX)

    # --- MMDiT (SD3 family)
    if has_part("joint_blocks."):
        if has_part(".attn.ln_q.") or has_part(".attn2."):
            raise _fail(source, "an SD3.5 model (MMDiT with qk-norm / dual attention)")
        layout = "ldm" if has_prefix(LDM_PREFIX + "joint_blocks.") else "bare"
        tes = [has_prefix(p) for p in TEXT_ENCODER_PREFIXES[Arch.SD3]]
        return CheckpointInfo(Arch.SD3, layout, has_vae, tes, v_pred)
    if "context_embedder.weight" in key_set and has_part("transformer_blocks.0.attn.add_q_proj"):
        if has_part("attn.norm_added_q") or has_part(".attn2."):
            raise _fail(source, "an SD3.5 model in diffusers layout")
        return CheckpointInfo(Arch.SD3, "diffusers", False, [False, False, False], v_pred)

    # --- UNets, original layout (prefixed or bare)
    prefix = (
        LDM_PREFIX
        if has_prefix(LDM_PREFIX + "input_blocks.")
        else ("" if has_prefix("input_blocks.") else None)
    )
    if prefix is not None:
        layout = "ldm" if prefix else "bare"
        in_shape = _shape(shapes.get(prefix + "input_blocks.0.0.weight"))
        if in_shape is not None and len(in_shape) == 4 and in_shape[1] != 4:
            kind = {
                9: "an inpainting model (9 input channels)",
                8: "an instruct-pix2pix model (8 input channels)",
            }
            raise _fail(
                source,
                kind.get(in_shape[1], f"a UNet with {in_shape[1]} input channels"),
                "Only 4-channel text-to-image models can be trained",
            )
        unet_keys = [
            k
            for k in names
            if k.startswith(prefix + "input_blocks.") or k.startswith(prefix + "middle_block.")
        ]
        context = _context_dim(shapes, unet_keys)
        if (prefix + "label_emb.0.0.weight") in key_set:
            if has_prefix("conditioner.embedders.0.model.") and not has_prefix("conditioner.embedders.1."):
                raise _fail(source, "an SDXL refiner")
            if context == 1280:
                raise _fail(source, "an SDXL refiner (context dim 1280)")
            tes = [has_prefix(p) for p in TEXT_ENCODER_PREFIXES[Arch.SDXL]]
            return CheckpointInfo(Arch.SDXL, layout, has_vae, tes, v_pred)
        if (prefix + "label_emb.0.weight") in key_set or has_part("label_emb."):
            raise _fail(source, "a class-conditioned UNet (an upscaler or unCLIP model)")
        proj_in = _find_shape(shapes, "input_blocks.1.1.proj_in.weight", [prefix])
        if (
            has_prefix("cond_stage_model.model.")
            or context == 1024
            or (proj_in is not None and len(proj_in) == 2)
        ):
            raise _fail(source, "an SD2.x model (OpenCLIP text encoder, context dim 1024)")
        tes = [has_prefix(p) for p in TEXT_ENCODER_PREFIXES[Arch.SD15]]
        return CheckpointInfo(Arch.SD15, layout, has_vae, tes, v_pred)

    # --- UNets, diffusers layout
    if (
        "conv_in.weight" in key_set
        and has_prefix("down_blocks.")
        and "time_embedding.linear_1.weight" in key_set
    ):
        context = _context_dim(shapes, names)
        if "add_embedding.linear_1.weight" in key_set:
            if context == 1280:
                raise _fail(source, "an SDXL refiner UNet (diffusers layout)")
            return CheckpointInfo(Arch.SDXL, "diffusers", False, [False, False], v_pred)
        if "class_embedding.linear_1.weight" in key_set or "class_embedding.weight" in key_set:
            raise _fail(source, "a class-conditioned UNet (an upscaler or unCLIP model)")
        if context == 1024:
            raise _fail(source, "an SD2.x UNet (diffusers layout, context dim 1024)")
        return CheckpointInfo(Arch.SD15, "diffusers", False, [False], v_pred)

    # --- Not a denoiser at all: say what it is.
    if (
        has_prefix("encoder.down.")
        or has_prefix("decoder.up.")
        or has_prefix(VAE_PREFIX)
        or has_prefix("encoder.down_blocks.")
    ):
        raise _fail(source, "a VAE-only file", "Pass it as the VAE together with a base model")
    if (
        has_part("text_model.encoder.layers.")
        or has_part("transformer.resblocks.")
        or has_part("encoder.block.0.layer.0.SelfAttention")
    ):
        raise _fail(
            source,
            "a text-encoder file (CLIP or T5)",
            "Pass it as clip_l / clip_g / t5xxl together with an SD3 model",
        )
    if has_part("control_model.") or has_prefix("controlnet_"):
        raise _fail(source, "a ControlNet")
    sample = ", ".join(sorted(names)[:5])
    raise ModelLoadError(
        f"{_where(source)}not a recognised model file ({SUPPORTED}); first tensor names: {sample}",
        path=source,
    )


def detect_arch(keys: Iterable[str] | Mapping[str, Any], *, source: str = "") -> Arch:
    """The architecture of a single weight file (see :func:`inspect_checkpoint`).

    Args:
        keys: Tensor names, or a mapping from names to tensors / shapes.
        source: The file name, used in error messages.

    Returns:
        ``Arch.SD15``, ``Arch.SDXL`` or ``Arch.SD3``.

    Raises:
        ModelLoadError: Not a supported base model; the message names the file and what it looks like.
    """
    return inspect_checkpoint(keys, source=source).arch
