"""Building transformers text encoders (CLIP, OpenCLIP-converted, T5) from state dicts, offline.

Models are created on the meta device and the weights assigned in place, so a 4.7B-parameter T5 is
never initialised randomly first. Every parameter must come from the file: a missing one is an
error naming it, never a silently random weight.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError

log = logging.getLogger("finetune")

# Keys some files carry that are no part of the model's weights.
_JUNK = ("position_ids", "logit_scale")


def _strip_to(sd: dict[str, torch.Tensor], anchor: str) -> dict[str, torch.Tensor]:
    """Drop whatever prefix comes before ``anchor`` (e.g. "text_model.") in every key that has it."""
    prefixes = {k[: k.index(anchor)] for k in sd if anchor in k}
    if len(prefixes) != 1:
        return sd
    (prefix,) = prefixes
    return {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}


def is_openclip_layout(keys) -> bool:
    """True for OpenCLIP text towers (``transformer.resblocks.N.attn.in_proj_weight``), as in SDXL files."""
    return any("transformer.resblocks." in k for k in keys)


def _to_model_layout(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Add or drop the ``text_model.`` prefix per key, whichever the model expects
    (transformers >= 5.6 flattened ``CLIPTextModel`` but not ``CLIPTextModelWithProjection``)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith(_JUNK):
            continue
        if k not in model_keys:
            if ("text_model." + k) in model_keys:
                k = "text_model." + k
            elif k.startswith("text_model.") and k[len("text_model.") :] in model_keys:
                k = k[len("text_model.") :]
        out[k] = v
    return out


def build_text_encoder(
    cls: type[nn.Module],
    config_folder: str | Path,
    state_dict: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    source: str,
) -> nn.Module:
    """Create ``cls`` from ``config_folder/config.json`` and load ``state_dict`` into it.

    Accepts transformers-layout CLIP (with or without a leading prefix before ``text_model.``),
    OpenCLIP layout (converted with diffusers' ``convert_open_clip_checkpoint``) and T5.
    A CLIP-L with projection whose file has no ``text_projection`` gets the identity (what SD3 and
    ComfyUI use for CLIP-L).

    Args:
        cls: ``CLIPTextModel``, ``CLIPTextModelWithProjection`` or ``T5EncoderModel``.
        config_folder: Folder with the model's ``config.json``.
        state_dict: The weights (keys relative to the encoder).
        dtype: Floating-point dtype of the result.
        source: The file the weights came from, for error messages.

    Raises:
        ModelLoadError: Missing config, or weights that do not fit it.
    """
    from accelerate import init_empty_weights

    config_folder = Path(config_folder)
    if not (config_folder / "config.json").is_file():
        raise ModelLoadError(
            f"text encoder config not found: {config_folder / 'config.json'}", path=str(config_folder)
        )
    config = cls.config_class.from_pretrained(str(config_folder), local_files_only=True)
    with init_empty_weights():
        model = cls(config)
    model_keys = set(model.state_dict())

    sd = dict(state_dict)
    if is_openclip_layout(sd):
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

        sd = _strip_to(sd, "transformer.resblocks.")
        # The fused q/k/v rows are split by the hidden width; convert_open_clip_checkpoint reads it
        # from text_projection's first dim (= hidden width in OpenCLIP's x @ proj layout).
        sd = convert_open_clip_checkpoint(model, sd, prefix="")
    elif any("text_model." in k for k in sd):
        sd = _strip_to(sd, "text_model.")
    elif any(k.startswith("encoder.block.") or ".encoder.block." in k for k in sd):
        sd = _strip_to(sd, "encoder.block.")
        if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
            sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
        if "encoder.embed_tokens.weight" not in sd and "shared.weight" in sd:
            sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    sd = _to_model_layout(sd, model_keys)
    if "text_projection.weight" in model_keys and "text_projection.weight" not in sd:
        hidden, proj = config.hidden_size, config.projection_dim
        if hidden != proj:
            raise ModelLoadError(
                f"{source}: text encoder has no text_projection and hidden size {hidden} != projection {proj}",
                path=source,
            )
        sd["text_projection.weight"] = torch.eye(hidden)

    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # torch reports every size mismatch in one message
        raise ModelLoadError(
            f"{source}: the {cls.__name__} weights do not fit the config in {config_folder}: {e}", path=source
        ) from e
    if unexpected:
        log.warning(
            "%s: ignored %d unexpected %s weight(s): %s",
            source,
            len(unexpected),
            cls.__name__,
            ", ".join(unexpected[:5]),
        )
    if hasattr(model, "tie_weights"):
        # assign=True gives T5's shared and encoder.embed_tokens separate Parameter objects; re-tie them.
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if missing or still_meta:
        names = sorted(set(missing) | set(still_meta))
        raise ModelLoadError(
            f"{source}: the {cls.__name__} weights do not fit the config in {config_folder}: {len(names)} missing, "
            f"e.g. {', '.join(names[:5])}",
            path=source,
        )
    return model.to(dtype).eval()
