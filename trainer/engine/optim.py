"""Optimisers and learning-rate schedules, by name.

A ``str`` Enum plus a dict of factories, so an unknown name is an error that lists the choices and
never a silent fallback. Optional optimisers (bitsandbytes) are imported only when chosen.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from diffusers.optimization import get_scheduler

from ..config import OptimizerName, ScheduleName


@dataclass(frozen=True)
class OptimizerSettings:
    """The hyper-parameters every optimiser factory receives (each uses the ones it knows)."""

    lr: float
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    device_type: str = "cpu"


def param_groups(
    *,
    denoiser_params: Iterable[torch.nn.Parameter],
    text_params: Iterable[torch.nn.Parameter] = (),
    lr: float,
    text_lr: float = 0.0,
) -> list[dict]:
    """Optimizer parameter groups: the denoiser's, then the text encoders' (if any).

    Args:
        denoiser_params: trainable denoiser parameters (LoRA or full).
        text_params: trainable text-encoder parameters.
        lr: the denoiser's learning rate.
        text_lr: the text encoders' learning rate; 0 means the same as ``lr``.

    Returns:
        One or two groups, each ``{"params", "lr", "name"}``; a group without parameters is left out.

    Raises:
        ValueError: when no parameter at all requires a gradient.
    """
    groups = []
    dparams = [p for p in denoiser_params if p.requires_grad]
    tparams = [p for p in text_params if p.requires_grad]
    if dparams:
        groups.append({"params": dparams, "lr": lr, "name": "denoiser"})
    if tparams:
        groups.append({"params": tparams, "lr": text_lr or lr, "name": "text_encoder"})
    if not groups:
        raise ValueError("nothing to train: no parameter requires a gradient (did adding LoRA fail?)")
    return groups


def _adamw(groups: list[dict], s: OptimizerSettings) -> torch.optim.Optimizer:
    # The fused kernel is CUDA-only and much faster there; on the CPU the default is exact and fine.
    fused = s.device_type == "cuda"
    return torch.optim.AdamW(
        groups, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay, fused=fused or None
    )


def _adamw_8bit(groups: list[dict], s: OptimizerSettings) -> torch.optim.Optimizer:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes (or choose 'adamw')"
        )
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(groups, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)


def _adafactor(groups: list[dict], s: OptimizerSettings) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    # relative_step off: our schedule sets the learning rate, as with the other optimisers.
    return Adafactor(
        groups,
        lr=s.lr,
        weight_decay=s.weight_decay,
        relative_step=False,
        scale_parameter=False,
        warmup_init=False,
    )


OPTIMIZERS: dict[OptimizerName, Callable[[list[dict], OptimizerSettings], torch.optim.Optimizer]] = {
    OptimizerName.ADAMW: _adamw,
    OptimizerName.ADAMW_8BIT: _adamw_8bit,
    OptimizerName.ADAFACTOR: _adafactor,
}


def build_optimizer(
    name: OptimizerName | str, groups: list[dict], settings: OptimizerSettings
) -> torch.optim.Optimizer:
    """Make the optimiser called ``name`` over ``groups``.

    Raises:
        ValueError: an unknown name, listing the valid ones.
        ImportError: an optional package is missing, naming what to install.
    """
    try:
        key = OptimizerName(name)
    except ValueError:
        raise ValueError(
            f"optimizer {name!r} is unknown; use one of {[o.value for o in OptimizerName]}"
        ) from None
    return OPTIMIZERS[key](groups, settings)


def build_schedule(
    name: ScheduleName | str,
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A learning-rate schedule stepped once per optimizer step (diffusers' ``get_scheduler``).

    Args:
        name: one of :class:`ScheduleName` ("constant" ignores the warm-up; use
            "constant_with_warmup" for one).
        warmup_steps: linear warm-up length in optimizer steps.
        total_steps: the run's optimizer steps (the plan's total).
        num_cycles: restarts for "cosine_with_restarts".
        power: exponent for "polynomial".
    """
    try:
        key = ScheduleName(name)
    except ValueError:
        raise ValueError(
            f"lr_scheduler {name!r} is unknown; use one of {[s.value for s in ScheduleName]}"
        ) from None
    if total_steps < 1:
        raise ValueError(f"total_steps must be 1 or more (got {total_steps})")
    warmup = max(0, min(int(warmup_steps), total_steps))
    return get_scheduler(
        key.value,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
        num_cycles=num_cycles,
        power=power,
    )
