"""Putting LoRA layers into a model (peft), and taking them out again (remove or merge).

The LoRA weights are fp32 even when the base model is bf16/fp16 (what peft's
``autocast_adapter_dtype`` does for a ``PeftModel``): low-rank updates are small and would lose
most of their precision in half precision. Initialisation is seeded per module, so the same seed
gives the same LoRA whatever else is in the model and whatever the global RNG state is.
"""

from __future__ import annotations

import logging
import math
import re
import zlib
from collections.abc import Mapping, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

log = logging.getLogger("finetune")

_SUPPORTED = (nn.Linear, nn.Conv2d)


def lora_layers(module: nn.Module, *, adapter_name: str = "default") -> dict[str, LoraLayer]:
    """The peft LoRA layers of ``module`` that carry ``adapter_name``, by module name."""
    return {
        name: sub
        for name, sub in module.named_modules()
        if isinstance(sub, LoraLayer) and adapter_name in sub.lora_A
    }


def _module_seed(seed: int, name: str) -> int:
    # Mix the run seed with the module's name so a layer's init does not depend on what else is LoRA'd.
    return (seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63)


@torch.no_grad()
def _init_lora(layer: LoraLayer, name: str, *, adapter_name: str, seed: int) -> None:
    """kaiming_uniform(a=sqrt(5)) for lora_A (peft's and kohya's init), zeros for lora_B, from a private generator."""
    weight_a = layer.lora_A[adapter_name].weight
    fan_in = weight_a[0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    generator = torch.Generator(device="cpu").manual_seed(_module_seed(seed, name))
    values = torch.rand(weight_a.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
    weight_a.copy_(values)
    layer.lora_B[adapter_name].weight.zero_()


def _check_targets(module: nn.Module, target_names: Sequence[str], adapter_name: str) -> None:
    modules = dict(module.named_modules())
    missing = [n for n in target_names if n not in modules]
    if missing:
        raise ValueError(
            f"target_names: {len(missing)} name(s) are not modules of {type(module).__name__}, "
            f"e.g. {', '.join(repr(n) for n in missing[:3])}; take the names from target_modules()"
        )
    for name in target_names:
        sub = modules[name]
        if isinstance(sub, LoraLayer) and adapter_name in sub.lora_A:
            raise ValueError(
                f"{name!r} already has a LoRA adapter {adapter_name!r}; call remove_lora() first or use another adapter_name"
            )
        if not isinstance(sub, _SUPPORTED) and not isinstance(sub, BaseTunerLayer):
            raise ValueError(
                f"{name!r} is a {type(sub).__name__}; LoRA goes on Linear and Conv2d layers only"
            )


def inject_lora(
    module: nn.Module,
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    *,
    dropout: float = 0.0,
    adapter_name: str = "default",
    seed: int = 0,
) -> list[nn.Parameter]:
    """Put a LoRA with its own rank and alpha on each named layer (what loading a file needs).

    Args:
        module: the model part (denoiser or one text encoder).
        ranks: exact module name -> rank.
        alphas: exact module name -> alpha (same keys as ``ranks``).
        dropout: dropout inside the LoRA layers.
        adapter_name: the peft adapter name.
        seed: initialisation seed.

    Returns:
        The LoRA parameters (fp32, trainable), lora_A then lora_B of each module in name order.
    """
    names = sorted(ranks)
    if not names:
        raise ValueError("target_names: empty; nothing to put a LoRA on")
    if set(alphas) != set(ranks):
        raise ValueError("alphas: must name exactly the modules of ranks")
    for name in names:
        if int(ranks[name]) < 1:
            raise ValueError(f"rank: {ranks[name]} for {name!r} must be at least 1")
        if not math.isfinite(float(alphas[name])) or float(alphas[name]) < 0:
            raise ValueError(f"alpha: {alphas[name]} for {name!r} must be a finite number >= 0")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: {dropout} must be in [0, 1)")
    _check_targets(module, names, adapter_name)

    # The full-name regex and the per-name patterns make peft match exactly these layers;
    # plain names in target_modules would also match any longer path ending in them.
    exact = [re.escape(n) for n in names]
    default_rank = int(ranks[names[0]])
    default_alpha = float(alphas[names[0]])
    config = LoraConfig(
        r=default_rank,
        lora_alpha=default_alpha,
        lora_dropout=float(dropout),
        target_modules="(?:" + "|".join(exact) + ")",
        rank_pattern={
            p: int(ranks[n]) for p, n in zip(exact, names, strict=True) if int(ranks[n]) != default_rank
        },
        alpha_pattern={
            p: float(alphas[n])
            for p, n in zip(exact, names, strict=True)
            if float(alphas[n]) != default_alpha
        },
        init_lora_weights=True,
    )
    before = set(lora_layers(module, adapter_name=adapter_name))
    # A second call on the same model (more layers, same adapter) is intended here; peft would warn
    # about "multiple adapters" if it saw its bookkeeping attribute, so it is set aside and merged back.
    previous = module.__dict__.pop("peft_config", {})
    inject_adapter_in_model(config, module, adapter_name=adapter_name)
    module.peft_config = {**previous, **module.peft_config}

    layers = lora_layers(module, adapter_name=adapter_name)
    params: list[nn.Parameter] = []
    for name in names:
        layer = layers.get(name)
        if layer is None:
            raise RuntimeError(
                f"peft did not wrap {name!r}; this peft version matches target names differently"
            )
        if layer.r[adapter_name] != int(ranks[name]):
            raise RuntimeError(f"peft gave {name!r} rank {layer.r[adapter_name]} instead of {ranks[name]}")
        layer.lora_A[adapter_name].to(torch.float32)
        layer.lora_B[adapter_name].to(torch.float32)
        _init_lora(layer, name, adapter_name=adapter_name, seed=seed)
        for lin in (layer.lora_A[adapter_name], layer.lora_B[adapter_name]):
            lin.weight.requires_grad_(True)
            params.append(lin.weight)
    unexpected = sorted(set(layers) - set(names) - before)
    if unexpected:
        raise RuntimeError(f"peft wrapped layers that were not asked for: {unexpected[:3]}")
    return params


def add_lora(
    module: nn.Module,
    target_names: Sequence[str],
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    adapter_name: str = "default",
    seed: int = 0,
) -> list[nn.Parameter]:
    """Put a LoRA on each named layer and freeze the rest of ``module``.

    The update of a layer is ``(alpha / rank) * lora_B @ lora_A``; lora_B starts at zero, so the
    model is unchanged until training moves it.

    Args:
        module: the model part (denoiser or one text encoder).
        target_names: exact module names, e.g. from :func:`~trainer.lora.targets.target_modules`.
        rank: LoRA rank (kohya ``network_dim``).
        alpha: LoRA alpha (kohya ``network_alpha``).
        dropout: dropout on the LoRA input.
        adapter_name: the peft adapter name.
        seed: initialisation seed; the same seed gives the same lora_A values.

    Returns:
        The trainable LoRA parameters (fp32), lora_A then lora_B of each module in name order.

    Raises:
        ValueError: a bad rank/alpha/dropout, a name that is not a Linear/Conv2d layer of ``module``,
            or a layer that already has this adapter.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: {rank!r} must be a whole number >= 1")
    module.requires_grad_(False)
    names = list(dict.fromkeys(target_names))
    return inject_lora(
        module,
        {n: rank for n in names},
        {n: float(alpha) for n in names},
        dropout=dropout,
        adapter_name=adapter_name,
        seed=seed,
    )


def lora_parameters(module: nn.Module, *, adapter_name: str = "default") -> list[nn.Parameter]:
    """The LoRA parameters already in ``module`` (lora_A then lora_B of each layer, in name order)."""
    layers = lora_layers(module, adapter_name=adapter_name)
    return [
        p
        for name in sorted(layers)
        for p in (layers[name].lora_A[adapter_name].weight, layers[name].lora_B[adapter_name].weight)
    ]


def _unwrap(module: nn.Module, *, merge: bool) -> int:
    wrapped = [(name, sub) for name, sub in module.named_modules() if isinstance(sub, BaseTunerLayer)]
    for name, layer in wrapped:
        if merge:
            # safe_merge refuses weights that turn NaN/inf instead of silently breaking the model.
            layer.merge(safe_merge=True)
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, layer.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config
    return len(wrapped)


def remove_lora(module: nn.Module) -> int:
    """Take every LoRA layer out of ``module``, restoring the original layers unchanged.

    Returns:
        How many layers were unwrapped.
    """
    return _unwrap(module, merge=False)


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA into its base weight (``W += alpha/rank * B @ A``) and remove the LoRA layers.

    Returns:
        How many layers were merged.

    Raises:
        ValueError: when a merged weight would contain NaN or inf.
    """
    return _unwrap(module, merge=True)
