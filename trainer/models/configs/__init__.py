"""Shipped diffusers-layout configs of the real base models (no weights), and schedulers built from them.

``sd15/`` is runwayml/stable-diffusion-v1-5, ``sdxl/`` stabilityai/stable-diffusion-xl-base-1.0 and
``sd3/`` stabilityai/stable-diffusion-3-medium-diffusers. diffusers' single-file loaders read them
instead of reaching the Hub. ``tiny_tokenizer/`` holds the tokenizers of the tiny test models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...config import Arch

CONFIG_ROOT = Path(__file__).resolve().parent


def shipped_config_dir(arch: Arch) -> Path:
    """The shipped config folder of a real architecture (diffusers layout)."""
    if arch not in (Arch.SD15, Arch.SDXL, Arch.SD3):
        raise ValueError(f"no shipped config for arch {arch!r}; expected sd15, sdxl or sd3")
    return CONFIG_ROOT / arch.value


def scheduler_for(arch: Arch, *, prediction_type: str, config_dir: str | Path = "") -> Any:
    """The training noise scheduler: DDPM for the UNets, flow-matching Euler (shift 3.0) for SD3.

    Args:
        arch: SD15, SDXL or SD3.
        prediction_type: "epsilon" or "v_prediction" for UNets; "flow" for SD3.
        config_dir: A diffusers-layout folder whose ``scheduler/scheduler_config.json`` gives the
            betas / shift; defaults to the shipped config of ``arch``.
    """
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    folder = Path(config_dir) if config_dir else shipped_config_dir(arch)
    sched_dir = folder / "scheduler"
    if arch == Arch.SD3:
        if prediction_type != "flow":
            raise ValueError(
                f"SD3 is a rectified-flow model; prediction_type must be 'flow', got {prediction_type!r}"
            )
        if (sched_dir / "scheduler_config.json").is_file():
            return FlowMatchEulerDiscreteScheduler.from_config(
                FlowMatchEulerDiscreteScheduler.load_config(str(sched_dir))
            )
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"UNet models predict 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if not (sched_dir / "scheduler_config.json").is_file():
        sched_dir = shipped_config_dir(arch) / "scheduler"
    config = dict(DDPMScheduler.load_config(str(sched_dir)))
    config.pop("_class_name", None)
    return DDPMScheduler.from_config(config, prediction_type=prediction_type)


# Single files we write (tiny and custom-size models) carry their diffusers configs in the
# safetensors metadata, so they load from ComfyUI's checkpoints folder with no config_dir.
EMBEDDED_CONFIGS_KEY = "finetune.diffusers_configs"


def embedded_configs(bundle: Any) -> str:
    """The bundle's component configs as JSON: ``{sub-folder: config dict}`` in diffusers layout."""
    import json

    parts: dict[str, dict] = {
        bundle.denoiser_name: dict(bundle.denoiser.config),
        "vae": dict(bundle.vae.config),
        "scheduler": dict(bundle.noise_scheduler.config),
    }
    for i, te in enumerate(bundle.text_encoders):
        if te is not None:
            parts["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = te.config.to_dict()
    return json.dumps(parts, default=lambda o: list(o) if isinstance(o, tuple) else str(o))


def write_embedded_configs(text: str, dest: Path) -> Path:
    """Write what :func:`embedded_configs` produced as a diffusers-layout config folder under ``dest``."""
    import json

    for sub, config in json.loads(text).items():
        name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        (dest / sub).mkdir(parents=True, exist_ok=True)
        (dest / sub / name).write_text(json.dumps(config), encoding="utf-8")
    return dest


EMBEDDED_TOKENIZER_KEY = "finetune.tokenizer_files"


def embedded_tokenizer(folder: Path) -> str:
    """A tokenizer folder's text files as JSON ``{relative path: text}``.

    Only custom vocabularies (the tiny test models) need this; real models use the standard CLIP/T5
    tokenizers that ComfyUI and diffusers folders already have.
    """
    import json

    files = {
        p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8")
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    return json.dumps(files)


def write_embedded_tokenizer(text: str, dest: Path) -> Path:
    import json

    for rel, content in json.loads(text).items():
        target = dest / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ValueError(f"embedded tokenizer file {rel!r} would be written outside {dest}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
    return dest
