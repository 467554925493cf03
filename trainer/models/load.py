"""Loading a base model offline: a diffusers folder or one original-layout (ComfyUI) file.

Single files go through diffusers' own converters (``from_single_file`` with ``config=`` a local
diffusers-layout folder, which is what keeps it off the Hub): the shipped real configs by default,
or ``config_dir`` for custom/tiny models. Text encoders may live in the file or in separate files
(ComfyUI's ``models/clip``); tokenizers come from ``tokenizer_dir`` (see :mod:`.tokenizers`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Arch
from .bundle import ModelBundle
from .configs import (
    EMBEDDED_CONFIGS_KEY,
    EMBEDDED_TOKENIZER_KEY,
    scheduler_for,
    shipped_config_dir,
    write_embedded_configs,
    write_embedded_tokenizer,
)
from .detect import LDM_PREFIX, TEXT_ENCODER_PREFIXES, VAE_PREFIX, CheckpointInfo, inspect_checkpoint
from .errors import ModelLoadError
from .files import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    load_state_dict,
    pickle_refused,
    read_safetensors_header,
)
from .text_encoders import build_text_encoder
from .tokenizers import load_tokenizers

log = logging.getLogger("finetune")

PIPELINE_ARCH = {
    "StableDiffusionPipeline": Arch.SD15,
    "StableDiffusionXLPipeline": Arch.SDXL,
    "StableDiffusion3Pipeline": Arch.SD3,
}
# (sub-folder, transformers class name, keyword naming a separate file) per text-encoder slot.
_TE_SLOTS: dict[Arch, list[tuple[str, str, str]]] = {
    Arch.SD15: [("text_encoder", "CLIPTextModel", "clip_l")],
    Arch.SDXL: [
        ("text_encoder", "CLIPTextModel", "clip_l"),
        ("text_encoder_2", "CLIPTextModelWithProjection", "clip_g"),
    ],
    Arch.SD3: [
        ("text_encoder", "CLIPTextModelWithProjection", "clip_l"),
        ("text_encoder_2", "CLIPTextModelWithProjection", "clip_g"),
        ("text_encoder_3", "T5EncoderModel", "t5xxl"),
    ],
}
_TE_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")


def _te_class(name: str) -> type[nn.Module]:
    import transformers

    if name not in _TE_CLASSES:
        raise ModelLoadError(f"unsupported text encoder class {name!r}; expected one of {_TE_CLASSES}")
    return getattr(transformers, name)


def _resolve_prediction(arch: Arch, requested: Any, detected: str) -> str:
    req = str(getattr(requested, "value", requested) or "auto")
    if arch == Arch.SD3:
        if req not in ("auto", "flow"):
            raise ModelLoadError(
                f"SD3 is a rectified-flow model; prediction_type {req!r} does not apply (use auto)"
            )
        return "flow"
    if req == "auto":
        return detected
    if req not in ("epsilon", "v_prediction"):
        raise ModelLoadError(f"prediction_type must be auto, epsilon or v_prediction, got {req!r}")
    return req


def _check_arch(wanted: Arch, found: Arch, path: str) -> None:
    if wanted not in (Arch.AUTO, found):
        raise ModelLoadError(
            f"{path} holds a {found.value} model but arch={wanted.value} was asked; set arch to auto or {found.value}",
            path=path,
        )


def _no_meta(model: nn.Module, what: str, path: str) -> nn.Module:
    """diffusers leaves weights missing from a file on the meta device; make that an error."""
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if missing:
        raise ModelLoadError(
            f"{path}: the {what} is incomplete: {len(missing)} weight(s) missing, e.g. {', '.join(missing[:5])}",
            path=path,
        )
    return model


# --------------------------------------------------------------------------------------------
# Diffusers folders


def _variant(sub: Path) -> str | None:
    """ "fp16" when a component folder only has fp16-variant weights (as many Hub repos ship)."""
    if not sub.is_dir():
        return None
    names = set(os.listdir(sub))
    plain = {
        "diffusion_pytorch_model.safetensors",
        "model.safetensors",
        "diffusion_pytorch_model.bin",
        "pytorch_model.bin",
        "diffusion_pytorch_model.safetensors.index.json",
        "model.safetensors.index.json",
    }
    if names & plain:
        return None
    return "fp16" if any(".fp16." in n for n in names) else None


def _from_pretrained(cls: Any, folder: Path, sub: str, *, dtype: torch.dtype, allow_pickle: bool) -> Any:
    kwargs: dict[str, Any] = {"subfolder": sub, "local_files_only": True, "dtype": dtype}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    variant = _variant(folder / sub)
    if variant:
        kwargs["variant"] = variant
    try:
        return cls.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        hint = "" if allow_pickle else " (only .safetensors weights are read unless pickle files are allowed)"
        raise ModelLoadError(
            f"cannot load {folder / sub}{hint}: {type(e).__name__}: {e}", path=str(folder / sub)
        ) from e


def _folder_arch(folder: Path, index: dict) -> Arch:
    name = index.get("_class_name", "")
    arch = PIPELINE_ARCH.get(name)
    if arch is None:
        raise ModelLoadError(
            f"{folder}/model_index.json names pipeline {name!r}; supported: "
            + ", ".join(f"{k} ({v.value})" for k, v in PIPELINE_ARCH.items()),
            path=str(folder),
        )
    if arch == Arch.SD15:
        unet_cfg = _read_json(folder / "unet" / "config.json")
        if unet_cfg.get("cross_attention_dim") == 1024:
            raise ModelLoadError(
                f"{folder} looks like an SD2.x model (cross-attention 1024); supported: SD1.5, SDXL, SD3 Medium",
                path=str(folder),
            )
    if arch == Arch.SD3:
        t_cfg = _read_json(folder / "transformer" / "config.json")
        if t_cfg.get("qk_norm") or t_cfg.get("dual_attention_layers"):
            raise ModelLoadError(
                f"{folder} looks like an SD3.5 model (qk-norm / dual attention); supported: SD3 Medium",
                path=str(folder),
            )
    return arch


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"missing {path}", path=str(path)) from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}", path=str(path)) from e


def load_diffusers_folder(
    folder: str,
    *,
    arch: Arch = Arch.AUTO,
    tokenizer_dir: str = "",
    use_t5: bool = True,
    allow_pickle: bool = False,
    prediction_type: str = "auto",
    dtype: torch.dtype = torch.float32,
) -> ModelBundle:
    """Load a diffusers-layout model folder (``model_index.json`` + component sub-folders).

    See :func:`load_base_model` for the arguments.
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

    root = Path(folder)
    index = _read_json(root / "model_index.json")
    found = _folder_arch(root, index)
    _check_arch(arch, found, folder)
    denoiser_cls, denoiser_sub = (
        (SD3Transformer2DModel, "transformer") if found == Arch.SD3 else (UNet2DConditionModel, "unet")
    )
    denoiser = _from_pretrained(denoiser_cls, root, denoiser_sub, dtype=dtype, allow_pickle=allow_pickle)
    vae = _from_pretrained(AutoencoderKL, root, "vae", dtype=dtype, allow_pickle=allow_pickle)
    encoders: list[nn.Module | None] = []
    for sub, default_cls, _ in _TE_SLOTS[found]:
        entry = index.get(sub) or [None, None]
        if sub == "text_encoder_3" and (entry[1] is None or not use_t5 or not (root / sub).is_dir()):
            if use_t5:
                log.info("%s has no T5 encoder; SD3 will be conditioned on zeros in its place", folder)
            encoders.append(None)
            continue
        encoders.append(
            _from_pretrained(
                _te_class(entry[1] or default_cls), root, sub, dtype=dtype, allow_pickle=allow_pickle
            ).eval()
        )
    need_t5 = found == Arch.SD3 and encoders[-1] is not None
    tokenizers = load_tokenizers(found, model_dir=folder, tokenizer_dir=tokenizer_dir, need_t5=need_t5)
    sched_cfg = root / "scheduler" / "scheduler_config.json"
    detected = _read_json(sched_cfg).get("prediction_type", "epsilon") if sched_cfg.is_file() else "epsilon"
    prediction = _resolve_prediction(found, prediction_type, detected)
    return ModelBundle(
        arch=found,
        denoiser=denoiser.eval(),
        vae=vae.eval(),
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=scheduler_for(found, prediction_type=prediction, config_dir=root),
        prediction_type=prediction,
        source=str(folder),
        vae_scaling_factor=float(vae.config.scaling_factor),
        vae_shift_factor=float(getattr(vae.config, "shift_factor", None) or 0.0),
    )


# --------------------------------------------------------------------------------------------
# Single files


class WeightFile:
    """One weight file, read lazily by key prefix (safetensors) or all at once (allowed pickle files)."""

    def __init__(self, path: str, *, allow_pickle: bool) -> None:
        self.path = path
        self._tensors: dict[str, torch.Tensor] | None = None
        if Path(path).suffix.lower() in SAFETENSORS_SUFFIXES:
            header = read_safetensors_header(path)
            self.shapes: dict[str, Any] = {k: v for k, v in header.items() if k != "__metadata__"}
            self.metadata: dict[str, str] = header.get("__metadata__") or {}
        else:
            self._tensors = load_state_dict(path, allow_pickle=allow_pickle)
            self.shapes = self._tensors
            self.metadata = {}

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors whose names start with ``prefix`` (names unchanged)."""
        names = [k for k in self.shapes if k.startswith(prefix)]
        if self._tensors is not None:
            return {k: self._tensors[k] for k in names}
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in names}
        except Exception as e:  # safetensors raises its own SafetensorError for corrupt data
            raise ModelLoadError(f"cannot read {self.path}: {e}", path=self.path) from e


def _single_file_model(
    cls: Any,
    sd: dict[str, torch.Tensor],
    *,
    config_dir: Path,
    sub: str,
    dtype: torch.dtype,
    what: str,
    path: str,
) -> Any:
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    if not (config_dir / sub / "config.json").is_file():
        raise ModelLoadError(
            f"config for the {what} not found: {config_dir / sub / 'config.json'}", path=str(config_dir)
        )
    try:
        model = cls.from_single_file(
            sd, config=str(config_dir), subfolder=sub, local_files_only=True, torch_dtype=dtype
        )
    except (KeyError, ValueError, RuntimeError, IndexError, SingleFileComponentError) as e:
        # diffusers appends advice about ignore_mismatched_sizes, which would load random weights: drop it.
        reason = str(e).split(" If you want to instead")[0].replace("Cannot load  because ", "")
        raise ModelLoadError(
            f"{path}: the {what} weights do not fit the config in {config_dir / sub} ({type(e).__name__}: {reason}). "
            "For a custom-size model pass config_dir= a diffusers-layout folder with matching configs.",
            path=path,
        ) from e
    _no_meta(model, what, path)
    # Cast here, and only when needed: diffusers logs a warning on every dtype cast.
    if any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        model = model.to(dtype)
    return model.eval()


def _denoiser_from_file(
    wf: WeightFile, info: CheckpointInfo, *, config_dir: Path, dtype: torch.dtype
) -> nn.Module:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    if info.layout == "ldm":
        sd = wf.tensors(LDM_PREFIX)
    elif info.layout == "bare" and info.arch != Arch.SD3:
        # diffusers' UNet converter only picks keys under the ldm prefix.
        sd = {LDM_PREFIX + k: v for k, v in wf.tensors().items()}
    else:
        sd = wf.tensors()
    if info.arch == Arch.SD3:
        return _single_file_model(
            SD3Transformer2DModel,
            sd,
            config_dir=config_dir,
            sub="transformer",
            dtype=dtype,
            what="SD3 transformer",
            path=wf.path,
        )
    return _single_file_model(
        UNet2DConditionModel, sd, config_dir=config_dir, sub="unet", dtype=dtype, what="UNet", path=wf.path
    )


def _vae_from(sd: dict[str, torch.Tensor], *, config_dir: Path, dtype: torch.dtype, path: str) -> nn.Module:
    from diffusers import AutoencoderKL

    return _single_file_model(
        AutoencoderKL, sd, config_dir=config_dir, sub="vae", dtype=dtype, what="VAE", path=path
    )


def load_single_file(
    path: str,
    *,
    arch: Arch = Arch.AUTO,
    config_dir: str = "",
    tokenizer_dir: str = "",
    vae: str = "",
    clip_l: str = "",
    clip_g: str = "",
    t5xxl: str = "",
    use_t5: bool = True,
    allow_pickle: bool = False,
    prediction_type: str = "auto",
    dtype: torch.dtype = torch.float32,
) -> ModelBundle:
    """Load one original-layout checkpoint (plus optional separate VAE / text-encoder files).

    See :func:`load_base_model` for the arguments.
    """
    wf = WeightFile(path, allow_pickle=allow_pickle)
    info = inspect_checkpoint(wf.shapes, source=path)
    _check_arch(arch, info.arch, path)
    if not config_dir and EMBEDDED_CONFIGS_KEY in wf.metadata:
        with tempfile.TemporaryDirectory(prefix="finetune-configs-") as tmp:
            write_embedded_configs(wf.metadata[EMBEDDED_CONFIGS_KEY], Path(tmp) / "configs")
            if EMBEDDED_TOKENIZER_KEY in wf.metadata:
                # A custom vocabulary must win over the host's standard tokenizer: ids must fit the encoder.
                tokenizer_dir = str(
                    write_embedded_tokenizer(wf.metadata[EMBEDDED_TOKENIZER_KEY], Path(tmp) / "tokenizer")
                )
            return load_single_file(
                path,
                arch=arch,
                config_dir=str(Path(tmp) / "configs"),
                tokenizer_dir=tokenizer_dir,
                vae=vae,
                clip_l=clip_l,
                clip_g=clip_g,
                t5xxl=t5xxl,
                use_t5=use_t5,
                allow_pickle=allow_pickle,
                prediction_type=prediction_type,
                dtype=dtype,
            )
    cfg = Path(config_dir) if config_dir else shipped_config_dir(info.arch)
    if not cfg.is_dir():
        raise ModelLoadError(
            f"config_dir {cfg} is not a folder; it must be a diffusers-layout folder of configs",
            path=str(cfg),
        )

    denoiser = _denoiser_from_file(wf, info, config_dir=cfg, dtype=dtype)

    if vae:
        vf = WeightFile(vae, allow_pickle=allow_pickle)
        vae_model = _vae_from(vf.tensors(), config_dir=cfg, dtype=dtype, path=vae)
    elif info.has_vae:
        vae_model = _vae_from(wf.tensors(VAE_PREFIX), config_dir=cfg, dtype=dtype, path=path)
    else:
        raise ModelLoadError(
            f"{path} holds no VAE (no '{VAE_PREFIX}' weights); pass vae= a VAE .safetensors file", path=path
        )

    separate = {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5xxl}
    encoders: list[nn.Module | None] = []
    for slot, ((sub, cls_name, keyword), prefix) in enumerate(
        zip(_TE_SLOTS[info.arch], TEXT_ENCODER_PREFIXES[info.arch], strict=True)
    ):
        is_t5 = keyword == "t5xxl"
        if is_t5 and not use_t5:
            encoders.append(None)
            continue
        if separate[keyword]:
            source = separate[keyword]
            sd = WeightFile(source, allow_pickle=allow_pickle).tensors()
        elif info.text_encoders[slot]:
            source = path
            sd = {k.removeprefix(prefix): v for k, v in wf.tensors(prefix).items()}
        elif is_t5:
            log.info(
                "%s has no T5 encoder and no t5xxl file was given; SD3 will be conditioned on zeros in its place",
                path,
            )
            encoders.append(None)
            continue
        else:
            raise ModelLoadError(
                f"{path} holds no weights for text encoder {slot + 1} ({sub}, expected under '{prefix}'); "
                f"pass {keyword}= a separate text-encoder file (ComfyUI models/clip)",
                path=path,
            )
        encoders.append(build_text_encoder(_te_class(cls_name), cfg / sub, sd, dtype=dtype, source=source))

    need_t5 = info.arch == Arch.SD3 and encoders[-1] is not None
    tokenizers = load_tokenizers(info.arch, tokenizer_dir=tokenizer_dir, need_t5=need_t5)
    prediction = _resolve_prediction(
        info.arch, prediction_type, "v_prediction" if info.v_prediction else "epsilon"
    )
    return ModelBundle(
        arch=info.arch,
        denoiser=denoiser,
        vae=vae_model,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=scheduler_for(info.arch, prediction_type=prediction, config_dir=cfg),
        prediction_type=prediction,
        source=path,
        vae_scaling_factor=float(vae_model.config.scaling_factor),
        vae_shift_factor=float(getattr(vae_model.config, "shift_factor", None) or 0.0),
    )


def check_model_path(path: str, *, allow_pickle: bool = False) -> None:
    """What can be said of a base model path without reading its weights (what ``plan`` says too).

    Raises:
        ModelLoadError: no path, a missing file, a folder that is no diffusers model, or a
            pickle file without ``allow_pickle``.
    """
    if not path:
        raise ModelLoadError("no model path given")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ModelLoadError(
                f"{path} is a folder without model_index.json; give a diffusers model folder or a single .safetensors file",
                path=path,
            )
        return
    if not os.path.exists(path):
        raise ModelLoadError(f"model file not found: {path}", path=path)
    if Path(path).suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise pickle_refused(path)


def load_base_model(
    path: str,
    *,
    arch: Arch = Arch.AUTO,
    config_dir: str = "",
    tokenizer_dir: str = "",
    vae: str = "",
    clip_l: str = "",
    clip_g: str = "",
    t5xxl: str = "",
    use_t5: bool = True,
    allow_pickle: bool = False,
    prediction_type: str = "auto",
    dtype: torch.dtype = torch.float32,
) -> ModelBundle:
    """Load a base model for training, offline.

    Args:
        path: A diffusers folder (with ``model_index.json``) or one weight file in the original /
            ComfyUI layout (``.safetensors``; ``.ckpt``/``.pt``/``.bin`` only with ``allow_pickle``).
            A bare diffusion-model file (ComfyUI ``models/diffusion_models``) works with ``vae`` and
            the text-encoder files given.
        arch: ``Arch.AUTO`` detects it; anything else must match the file.
        config_dir: Single files: a diffusers-layout folder of configs (a saved diffusers model
            works); default: the shipped configs of the real architecture.
        tokenizer_dir: Single files (or folders without tokenizers): where the tokenizers are —
            tokenizer/, tokenizer_2/, tokenizer_3/ sub-folders, or ComfyUI's ``comfy/sd1_tokenizer``
            (its ``comfy/text_encoders/t5_tokenizer`` is found from there).
        vae: A separate VAE file, used instead of the one in the checkpoint.
        clip_l: A separate CLIP-L file (ComfyUI ``models/clip``): text encoder 1 of any arch.
        clip_g: A separate CLIP-G file: text encoder 2 of SDXL / SD3.
        t5xxl: A separate T5-XXL file for SD3.
        use_t5: SD3: False skips T5 (saves ~10 GB); prompts then get zeros in its place.
        allow_pickle: Allow ``.ckpt``/``.pt``/``.bin`` files (read with ``torch.load(weights_only=True)``).
        prediction_type: "auto" (from the model), "epsilon" or "v_prediction"; SD3 is always "flow".
        dtype: dtype of every loaded part.

    Returns:
        A :class:`ModelBundle` on the CPU.

    Raises:
        ModelLoadError: Anything wrong with the files, with the path and what to do.
    """
    check_model_path(path, allow_pickle=allow_pickle)
    if os.path.isdir(path):
        return load_diffusers_folder(
            path,
            arch=arch,
            tokenizer_dir=tokenizer_dir,
            use_t5=use_t5,
            allow_pickle=allow_pickle,
            prediction_type=prediction_type,
            dtype=dtype,
        )
    return load_single_file(
        path,
        arch=arch,
        config_dir=config_dir,
        tokenizer_dir=tokenizer_dir,
        vae=vae,
        clip_l=clip_l,
        clip_g=clip_g,
        t5xxl=t5xxl,
        use_t5=use_t5,
        allow_pickle=allow_pickle,
        prediction_type=prediction_type,
        dtype=dtype,
    )
