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
