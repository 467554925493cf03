"""Which layers get a LoRA: the ``lora_targets`` presets resolved to exact module names.

The presets follow what the LoRA files of the community contain, so the layers we train are the
layers every loader (ComfyUI, A1111/Forge, kohya) knows how to patch:

- ``attention``: the attention projections (UNet ``attn1``/``attn2`` ``to_q/to_k/to_v/to_out.0``;
  SD3 joint attention including the context stream's ``add_*_proj``/``to_add_out``).
- ``attention+ff``: also the feed-forward layers and, for UNets, the ``proj_in``/``proj_out`` of
  each transformer (kohya's default LoRA set).
- ``attention+ff+conv``: also the ResNet convolutions, their time-embedding projections and the
  down/up-samplers (kohya's LoCon ``conv_dim``). SD3 has no convolutions to train there.

Text encoders: CLIP ``self_attn.{q,k,v,out}_proj`` (+ ``mlp.fc1/fc2``), T5 ``SelfAttention.{q,k,v,o}``
(+ ``DenseReluDense``).
"""

from __future__ import annotations

import logging
import re
from typing import Literal

from torch import nn

from ..config import Arch, LoraTargets

log = logging.getLogger("finetune")

Part = Literal["denoiser", "text_encoder"]
PARTS: tuple[str, ...] = ("denoiser", "text_encoder")

# Patterns are searched in full module names. SD3 names are anchored at the root (a UNet has
# "transformer_blocks.N.attn2.to_q" too); torch.compile's wrapper adds "_orig_mod.".
_UNET_ATTENTION = [r"\.transformer_blocks\.\d+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0)$"]
_UNET_FF = [
    r"\.transformer_blocks\.\d+\.ff\.net\.(?:0\.proj|2)$",
    r"\.attentions\.\d+\.(?:proj_in|proj_out)$",
]
_UNET_CONV = [
    r"\.resnets\.\d+\.(?:conv1|conv2|conv_shortcut|time_emb_proj)$",
    r"\.(?:downsamplers|upsamplers)\.\d+\.conv$",
]
_SD3_ATTENTION = [
    r"^(?:_orig_mod\.)?transformer_blocks\.\d+\.attn2?\."
    r"(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
]
_SD3_FF = [r"^(?:_orig_mod\.)?transformer_blocks\.\d+\.(?:ff|ff_context)\.net\.(?:0\.proj|2)$"]
_TE_ATTENTION = [
    r"(?:^|\.)encoder\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj)$",  # CLIP
    r"(?:^|\.)encoder\.block\.\d+\.layer\.0\.SelfAttention\.(?:q|k|v|o)$",  # T5
]
_TE_FF = [
    r"(?:^|\.)encoder\.layers\.\d+\.mlp\.(?:fc1|fc2)$",
    r"(?:^|\.)encoder\.block\.\d+\.layer\.1\.DenseReluDense\.(?:wi|wi_0|wi_1|wo)$",
]

_LAYER_TYPES = (nn.Linear, nn.Conv2d)


def parse_preset(preset: LoraTargets | str) -> LoraTargets:
    """Turn a preset name into :class:`LoraTargets`.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    try:
        return LoraTargets(preset)
    except ValueError:
        valid = ", ".join(repr(p.value) for p in LoraTargets)
        raise ValueError(f"lora_targets: unknown preset {preset!r}; valid presets are {valid}") from None


def _patterns(arch: Arch, preset: LoraTargets, part: str) -> list[str]:
    with_ff = preset in (LoraTargets.ATTENTION_FF, LoraTargets.ATTENTION_FF_CONV)
    with_conv = preset is LoraTargets.ATTENTION_FF_CONV
    if part == "text_encoder":
        # Text encoders have no convolutions; "+conv" trains the same layers as "+ff" there.
        return _TE_ATTENTION + (_TE_FF if with_ff else [])
    if arch is Arch.SD3:
        if with_conv:
            log.warning(
                "SD3 has no convolution layers in its transformer; 'attention+ff+conv' trains the same layers as 'attention+ff'"
            )
        return _SD3_ATTENTION + (_SD3_FF if with_ff else [])
    return _UNET_ATTENTION + (_UNET_FF if with_ff else []) + (_UNET_CONV if with_conv else [])


def _is_trainable_layer(module: nn.Module) -> bool:
    # A layer that already carries a LoRA (peft wrapper) still counts as its base layer.
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return isinstance(base, _LAYER_TYPES)


def target_modules(
    arch: Arch | str, preset: LoraTargets | str, module: nn.Module, *, part: Part
) -> list[str]:
    """Full names of the layers of ``module`` that the preset puts a LoRA on.

    Args:
        arch: ``sd15``, ``sdxl`` or ``sd3`` (resolve ``auto`` first).
        preset: one of :class:`~trainer.config.LoraTargets`.
        module: the denoiser (UNet / SD3 transformer) or one text encoder (CLIP or T5).
        part: ``"denoiser"`` or ``"text_encoder"``.

    Returns:
        Exact module names (as in ``module.named_modules()``), sorted, of ``nn.Linear`` and
        ``nn.Conv2d`` layers. Names inside an existing peft wrapper (``.base_layer``) are skipped.

    Raises:
        ValueError: unknown arch, preset or part, or no layer matched (the wrong model for ``arch``).
    """
    arch = Arch(arch)
    if arch is Arch.AUTO:
        raise ValueError("arch: 'auto' must be resolved to sd15, sdxl or sd3 before choosing LoRA targets")
    preset = parse_preset(preset)
    if part not in PARTS:
        raise ValueError(f"part: {part!r} is not one of {', '.join(PARTS)}")
    regex = re.compile("|".join(f"(?:{p})" for p in _patterns(arch, preset, part)))
    names = [
        name
        for name, sub in module.named_modules()
        if name and ".base_layer" not in name and regex.search(name) and _is_trainable_layer(sub)
    ]
    if not names:
        raise ValueError(
            f"found no {preset.value!r} layers for the {part} of arch {arch.value!r} in {type(module).__name__}; "
            "is the model really that architecture?"
        )
    return sorted(names)
