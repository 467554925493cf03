"""LoRA files: collect the trained weights, write them atomically, read them back into a model.

Files are ``.safetensors`` named the way stock ComfyUI's *Load LoRA* and diffusers'
``load_lora_weights`` apply them in full (see :mod:`trainer.lora.keys`): with an ``.alpha`` for
every module (without it loaders use scale 1.0), or, for SD3, with alpha/rank multiplied into
``lora_B`` and no ``.alpha``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file
from torch import Tensor, nn

from ..config import Arch
from .inject import inject_lora, lora_layers
from .keys import (
    ALPHA,
    LORA_A,
    LORA_B,
    PartLayout,
    canonical_module_name,
    file_layout,
    folds_scale,
    from_file_keys,
    legacy_layouts,
    split_key,
    to_file_keys,
)

log = logging.getLogger("finetune")

SAVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SHOWN = 5  # how many offending keys an error message lists


class LoraMismatchError(ValueError):
    """A LoRA file does not fit the model it is loaded into.

    Attributes:
        path: the file.
        unmatched: file keys that name no layer of the model.
        missing: LoRA layers of the model that the file lacks.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        message: str,
        *,
        unmatched: Sequence[str] = (),
        missing: Sequence[str] = (),
    ):
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.unmatched = list(unmatched)
        self.missing = list(missing)


@dataclass
class LoadReport:
    """What :func:`load_lora` did.

    Attributes:
        path: the file read.
        modules: number of LoRA layers set, by part label (``denoiser``, ``text_encoder[0]`` ...).
        injected: part labels whose LoRA layers were created by the load (the model had none).
        ranks: the distinct ranks in the file.
        alphas: the distinct alphas in the file.
        metadata: the file's ``__metadata__`` strings.
        skipped: keys left unused (only with ``strict=False``).
    """

    path: str
    modules: dict[str, int] = field(default_factory=dict)
    injected: list[str] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _parts(
    arch: Arch | str, denoiser: nn.Module | None, text_encoders: Sequence[nn.Module | None]
) -> list[tuple[PartLayout, nn.Module | None]]:
    layouts = file_layout(arch)
    n_te = sum(1 for lay in layouts if lay.part == "text_encoder")
    if len(text_encoders) > n_te:
        raise ValueError(
            f"text_encoders: {Arch(arch).value} has {n_te} text encoder(s) but {len(text_encoders)} were given"
        )
    out = []
    for lay in layouts:
        if lay.part == "denoiser":
            out.append((lay, denoiser))
        else:
            out.append((lay, text_encoders[lay.index] if lay.index < len(text_encoders) else None))
    return out


def _layout_in_file(layout: PartLayout, arch: Arch | str, tensors: Mapping[str, Tensor]) -> PartLayout:
    """The layout a file uses for ``layout``'s part: today's, or one an earlier version wrote."""
    for candidate in (layout, *legacy_layouts(arch)):
        same_part = (candidate.part, candidate.index) == (layout.part, layout.index)
        if same_part and any(k.startswith(candidate.prefix) for k in tensors):
            return candidate
    return layout


def _canonical_names(module: nn.Module, part: str, names: Sequence[str]) -> dict[str, str]:
    """actual name -> canonical name, refusing two layers that a file could not tell apart."""
    mapping: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        canon = canonical_module_name(name, part=part)
        if canon in seen:
            raise ValueError(
                f"{type(module).__name__}: layers {seen[canon]!r} and {name!r} would get the same LoRA key"
            )
        seen[canon] = name
        mapping[name] = canon
    return mapping


def part_state_dict(module: nn.Module, *, part: str, adapter_name: str = "default") -> dict[str, Tensor]:
    """The LoRA of one model part as a peft-style dict with canonical module names (fp32, on CPU).

    Every module gets ``lora_A.weight``, ``lora_B.weight`` and a 0-d fp32 ``alpha`` equal to the
    alpha the layer really applies (``scaling * rank``).
    """
    layers = lora_layers(module, adapter_name=adapter_name)
    names = _canonical_names(module, part, sorted(layers))
    out: dict[str, Tensor] = {}
    for name, canon in names.items():
        layer = layers[name]
        rank = layer.r[adapter_name]
        out[f"{canon}.{LORA_A}"] = layer.lora_A[adapter_name].weight.detach().float().cpu()
        out[f"{canon}.{LORA_B}"] = layer.lora_B[adapter_name].weight.detach().float().cpu()
        out[f"{canon}.{ALPHA}"] = torch.tensor(float(layer.scaling[adapter_name]) * rank, dtype=torch.float32)
    return out


def lora_state_dict(
    denoiser: nn.Module | None,
    text_encoders: Sequence[nn.Module | None],
    arch: Arch | str,
    *,
    alpha: float | None = None,
    dtype: torch.dtype = torch.float16,
    adapter_name: str = "default",
) -> dict[str, Tensor]:
    """Collect the LoRA weights of the model in the key format ComfyUI loads for ``arch``.

    Args:
        denoiser: the UNet / SD3 transformer (``None`` or one without LoRA: not saved).
        text_encoders: the text encoders in the pipeline's order (``None`` or without LoRA: skipped).
        arch: ``sd15``, ``sdxl`` or ``sd3``.
        alpha: if given, checked against the alpha the layers apply (a guard against a config
            that drifted from the model); the file always stores the applied alpha.
        dtype: dtype of the lora_down/lora_up tensors: float16 (default), bfloat16 or float32.
            Alphas are always 0-d float32 so a fractional alpha survives exactly.
        adapter_name: the peft adapter to save.

    Returns:
        File keys -> contiguous CPU tensors: an ``.alpha`` for every module, or (SD3, see
        :func:`~trainer.lora.keys.folds_scale`) lora_B multiplied by alpha/rank and no ``.alpha``.

    Raises:
        ValueError: no LoRA in the model, an alpha mismatch, a bad dtype, or a weight that is NaN/inf
            (or overflows ``dtype``), naming the module.
    """
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype: {dtype} is not one of {', '.join(str(d) for d in SAVE_DTYPES)}")
    out: dict[str, Tensor] = {}
    for layout, module in _parts(arch, denoiser, text_encoders):
        if module is None:
            continue
        peft_sd = part_state_dict(module, part=layout.part, adapter_name=adapter_name)
        for key, tensor in peft_sd.items():
            module_name, entry = split_key(key)
            if entry == ALPHA:
                applied = float(tensor)
                if alpha is not None and not math.isclose(applied, float(alpha), rel_tol=1e-6, abs_tol=1e-9):
                    raise ValueError(
                        f"alpha: {alpha} was asked for but {layout.label} layer {module_name!r} applies alpha {applied}"
                    )
                continue
            if entry == LORA_B and folds_scale(arch):
                # lora_B is (out, rank[, 1, 1]); folding in fp32 keeps the product exact before rounding.
                tensor = tensor * (float(peft_sd[f"{module_name}.{ALPHA}"]) / tensor.shape[1])
            converted = tensor.to(dtype)
            if not torch.isfinite(converted).all():
                raise ValueError(
                    f"{layout.label} layer {module_name!r}: {entry} has NaN/inf values in {dtype}; "
                    "the run diverged (lower the learning rate) or the values overflow fp16 (save as float32)"
                )
            peft_sd[key] = converted.contiguous()
        if folds_scale(arch):
            peft_sd = {k: v for k, v in peft_sd.items() if split_key(k)[1] != ALPHA}
        out.update(to_file_keys(peft_sd, layout))
    if not out:
        raise ValueError(f"the model has no LoRA adapter {adapter_name!r}; call add_lora() before saving")
    return out


def addnet_hash(tensors: Mapping[str, Tensor]) -> str:
    """sha256 of a safetensors file's tensor data (everything after the header).

    A1111/Forge and the additional-networks extension hash LoRA files this way ("sshs_model_hash"),
    so writing it saves them hashing the file; metadata lives in the header and does not change it.
    """
    blob = save(dict(tensors))
    header_len = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(memoryview(blob)[8 + header_len :]).hexdigest()


def save_lora(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a LoRA file atomically (temporary file in the same folder, then rename).

    A crash or a full disk leaves either the old file or the new one, never half a file. The
    ``sshs_model_hash`` metadata entry is filled in (see :func:`addnet_hash`).

    Args:
        path: destination ``.safetensors`` path; its folder is created if needed.
        tensors: file keys -> tensors (e.g. from :func:`lora_state_dict`).
        metadata: string -> string (e.g. from :func:`~trainer.lora.metadata.kohya_metadata`).

    Returns:
        The path written.

    Raises:
        ValueError: empty tensors, a non-tensor value, or metadata that is not all strings.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path: {str(path)!r} must end in .safetensors")
    if not tensors:
        raise ValueError(f"{path}: no tensors to save")
    bad = [k for k, v in tensors.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path}: values of {bad[:_SHOWN]} are not tensors")
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(
            f"{path}: metadata {bad[:_SHOWN]} must map strings to strings (safetensors stores text only)"
        )
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta["sshs_model_hash"] = addnet_hash(data)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(data, str(tmp), metadata=meta)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_lora(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a ``.safetensors`` LoRA file: (tensors on CPU, metadata).

    Raises:
        FileNotFoundError / ValueError: naming the file, for a missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as e:
        raise ValueError(
            f"{path} is not a readable .safetensors file ({e}); was the save interrupted?"
        ) from None
    return tensors, metadata


def _layer_shape_error(name: str, base: nn.Module, a: Tensor, b: Tensor) -> str | None:
    """Why lora_A/lora_B cannot sit on ``base``, or None when they fit."""
    weight = base.weight
    if isinstance(base, nn.Conv2d):
        fits = (
            a.dim() == 4
            and a.shape[1:] == weight.shape[1:]
            and tuple(b.shape) == (weight.shape[0], a.shape[0], 1, 1)
        )
    elif isinstance(base, nn.Linear):
        fits = (
            a.dim() == 2
            and b.dim() == 2
            and a.shape[1] == weight.shape[1]
            and b.shape == (weight.shape[0], a.shape[0])
        )
    else:
        return f"{name!r} is a {type(base).__name__}, not a Linear or Conv2d layer"
    if fits:
        return None
    return f"{name!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit its weight {tuple(weight.shape)}"


@dataclass
class _PartPlan:
    layout: PartLayout
    module: nn.Module
    weights: dict[str, tuple[Tensor, Tensor, float]]  # actual module name -> (A, B, alpha)
    existing: bool


def _plan_part(
    path: Path,
    layout: PartLayout,
    module: nn.Module,
    tensors: Mapping[str, Tensor],
    *,
    adapter_name: str,
    strict: bool,
) -> tuple[_PartPlan, list[str]]:
    """Match a part's file keys to its layers and check every shape, touching nothing yet."""
    existing = lora_layers(module, adapter_name=adapter_name)
    candidates = sorted(
        n
        for n, sub in module.named_modules()
        if n
        and ".base_layer" not in n
        and ".lora_" not in n
        and isinstance(getattr(sub, "base_layer", sub), (nn.Linear, nn.Conv2d))
    )
    actual_of = {canon: actual for actual, canon in _canonical_names(module, layout.part, candidates).items()}
    peft_sd, unmatched = from_file_keys(tensors, layout, module_names=actual_of)

    grouped: dict[str, dict[str, Tensor]] = {}
    for key, tensor in peft_sd.items():
        module_name, entry = split_key(key)
        grouped.setdefault(actual_of[module_name], {})[entry] = tensor
    problems = []
    weights: dict[str, tuple[Tensor, Tensor, float]] = {}
    modules = dict(module.named_modules())
    for name, entries in sorted(grouped.items()):
        if LORA_A not in entries or LORA_B not in entries:
            problems.append(
                f"{layout.label} layer {name!r} has no {LORA_A if LORA_A not in entries else LORA_B} entry"
            )
            continue
        a, b = entries[LORA_A], entries[LORA_B]
        base = modules[name]
        base = base.get_base_layer() if hasattr(base, "get_base_layer") else base
        shape_error = _layer_shape_error(name, base, a, b)
        if shape_error:
            problems.append(f"{layout.label} layer {shape_error}")
            continue
        rank = a.shape[0]
        alpha = float(entries[ALPHA].float().reshape(-1)[0]) if ALPHA in entries else float(rank)
        if name in existing and existing[name].r[adapter_name] != rank:
            problems.append(
                f"{layout.label} layer {name!r} has rank {existing[name].r[adapter_name]} in the model but {rank} in the file"
            )
            continue
        weights[name] = (a, b, alpha)
    if problems:
        raise LoraMismatchError(
            path, f"{len(problems)} LoRA layer(s) do not fit the model: " + "; ".join(problems[:_SHOWN])
        )
    extra = sorted(set(weights) - set(existing)) if existing else []
    if existing and not strict:
        # The model's LoRA layout is fixed here; file layers outside it are left out, not added.
        for name in extra:
            del weights[name]
        unmatched += [f"{layout.label}:{name}" for name in extra]
    elif existing:
        missing = sorted(set(existing) - set(weights))
        if missing or extra:
            raise LoraMismatchError(
                path,
                f"the {layout.label} has LoRA on {len(existing)} layers but the file has {len(weights)}: "
                + (f"missing from the file: {', '.join(missing[:_SHOWN])}. " if missing else "")
                + (f"not LoRA'd in the model: {', '.join(extra[:_SHOWN])}. " if extra else "")
                + "Was it trained with other lora_targets?",
                missing=missing,
            )
    return _PartPlan(layout, module, weights, existing=bool(existing)), unmatched


@torch.no_grad()
def _apply(plan: _PartPlan, *, adapter_name: str) -> None:
    if not plan.weights:
        return
    if not plan.existing:
        inject_lora(
            plan.module,
            {n: a.shape[0] for n, (a, _, _) in plan.weights.items()},
            {n: alpha for n, (_, _, alpha) in plan.weights.items()},
            adapter_name=adapter_name,
        )
    layers = lora_layers(plan.module, adapter_name=adapter_name)
    for name, (a, b, alpha) in plan.weights.items():
        layer = layers[name]
        layer.lora_A[adapter_name].weight.copy_(a)
        layer.lora_B[adapter_name].weight.copy_(b)
        # The file's alpha is the truth: it is what every other loader applies.
        layer.lora_alpha[adapter_name] = alpha
        layer.scaling[adapter_name] = alpha / layer.r[adapter_name]


def load_lora(
    path: str | os.PathLike,
    denoiser: nn.Module | None,
    text_encoders: Sequence[nn.Module | None],
    arch: Arch | str,
    *,
    adapter_name: str = "default",
    strict: bool = True,
) -> LoadReport:
    """Load a LoRA file into the model: for resuming a run, and to check a saved file.

    A part without LoRA layers gets them (rank and alpha per layer from the file); a part that has
    them (e.g. set up by :func:`~trainer.lora.inject.add_lora` for a resume) gets its weights and
    alphas replaced. Everything is checked before the model is touched. A module without ``.alpha``
    (SD3 files, whose lora_B holds alpha/rank already) gets alpha = rank: the same update. Files of
    earlier versions load too (SD3 text encoders under ``lora_te1_``/``lora_te2_``, with alphas).

    Args:
        path: the ``.safetensors`` file.
        denoiser: the UNet / SD3 transformer.
        text_encoders: the text encoders in the pipeline's order (``None`` for one not loaded).
        arch: ``sd15``, ``sdxl`` or ``sd3``.
        adapter_name: the peft adapter to fill.
        strict: refuse keys that match no layer, and (for a part that already has LoRA) a file that
            covers other layers. With ``False`` such keys are skipped and listed in the report.

    Returns:
        A :class:`LoadReport`.

    Raises:
        LoraMismatchError: naming the file and the first offending keys.
    """
    path = Path(path)
    tensors, metadata = read_lora(path)
    report = LoadReport(path=str(path), metadata=metadata)
    claimed: set[str] = set()
    plans: list[_PartPlan] = []
    unmatched: list[str] = []
    for layout, module in _parts(arch, denoiser, text_encoders):
        if module is None:
            continue
        layout = _layout_in_file(layout, arch, tensors)
        plan, part_unmatched = _plan_part(
            path, layout, module, tensors, adapter_name=adapter_name, strict=strict
        )
        unmatched += part_unmatched
        claimed.update(k for k in tensors if k.startswith(layout.prefix))
        plans.append(plan)
    unmatched += sorted(k for k in tensors if k not in claimed)
    if unmatched and strict:
        raise LoraMismatchError(
            path,
            f"{len(unmatched)} of {len(tensors)} key(s) match no LoRA layer of this {Arch(arch).value} model "
            f"(with {sum(m is not None for m in text_encoders)} text encoder(s) given), "
            f"e.g. {', '.join(sorted(unmatched)[:_SHOWN])}. Was the file made for another model type or another "
            "set of text encoders? Pass strict=False to load the layers that match.",
            unmatched=unmatched,
        )
    if not any(plan.weights for plan in plans):
        raise LoraMismatchError(
            path, f"no key matches a layer of this {Arch(arch).value} model", unmatched=unmatched
        )
    for plan in plans:
        _apply(plan, adapter_name=adapter_name)
        if plan.weights:
            report.modules[plan.layout.label] = len(plan.weights)
            if not plan.existing:
                report.injected.append(plan.layout.label)
    every = [w for plan in plans for w in plan.weights.values()]
    report.ranks = sorted({a.shape[0] for a, _, _ in every})
    report.alphas = sorted({alpha for _, _, alpha in every})
    report.skipped = sorted(unmatched)
    if unmatched:
        log.warning(
            "%s: skipped %d key(s) that match no layer, e.g. %s",
            path,
            len(unmatched),
            ", ".join(sorted(unmatched)[:_SHOWN]),
        )
    return report
