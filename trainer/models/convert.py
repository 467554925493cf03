"""diffusers -> original (ldm / ComfyUI) state-dict conversion, and saving a denoiser ComfyUI can load.

The tables follow diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py`` and
``convert_diffusers_to_original_sdxl.py``, written generically by block index so that any number of
levels and layers per block (the real models and the tiny test models alike) maps correctly. The
SD3 part is the exact inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``.
Every converter accounts for every input key: a key it does not know is an error, never dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..config import Arch
from .files import save_safetensors_atomic

LDM_PREFIX = "model.diffusion_model."

Tensors = dict[str, torch.Tensor]


class ConversionError(ValueError):
    """A state dict holds keys the converter does not know (a different or modified architecture)."""


def _unknown(what: str, keys: list[str]) -> ConversionError:
    shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
    return ConversionError(f"{len(keys)} {what} key(s) have no original-layout equivalent: {shown}")


# --------------------------------------------------------------------------------------------
# UNet (SD1.5 / SDXL)

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_DOWN = re.compile(r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_DOWNSAMPLE = re.compile(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_UP = re.compile(r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_UPSAMPLE = re.compile(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$")


def _resnet_key(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _UNET_RESNET:
        raise _unknown("UNet resnet", [rest])
    return f"{_UNET_RESNET[head]}.{tail}"


def unet_to_original(state_dict: Mapping[str, torch.Tensor], *, layers_per_block: int) -> Tensors:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to the original layout (no prefix).

    Args:
        state_dict: The diffusers UNet state dict.
        layers_per_block: ``unet.config.layers_per_block`` (2 for SD1.5 and SDXL). Down blocks hold
            that many layers plus a downsampler; up blocks one more layer.

    Returns:
        ``{original key: tensor}``, e.g. ``input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight``.

    Raises:
        ConversionError: A key does not fit the SD UNet layout.
    """
    if not isinstance(layers_per_block, int):
        raise ConversionError(f"layers_per_block must be one int for SD UNets, got {layers_per_block!r}")
    step = layers_per_block + 1
    up_with_attention = {
        int(m.group(1)) for k in state_dict if (m := _UP.match(k)) and m.group(2) == "attentions"
    }
    out: Tensors = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        new: str | None = None
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            new = f"{_UNET_TOP[module]}.{param}"
        elif m := _DOWN.match(key):
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            idx = 1 + i * step + j
            new = (
                f"input_blocks.{idx}.0.{_resnet_key(rest)}"
                if kind == "resnets"
                else f"input_blocks.{idx}.1.{rest}"
            )
        elif m := _DOWNSAMPLE.match(key):
            new = f"input_blocks.{(int(m.group(1)) + 1) * step}.0.op.{m.group(2)}"
        elif m := _MID.match(key):
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            new = (
                f"middle_block.{2 * j}.{_resnet_key(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
            )
        elif m := _UP.match(key):
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            idx = i * step + j
            new = (
                f"output_blocks.{idx}.0.{_resnet_key(rest)}"
                if kind == "resnets"
                else f"output_blocks.{idx}.1.{rest}"
            )
        elif m := _UPSAMPLE.match(key):
            i = int(m.group(1))
            slot = 2 if i in up_with_attention else 1
            new = f"output_blocks.{i * step + layers_per_block}.{slot}.conv.{m.group(2)}"
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise _unknown("UNet", unknown)
    return out


# --------------------------------------------------------------------------------------------
# VAE

_VAE_TOP = {
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "conv_norm_out": "norm_out",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_RESNET = {"norm1", "conv1", "norm2", "conv2"}
_VAE_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.+)$")
_VAE_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)$")
_VAE_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets\.(\d+)|attentions\.0)\.(.+)$")


def _vae_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head == "conv_shortcut":
        return f"nin_shortcut.{tail}"
    if head not in _VAE_RESNET:
        raise _unknown("VAE resnet", [rest])
    return rest


def vae_to_original(state_dict: Mapping[str, torch.Tensor]) -> Tensors:
    """Rename a diffusers ``AutoencoderKL`` state dict to the original layout (no prefix).

    The mid-block attention's linear q/k/v/proj weights become 1x1 convolutions, as in the original.

    Raises:
        ConversionError: A key does not fit the SD VAE layout.
    """
    n_up = 1 + max((int(m.group(1)) for k in state_dict if (m := _VAE_UP.match(k))), default=-1)
    out: Tensors = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        new: str | None = None
        side, _, rest_all = key.partition(".")
        module, _, param = rest_all.rpartition(".")
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            new = key
        elif side in ("encoder", "decoder") and module in _VAE_TOP:
            new = f"{side}.{_VAE_TOP[module]}.{param}"
        elif m := _VAE_DOWN.match(key):
            i, rest = int(m.group(1)), m.group(4)
            if m.group(3) is not None:
                new = f"encoder.down.{i}.block.{int(m.group(3))}.{_vae_resnet(rest)}"
            elif rest.startswith("conv."):
                new = f"encoder.down.{i}.downsample.{rest}"
        elif m := _VAE_UP.match(key):
            i, rest = n_up - 1 - int(m.group(1)), m.group(4)
            if m.group(3) is not None:
                new = f"decoder.up.{i}.block.{int(m.group(3))}.{_vae_resnet(rest)}"
            elif rest.startswith("conv."):
                new = f"decoder.up.{i}.upsample.{rest}"
        elif m := _VAE_MID.match(key):
            side, rest = m.group(1), m.group(4)
            if m.group(3) is not None:
                new = f"{side}.mid.block_{int(m.group(3)) + 1}.{_vae_resnet(rest)}"
            else:
                module, _, param = rest.rpartition(".")
                if module in _VAE_ATTN:
                    new = f"{side}.mid.attn_1.{_VAE_ATTN[module]}.{param}"
                    if module != "group_norm" and param == "weight" and value.ndim == 2:
                        value = value.reshape(*value.shape, 1, 1)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise _unknown("VAE", unknown)
    return out


# --------------------------------------------------------------------------------------------
# Text encoders

_SKIP_TEXT_KEYS = ("text_model.embeddings.position_ids", "embeddings.position_ids")


def clip_to_original(state_dict: Mapping[str, torch.Tensor]) -> Tensors:
    """A transformers CLIP text model in the layout original checkpoints store (``text_model.`` keys).

    transformers >= 5.6 flattened ``CLIPTextModel`` (no ``text_model.`` prefix); original files and
    ComfyUI always have it. ``text_projection.weight`` is kept as is.
    """
    out: Tensors = {}
    for key, value in state_dict.items():
        if key in _SKIP_TEXT_KEYS:
            continue
        if key.startswith("text_model.") or key == "text_projection.weight":
            out[key] = value
        else:
            out[f"text_model.{key}"] = value
    return out


_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_CLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def openclip_to_original(state_dict: Mapping[str, torch.Tensor]) -> Tensors:
    """A ``CLIPTextModelWithProjection`` (OpenCLIP bigG) in the OpenCLIP layout SDXL checkpoints use.

    q/k/v projections are fused into ``attn.in_proj_weight``/``in_proj_bias`` and the projection is
    stored transposed as ``text_projection`` (the inverse of diffusers' ``convert_open_clip_checkpoint``).

    Raises:
        ConversionError: A key does not fit the CLIP layout.
    """
    sd = clip_to_original(state_dict)
    out: Tensors = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif m := _CLIP_LAYER.match(key):
            i, module, param = int(m.group(1)), m.group(2), m.group(3)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((i, param), {})[module[-6]] = value
            elif module in _OPENCLIP_LAYER:
                out[f"transformer.resblocks.{i}.{_OPENCLIP_LAYER[module]}.{param}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    for (i, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConversionError(f"layer {i} {param}: q/k/v projections incomplete ({sorted(parts)})")
        out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    if unknown:
        raise _unknown("OpenCLIP", unknown)
    return out


def t5_to_original(state_dict: Mapping[str, torch.Tensor]) -> Tensors:
    """A ``T5EncoderModel`` as SD3 checkpoints store it (transformers keys; the tied copy dropped)."""
    return {
        k: v
        for k, v in state_dict.items()
        if k != "encoder.embed_tokens.weight" or "shared.weight" not in state_dict
    }


# --------------------------------------------------------------------------------------------
# SD3 transformer (MMDiT)


def _swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    """diffusers stores (scale, shift) where the original has (shift, scale); the swap is its own inverse."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


_SD3_TOP = {
    "pos_embed.pos_embed": "pos_embed",
    "pos_embed.proj.weight": "x_embedder.proj.weight",
    "pos_embed.proj.bias": "x_embedder.proj.bias",
    "time_text_embed.timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
    "time_text_embed.timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
    "time_text_embed.timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
    "time_text_embed.timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
    "context_embedder.weight": "context_embedder.weight",
    "context_embedder.bias": "context_embedder.bias",
    "time_text_embed.text_embedder.linear_1.weight": "y_embedder.mlp.0.weight",
    "time_text_embed.text_embedder.linear_1.bias": "y_embedder.mlp.0.bias",
    "time_text_embed.text_embedder.linear_2.weight": "y_embedder.mlp.2.weight",
    "time_text_embed.text_embedder.linear_2.bias": "y_embedder.mlp.2.bias",
    "proj_out.weight": "final_layer.linear.weight",
    "proj_out.bias": "final_layer.linear.bias",
}
_SD3_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
}
_SD3_QKV = {
    "attn.to_": "x_block.attn.qkv",
    "attn.add_": "context_block.attn.qkv",
    "attn2.to_": "x_block.attn2.qkv",
}
_SD3_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")
_SD3_QKV_KEY = re.compile(r"^(attn\.to_|attn\.add_|attn2\.to_)([qkv])(?:_proj)?$")


def sd3_transformer_to_original(state_dict: Mapping[str, torch.Tensor]) -> Tensors:
    """Rename a diffusers ``SD3Transformer2DModel`` state dict to the original MMDiT layout (no prefix).

    Fuses q/k/v into ``attn.qkv``, maps the last block's context-only norm and the final norm with the
    (scale, shift) -> (shift, scale) swap.

    Raises:
        ConversionError: A key does not fit the MMDiT layout.
    """
    n_layers = 1 + max((int(m.group(1)) for k in state_dict if (m := _SD3_BLOCK_KEY.match(k))), default=-1)
    out: Tensors = {}
    qkv: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key in _SD3_TOP:
            out[_SD3_TOP[key]] = value
            continue
        if key in ("norm_out.linear.weight", "norm_out.linear.bias"):
            out[f"final_layer.adaLN_modulation.1.{key.rsplit('.', 1)[1]}"] = _swap_scale_shift(value)
            continue
        m = _SD3_BLOCK_KEY.match(key)
        if not m:
            unknown.append(key)
            continue
        i, module, param = int(m.group(1)), m.group(2), m.group(3)
        prefix = f"joint_blocks.{i}."
        if module == "norm1_context.linear":
            # The last block only modulates the context stream (context_pre_only): diffusers keeps
            # (scale, shift) there, the original (shift, scale).
            v = _swap_scale_shift(value) if i == n_layers - 1 else value
            out[f"{prefix}context_block.adaLN_modulation.1.{param}"] = v
        elif module in _SD3_BLOCK:
            out[f"{prefix}{_SD3_BLOCK[module]}.{param}"] = value
        elif q := _SD3_QKV_KEY.match(module):
            qkv.setdefault((i, q.group(1), param), {})[q.group(2)] = value
        else:
            unknown.append(key)
    for (i, group, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConversionError(f"block {i} {group}: q/k/v projections incomplete ({sorted(parts)})")
        out[f"joint_blocks.{i}.{_SD3_QKV[group]}.{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    if unknown:
        raise _unknown("SD3 transformer", unknown)
    return out


# --------------------------------------------------------------------------------------------
# Whole models


def _state_dict(module: nn.Module) -> Tensors:
    sd = module.state_dict()
    # torch.compile wraps the model; its keys gain an "_orig_mod." prefix.
    return {k.removeprefix("_orig_mod."): v for k, v in sd.items()}


def denoiser_to_original(denoiser: nn.Module, arch: Arch) -> Tensors:
    """The denoiser's weights in the original layout without any prefix (ComfyUI's diffusion_models layout).

    Args:
        denoiser: A plain (not peft-wrapped) ``UNet2DConditionModel`` or ``SD3Transformer2DModel``.
        arch: Its architecture.

    Raises:
        ConversionError: Unknown keys (e.g. LoRA layers still injected: merge or unload them first).
    """
    sd = _state_dict(denoiser)
    if any(".lora_" in k or ".base_layer." in k for k in sd):
        raise ConversionError(
            "the denoiser still has LoRA layers injected; merge_and_unload() it before saving a full model"
        )
    if arch == Arch.SD3:
        return sd3_transformer_to_original(sd)
    if arch in (Arch.SD15, Arch.SDXL):
        return unet_to_original(sd, layers_per_block=denoiser.config.layers_per_block)
    raise ConversionError(f"no original layout for arch {arch!r}; expected sd15, sdxl or sd3")


def bundle_to_original(bundle, *, include_text_encoders: bool = True) -> Tensors:
    """A whole :class:`ModelBundle` as one original-layout checkpoint (what *Load Checkpoint* reads).

    Keys: ``model.diffusion_model.*``, ``first_stage_model.*`` and the text encoders under
    ``cond_stage_model.transformer.`` (SD1.5), ``conditioner.embedders.0.transformer.`` +
    ``conditioner.embedders.1.model.`` (SDXL, OpenCLIP layout) or ``text_encoders.clip_l|clip_g|t5xxl.transformer.`` (SD3).

    Args:
        bundle: The model.
        include_text_encoders: False writes the denoiser and VAE only.
    """
    out: Tensors = {}
    for k, v in denoiser_to_original(bundle.denoiser, bundle.arch).items():
        out[LDM_PREFIX + k] = v
    for k, v in vae_to_original(_state_dict(bundle.vae)).items():
        out["first_stage_model." + k] = v
    if not include_text_encoders:
        return out
    tes = bundle.text_encoders
    if bundle.arch == Arch.SD15:
        parts = [("cond_stage_model.transformer.", clip_to_original, tes[0])]
    elif bundle.arch == Arch.SDXL:
        parts = [
            ("conditioner.embedders.0.transformer.", clip_to_original, tes[0]),
            ("conditioner.embedders.1.model.", openclip_to_original, tes[1]),
        ]
    else:
        parts = [
            ("text_encoders.clip_l.transformer.", clip_to_original, tes[0]),
            ("text_encoders.clip_g.transformer.", clip_to_original, tes[1]),
            ("text_encoders.t5xxl.transformer.", t5_to_original, tes[2]),
        ]
    for prefix, fn, module in parts:
        if module is None:
            continue
        for k, v in fn(_state_dict(module)).items():
            out[prefix + k] = v
    return out


def save_diffusion_model(
    denoiser: nn.Module, arch: Arch, path: str, *, metadata: Mapping[str, str] | None = None
) -> str:
    """Save a denoiser as ONE safetensors file in the original layout, without ``model.diffusion_model.``.

    That is what ComfyUI's *Load Diffusion Model* (UNETLoader) reads from ``models/diffusion_models``.
    The write is atomic (temporary file + rename).

    Args:
        denoiser: The (fully fine-tuned) UNet or SD3 transformer.
        arch: Its architecture.
        path: Destination ``.safetensors`` file.
        metadata: String metadata for the header (e.g. ``ss_*`` keys).

    Returns:
        The path written.

    Raises:
        ConversionError: The denoiser does not fit the layout (e.g. LoRA layers still injected).
        TypeError: A metadata value is not a string.
    """
    tensors = denoiser_to_original(denoiser, arch)
    meta = {"format": "pt", **dict(metadata or {})}
    save_safetensors_atomic(tensors, path, metadata=meta)
    return path
