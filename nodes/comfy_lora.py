"""LoRA layers for a MODEL ComfyUI loaded: which layers train, what their file keys are, and the
check that stock *Load LoRA* applies every key.

Layers are chosen by name inside the diffusion model's repeated blocks (``lora_targets``):

- ``attention``: the linear layers of every attention (UNet ``attn1``/``attn2`` ``to_q/k/v/out.0``,
  MMDiT ``attn.qkv``/``attn.proj``, Flux ``img_attn``/``txt_attn`` and the fused ``single_blocks``
  ``linear1``/``linear2``, Lumina ``attention.qkv``/``out``);
- ``attention+ff``: also the feed-forward layers (``ff``, ``mlp``, ``img_mlp``/``txt_mlp``,
  ``feed_forward``).

File keys follow kohya: ``lora_unet_<module path with underscores>`` plus ``.lora_down.weight``,
``.lora_up.weight`` and ``.alpha``. UNet families (SD1.5, SDXL) use the diffusers module path, as
kohya and A1111 do; every other family uses ComfyUI's own (BFL/SAI) path, as kohya's Flux and SD3
trainers do. ComfyUI's ``comfy.lora.model_lora_keys_unet`` maps both; :func:`verify_keys` proves
it for the model at hand before a run starts, so a file is never written under names ComfyUI would
not apply.
"""

from __future__ import annotations

import re

from ..trainer.config import LoraTargets

_IN_BLOCKS = re.compile(r"(?:^|\.)(?:\w*blocks|layers|\w*refiner)\.\d+\.")
_ATTENTION = re.compile(
    r"(?:^|\.)(?:attn\d*|img_attn|txt_attn|attention|self_attn|cross_attn)\.(?:[\w.]+)$"
    r"|(?:^|\.)single_blocks\.\d+\.(?:linear1|linear2)$"
)
_FEED_FORWARD = re.compile(r"(?:^|\.)(?:ff|ff_context|mlp|img_mlp|txt_mlp|feed_forward)\.(?:[\w.]+)$")
# Norm and modulation layers inside an attention are not projections.
_NOT_PROJECTION = re.compile(r"(?:norm|modulation|_mod\.|\.mod\.)")

PREFIX = "lora_unet_"


class LoraKeyError(ValueError):
    """A LoRA key ComfyUI's loader would not apply to this model."""


def target_names(diffusion_model, preset: LoraTargets) -> list[str]:
    """The linear layers of ``diffusion_model`` (ComfyUI's module) that get a LoRA, in module order.

    Raises:
        ValueError: the preset is one this path cannot train, or it matches no layer.
    """
    import torch

    if preset is LoraTargets.ATTENTION_FF_CONV:
        raise ValueError(
            "lora_targets: 'attention+ff+conv' is not available for a ComfyUI MODEL yet; "
            "choose 'attention' or 'attention+ff' (or train the file with Train LoRA)"
        )
    with_ff = preset is LoraTargets.ATTENTION_FF
    names = []
    for name, module in diffusion_model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not _IN_BLOCKS.search(name):
            continue
        if _NOT_PROJECTION.search(name):
            continue
        if _ATTENTION.search(name) or (with_ff and _FEED_FORWARD.search(name)):
            names.append(name)
    return names


def unet_diffusers_names(unet_config: dict) -> dict[str, str] | None:
    """ComfyUI module path -> diffusers module path for UNet families (None for the others)."""
    import comfy.utils

    if "num_res_blocks" not in unet_config or "channel_mult" not in unet_config:
        return None
    out = {}
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(unet_config).items():
        if diffusers_key.endswith(".weight") and ldm_key.endswith(".weight"):
            out[ldm_key[: -len(".weight")]] = diffusers_key[: -len(".weight")]
    return out


def file_keys(names: list[str], unet_config: dict) -> dict[str, str]:
    """Module name -> kohya key stem (``lora_unet_…``) for each trained layer.

    Raises:
        LoraKeyError: two layers would share a key.
    """
    diffusers = unet_diffusers_names(unet_config) or {}
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        stem = PREFIX + diffusers.get(name, name).replace(".", "_")
        if stem in seen:
            raise LoraKeyError(f"layers {seen[stem]!r} and {name!r} would both be saved as {stem!r}")
        seen[stem] = name
        out[name] = stem
    return out


def verify_keys(base_model, keys: dict[str, str], family: str) -> None:
    """Check that ComfyUI's LoRA loader maps every key stem onto the weight of its layer.

    Args:
        base_model: ComfyUI's ``BaseModel`` (``patcher.model``).
        keys: module name -> key stem, from :func:`file_keys`.
        family: the family name for the message.

    Raises:
        LoraKeyError: naming the first keys ComfyUI would not apply; nothing is trained or written.
    """
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(base_model, {})
    bad = [stem for name, stem in keys.items() if key_map.get(stem) != f"diffusion_model.{name}.weight"]
    if bad:
        raise LoraKeyError(
            f"ComfyUI's LoRA loader would not apply {len(bad)} of {len(keys)} keys for this {family} model "
            f"(e.g. {', '.join(bad[:3])}); no file is written under names it would skip"
        )


# kohya's names of the base model, and Stability's modelspec architecture, per ComfyUI family.
BASE_MODEL_VERSION = {
    "SD15": "sd_v1",
    "SD20": "sd_v2",
    "SDXL": "sdxl_base_v1-0",
    "SD3": "sd3",
    "Flux": "flux1",
    "FluxSchnell": "flux1",
    "Lumina2": "lumina2",
}
MODELSPEC_ARCHITECTURE = {
    "SD15": "stable-diffusion-v1/lora",
    "SD20": "stable-diffusion-v2/lora",
    "SDXL": "stable-diffusion-xl-v1-base/lora",
    "SD3": "stable-diffusion-3/lora",
    "Flux": "flux-1-dev/lora",
    "FluxSchnell": "flux-1-schnell/lora",
    "Lumina2": "lumina-2/lora",
}


def family_metadata(family: str) -> dict[str, str]:
    """The metadata entries that name the architecture (override the SD ones kohya_metadata wrote)."""
    return {
        "ss_base_model_version": BASE_MODEL_VERSION.get(family, family.lower()),
        "modelspec.architecture": MODELSPEC_ARCHITECTURE.get(family, f"{family.lower()}/lora"),
        "modelspec.implementation": "https://github.com/comfyanonymous/ComfyUI",
        "ss_network_module": "networks.lora",
        "finetune.comfy_family": family,
    }
