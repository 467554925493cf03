"""Fitting a run to its GPU at start: read the free memory, name the model family without loading
it, and let :func:`.memory.choose` decide (the pure part lives there).

A resumed run trains with the memory plan it started with (recorded in run.json), so its batches,
accumulation and optimizer stay those of the steps already taken.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

from ..config import Arch, MemoryMode, TrainConfig
from ..models.errors import ModelLoadError
from .caching import latents_cacheable, text_cacheable
from .events import HostHooks
from .memory import MemoryPlan, choose, settings_for, user_set

log = logging.getLogger("finetune")


def free_gpu_memory(device: torch.device, host: HostHooks) -> int | None:
    """Bytes the run may use on ``device``: the host's view when it has one (ComfyUI subtracts
    the VRAM it keeps for itself), else the driver's free memory, capped by a per-process memory
    fraction. None on the CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    seen = host.free_vram(device)
    if seen is not None:
        free = seen
    # get_per_process_memory_fraction wants an index: a run's device is often plain "cuda".
    index = device.index if device.index is not None else torch.cuda.current_device()
    fraction = torch.cuda.get_per_process_memory_fraction(index)
    if fraction < 1.0:
        # The allocator refuses past fraction × the device's memory (its properties' total, which
        # is what the fraction is of, whatever mem_get_info reports: bench/comfy_gpu's card
        # emulation makes that an N GiB card).
        total = torch.cuda.get_device_properties(index).total_memory
        free = min(free, int(fraction * total) - torch.cuda.memory_reserved(device))
    return max(0, int(free))


def peek_arch(config: TrainConfig) -> Arch | None:
    """The model family of ``config.base_model`` without loading it (the file's tensor names or
    the folder's model_index.json); None when it cannot tell (the loader will say why)."""
    if config.arch != Arch.AUTO:
        return config.arch
    path = Path(config.base_model) if config.base_model else None
    if path is None:
        return None
    try:
        if path.is_dir() and (path / "model_index.json").is_file():
            from ..models.load import PIPELINE_ARCH

            name = json.loads((path / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
            return PIPELINE_ARCH.get(name)
        if path.is_file() and path.suffix == ".safetensors":
            from safetensors import safe_open

            from ..models.detect import detect_arch

            with safe_open(str(path), framework="pt", device="cpu") as f:
                return detect_arch(list(f.keys()), source=str(path))
    except (OSError, ValueError, ModelLoadError) as e:
        log.info("finetune: could not tell the model family of %s before loading (%s)", path, e)
    return None


def bitsandbytes_usable(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None


def encoders_stay_on_gpu(config: TrainConfig) -> bool:
    """Whether the VAE or a text encoder stays on the GPU during steps (something not cached)."""
    if config.memory_mode == MemoryMode.OFF:
        return True
    latents = latents_cacheable(crop=config.crop, mode=config.cache_latents)
    text = text_cacheable(mode=config.cache_text, train_text_encoder=config.train_text_encoder)
    return not (latents and text)


def plan_memory(
    config: TrainConfig,
    arch: Arch,
    *,
    free: int | None,
    device: torch.device,
    recorded: dict | None = None,
) -> MemoryPlan:
    """The run's memory plan: the recorded one on resume, else a fresh choice.

    Raises:
        CardTooSmall: the card cannot hold even the leanest setting (before anything loads).
    """
    settings = settings_for(config, arch, frozen_on_gpu=encoders_stay_on_gpu(config))
    if recorded:
        return MemoryPlan.from_dict(recorded, settings)
    return choose(
        settings,
        free=free,
        mode=config.memory_mode,
        explicit=user_set(config),
        bitsandbytes=bitsandbytes_usable(device),
    )
