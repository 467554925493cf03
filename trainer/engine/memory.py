"""Fitting a run to the card: how much GPU memory a setting needs, and what ``memory_mode`` auto
turns on when it does not fit.

Two pure functions do the work. :func:`estimate` turns (model family, method, resolution, batch,
rank, precision, options) into bytes; its constants are calibrated on the H100 figures in
``bench/NOTES.md`` (peak allocated memory of a training step with cached inputs: SDXL LoRA 1024 b4
26.6 GiB, 7.9 GiB with gradient checkpointing; SD1.5 LoRA 512 b16 13.4 GiB; SD3 Medium LoRA 1024
b4 18.7 GiB; SD1.5 full b4 17.6 GiB; SDXL full b1 48.5 GiB) and reproduces each within 2 %.
:func:`choose` walks the savers in a fixed order — gradient checkpointing, 8-bit optimizer state,
lower-precision storage of the weights (fp8 frozen base for LoRA, bf16 weights for a full
fine-tune), then a smaller batch with gradient accumulation keeping the effective batch — and stops
at the first setting that fits. A setting the user changed from its default is never touched; a
card too small even for the leanest setting is refused with one sentence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import Arch, LoraTargets, MemoryMode, Method, OptimizerName, Precision, TrainConfig
from ..options import ConfigError

GiB = 2**30

# --------------------------------------------------------------------------------------------
# The model families, counted once (parameters from the shipped diffusers configs, on the meta
# device; tests/test_memory.py checks them against the configs).


@dataclass(frozen=True)
class FamilyFigures:
    """What the estimate needs to know about one model family.

    Attributes:
        name: how messages call it.
        denoiser_params: parameters of the UNet / transformer.
        lora_fan: per LoRA preset, the sum of (in + out) features over the targeted layers
            (a rank-r LoRA has ``r * lora_fan`` parameters).
        text_encoder_params: the text encoders a run may load (SD3: CLIP-L + CLIP-G + T5-XXL).
        t5_params: of which T5-XXL (SD3 only; absent when ``use_t5`` is off or no file is given).
        activation_gib: activations of one sample at the native resolution during a step, in GiB
            (compiled blocks and CUDA graphs, as the defaults run).
        checkpointed_activation_gib: the same with gradient checkpointing.
    """

    name: str
    denoiser_params: int
    lora_fan: dict[LoraTargets, int]
    text_encoder_params: int
    t5_params: int
    activation_gib: float
    checkpointed_activation_gib: float


# Only SDXL was measured with gradient checkpointing (7.86 GiB at b4): its activations shrink to
# 0.104 of the default's; the other families are assumed to shrink alike.
_CHECKPOINT_RATIO = 0.545 / 5.23

FAMILIES: dict[Arch, FamilyFigures] = {
    Arch.SD15: FamilyFigures(
        name="SD1.5",
        denoiser_params=859_520_964,
        lora_fan={
            LoraTargets.ATTENTION: 199_296,
            LoraTargets.ATTENTION_FF: 423_936,
            LoraTargets.ATTENTION_FF_CONV: 1_050_816,
        },
        text_encoder_params=123_060_480,
        t5_params=0,
        activation_gib=0.703,
        checkpointed_activation_gib=0.703 * _CHECKPOINT_RATIO,
    ),
    Arch.SDXL: FamilyFigures(
        name="SDXL",
        denoiser_params=2_567_463_684,
        lora_fan={
            LoraTargets.ATTENTION: 1_451_520,
            LoraTargets.ATTENTION_FF: 2_659_840,
            LoraTargets.ATTENTION_FF_CONV: 3_074_240,
        },
        text_encoder_params=817_800_000,
        t5_params=0,
        activation_gib=5.23,
        checkpointed_activation_gib=0.545,
    ),
    Arch.SD3: FamilyFigures(
        name="SD3 Medium",
        denoiser_params=2_028_328_000,
        lora_fan={
            LoraTargets.ATTENTION: 586_752,
            LoraTargets.ATTENTION_FF: 1_308_672,
            LoraTargets.ATTENTION_FF_CONV: 1_308_672,
        },
        text_encoder_params=818_400_000 + 4_762_310_656,
        t5_params=4_762_310_656,
        activation_gib=3.566,
        checkpointed_activation_gib=3.566 * _CHECKPOINT_RATIO,
    ),
}

NATIVE_RESOLUTION = {Arch.SD15: 512, Arch.SDXL: 1024, Arch.SD3: 1024}
VAE_PARAMS = 83_653_863
#: Activations of the VAE encoding one 1024² image in bf16 (caching encodes one image at a time).
#: Not measured: a bound from the encoder's largest feature maps (128-256 channels at full size).
VAE_ENCODE_GIB = 1.0
#: cuDNN/cuBLAS workspaces, the compiled blocks' and graphs' own buffers, the inputs.
FIXED_OVERHEAD = int(0.5 * GiB)
#: Allocated is not reserved: the caching allocator's slack and fragmentation on top of the peak.
HEADROOM = 1.15

# Bytes a trained parameter costs besides its optimizer state: fp32 weight, fp32 gradient, and the
# half-precision copy autocast (or the CUDA graph) keeps of it for the step.
_OPTIMIZER_STATE = {OptimizerName.ADAMW: 8, OptimizerName.ADAMW_8BIT: 2, OptimizerName.ADAFACTOR: 1}


@dataclass(frozen=True)
class MemorySettings:
    """Everything the estimate depends on (a run's config, reduced to what costs memory).

    ``fp8_base``: LoRA's frozen base weights stored in fp8 (computed in bf16). ``bf16_weights``: a
    full fine-tune keeps its trained weights, gradients and optimizer state in bf16 instead of fp32
    master weights. ``frozen_on_gpu``: the text encoders and VAE stay on the GPU during steps (a
    trained text encoder, or inputs that cannot be cached).
    """

    arch: Arch
    method: Method
    resolution: int
    batch_size: int
    gradient_accumulation: int = 1
    lora_rank: int = 16
    lora_targets: LoraTargets = LoraTargets.ATTENTION
    precision: Precision = Precision.BF16
    gradient_checkpointing: bool = False
    optimizer: OptimizerName = OptimizerName.ADAMW
    fp8_base: bool = False
    bf16_weights: bool = False
    frozen_on_gpu: bool = False
    use_t5: bool = True
    train_text_encoder: bool = False

    @property
    def micro_batch(self) -> int:
        return self.batch_size

    def describe(self) -> str:
        """'SDXL LoRA 1024 b4' (with '× accumulation N' when accumulating)."""
        what = "LoRA" if self.method == Method.LORA else "full"
        acc = f" × accumulation {self.gradient_accumulation}" if self.gradient_accumulation > 1 else ""
        return f"{FAMILIES[self.arch].name} {what} {self.resolution} b{self.batch_size}{acc}"


def estimate(s: MemorySettings) -> dict[str, int]:
    """GPU bytes a run needs, by part, plus ``"step"``, ``"caching"`` and ``"total"``.

    Two moments peak: a training step, and the caching, when the text encoders and the VAE are
    on the GPU (SD3's T5-XXL alone is 8.9 GiB): before the denoiser comes when they leave the GPU
    afterwards, beside it when they stay (``frozen_on_gpu``).

    Args:
        s: the settings (see :class:`MemorySettings`).

    Returns:
        In bytes: ``weights`` (frozen base weights), ``trained`` (trained parameters with
        gradients and optimizer state), ``activations`` (one micro-batch's), ``frozen`` (text
        encoders + VAE during steps; 0 when they leave the GPU), ``overhead``; ``step`` (their
        sum), ``caching`` (the caching's peak) and ``total`` (the larger of the two).
    """
    fam = FAMILIES[s.arch]
    half = s.precision != Precision.FP32
    copy_bytes = 2 if half else 0
    state = _OPTIMIZER_STATE[s.optimizer]
    clip_params = fam.text_encoder_params - fam.t5_params
    if s.method == Method.LORA:
        base_bytes = 1 if s.fp8_base else (2 if half else 4)
        weights = fam.denoiser_params * base_bytes
        lora = s.lora_rank * fam.lora_fan[s.lora_targets]
        trained = lora * (4 + 4 + state + copy_bytes)
        stored = weights + lora * 4  # what is on the GPU before the first step
    else:
        weights = 0
        if s.bf16_weights:
            # bf16 weight and gradient, optimizer state in bf16 too (8-bit stays 2 bytes), no copy.
            weight_bytes, per_param = 2, 2 + 2 + min(state, 4)
        else:
            weight_bytes, per_param = 4, 4 + 4 + state + copy_bytes
        trained = fam.denoiser_params * per_param
        stored = fam.denoiser_params * weight_bytes
        if s.train_text_encoder:  # the CLIP encoders train in full too (never T5)
            trained += clip_params * per_param
    per_sample = fam.checkpointed_activation_gib if s.gradient_checkpointing else fam.activation_gib
    pixels = (s.resolution / NATIVE_RESOLUTION[s.arch]) ** 2
    # fp32 activations are twice the bf16 ones.
    activations = int(per_sample * GiB * pixels * s.micro_batch * (1 if half else 2))
    te = fam.text_encoder_params - (0 if s.use_t5 else fam.t5_params)
    encoders = (te + VAE_PARAMS) * (2 if half else 4)
    parts = {
        "weights": weights,
        "trained": trained,
        "activations": activations,
        "frozen": encoders if s.frozen_on_gpu else 0,
        "overhead": FIXED_OVERHEAD,
    }
    parts["step"] = sum(parts.values())
    vae = int(VAE_ENCODE_GIB * GiB * (s.resolution / 1024) ** 2 * (1 if half else 2))
    parts["caching"] = (stored if s.frozen_on_gpu else 0) + encoders + vae + FIXED_OVERHEAD
    parts["total"] = max(parts["step"], parts["caching"])
    return parts


def fits(need: int, free: int) -> bool:
    """Whether ``need`` allocated bytes fit in ``free`` with the allocator's headroom."""
    return need * HEADROOM <= free


# --------------------------------------------------------------------------------------------
# The chooser


class CardTooSmall(ConfigError):
    """Even the leanest setting needs more memory than the card has free (refused at start)."""

    def __init__(self, *, what: str, free: int, need: int, t5: bool = False):
        self.free = free
        self.need = need
        fix = (
            "turn use_t5 off (T5-XXL alone takes 8.9 GiB while the captions are cached), "
            if t5
            else "use a smaller resolution or model, LoRA instead of a full fine-tune, "
        )
        super().__init__(
            "memory_mode",
            f"{what} needs at least ~{gib(need * HEADROOM)} GiB of GPU memory even with every memory "
            f"saver on, but only {gib(free)} GiB is free on this GPU; {fix}or close what else uses the GPU",
        )


@dataclass
class MemoryPlan:
    """What ``memory_mode`` decided for a run, for run.json and the nodes.

    Attributes:
        mode: the memory_mode asked for.
        free: free GPU bytes seen at the start (None: no GPU, nothing chosen).
        before: the estimate of the settings as given.
        after: the estimate of the settings chosen.
        chosen: the savers turned on, in the order tried ("gradient checkpointing",
            "8-bit optimizer state", "fp8 base weights", "bf16 weights", "batch 2 × accumulation 2").
        settings: the settings the run trains with.
        kept: savers skipped because the user set that option ("gradient_accumulation=4").
        fits: whether ``after`` fits ``free``.
        message: the one readable line.
    """

    mode: MemoryMode
    free: int | None
    before: int
    after: int
    settings: MemorySettings
    chosen: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    fits: bool = True
    message: str = ""

    def to_dict(self) -> dict:
        s = self.settings
        return {
            "mode": self.mode.value,
            "free_bytes": self.free,
            "estimate_bytes": self.before,
            "chosen_estimate_bytes": self.after,
            "chosen": list(self.chosen),
            "kept": list(self.kept),
            "fits": self.fits,
            "settings": {
                "gradient_checkpointing": s.gradient_checkpointing,
                "optimizer": s.optimizer.value,
                "fp8_base": s.fp8_base,
                "bf16_weights": s.bf16_weights,
                "batch_size": s.batch_size,
                "gradient_accumulation": s.gradient_accumulation,
            },
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, data: dict, base: MemorySettings) -> MemoryPlan:
        """A plan recorded in run.json (a resumed run trains with what it started with)."""
        s = data["settings"]
        settings = dataclasses.replace(
            base,
            gradient_checkpointing=bool(s["gradient_checkpointing"]),
            optimizer=OptimizerName(s["optimizer"]),
            fp8_base=bool(s["fp8_base"]),
            bf16_weights=bool(s["bf16_weights"]),
            batch_size=int(s["batch_size"]),
            gradient_accumulation=int(s["gradient_accumulation"]),
        )
        return cls(
            mode=MemoryMode(data["mode"]),
            free=data.get("free_bytes"),
            before=int(data["estimate_bytes"]),
            after=int(data["chosen_estimate_bytes"]),
            settings=settings,
            chosen=list(data.get("chosen", [])),
            kept=list(data.get("kept", [])),
            fits=bool(data.get("fits", True)),
            message=str(data.get("message", "")),
        )

    def apply(self, config: TrainConfig) -> TrainConfig:
        """``config`` with the chosen settings (a copy; fp8/bf16 storage are engine switches,
        read from ``settings``)."""
        s = self.settings
        return dataclasses.replace(
            config,
            gradient_checkpointing=s.gradient_checkpointing,
            optimizer=s.optimizer,
            batch_size=s.batch_size,
            gradient_accumulation=s.gradient_accumulation,
        )


def gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f}"


def settings_for(config: TrainConfig, arch: Arch, *, frozen_on_gpu: bool = False) -> MemorySettings:
    """The memory-relevant part of ``config`` for a model of family ``arch``."""
    return MemorySettings(
        arch=arch,
        method=config.method,
        resolution=config.resolution or NATIVE_RESOLUTION[arch],
        batch_size=config.batch_size,
        gradient_accumulation=config.gradient_accumulation,
        lora_rank=config.lora_rank,
        lora_targets=config.lora_targets,
        precision=config.mixed_precision,
        gradient_checkpointing=config.gradient_checkpointing,
        optimizer=config.optimizer,
        frozen_on_gpu=frozen_on_gpu,
        use_t5=config.use_t5,
        train_text_encoder=config.train_text_encoder,
    )


def user_set(config: TrainConfig) -> set[str]:
    """The memory options the user changed from their defaults (auto never touches those).

    ComfyUI sends every widget's value, so "set" can only mean "not the default": leave an option
    at its default and auto may change it; change it (or choose memory_mode off) and it stays.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    names = ("gradient_checkpointing", "optimizer", "gradient_accumulation")
    return {n for n in names if getattr(config, n) != defaults[n]}


def _micro_batches(batch: int) -> list[int]:
    """Micro-batch sizes that divide ``batch`` evenly, largest first (the batch itself excluded)."""
    return [m for m in range(batch - 1, 0, -1) if batch % m == 0]


def choose(
    settings: MemorySettings,
    *,
    free: int | None,
    mode: MemoryMode = MemoryMode.AUTO,
    explicit: set[str] = frozenset(),
    bitsandbytes: bool = False,
) -> MemoryPlan:
    """Choose the memory savers a run needs to fit ``free`` bytes.

    Args:
        settings: the run's settings as given.
        free: free GPU bytes (None on the CPU: nothing is chosen).
        mode: ``auto`` (as much as needed), ``lowest`` (every saver, whatever is free) or
            ``off`` (as configured).
        explicit: option names the user set (see :func:`user_set`); their savers are skipped.
        bitsandbytes: whether 8-bit optimizers can be used (installed, on CUDA).

    Returns:
        The plan; ``fits`` is False (with a warning in the message) when only options the user
        set keep it from fitting.

    Raises:
        CardTooSmall: ``auto`` and even the leanest setting does not fit.
    """
    before = estimate(settings)["total"]
    what = settings.describe()
    if free is None or mode == MemoryMode.OFF:
        plan = MemoryPlan(mode, free, before, before, settings)
        if free is None:
            plan.message = f"memory {mode.value}: no GPU, nothing to fit ({what})"
        else:
            plan.fits = fits(before, free)
            plan.message = (
                f"memory off: {gib(free)} GiB free; {what} needs ~{gib(before)} GiB, as configured"
                + ("" if plan.fits else " (it may run out of memory)")
            )
        return plan

    steps = _steps(settings, explicit=explicit, bitsandbytes=bitsandbytes)
    # The leanest setting reachable ignoring what the user set: if even that does not fit, the
    # card is too small for this run whatever anyone chooses.
    leanest = settings
    for _, change, _ in _steps(settings, explicit=set(), bitsandbytes=bitsandbytes):
        leanest = change(leanest)
    lean_need = estimate(leanest)["total"]
    if mode == MemoryMode.AUTO and not fits(lean_need, free):
        parts = estimate(leanest)
        # With T5 the caching is what does not fit (the steps would): say so.
        t5 = settings.use_t5 and FAMILIES[settings.arch].t5_params > 0 and fits(parts["step"], free)
        raise CardTooSmall(what=what, free=free, need=lean_need, t5=t5)

    current, chosen, kept = settings, [], []
    for label, change, blocked_by in steps:
        if mode == MemoryMode.AUTO and fits(estimate(current)["total"], free):
            break
        if blocked_by:
            kept.append(blocked_by)
            continue
        if label == "micro-batch":
            current, label = _smallest_batch_needed(current, free, lowest=mode == MemoryMode.LOWEST)
            if label:
                chosen.append(label)
            continue
        current = change(current)
        chosen.append(label)
    after = estimate(current)["total"]
    plan = MemoryPlan(mode, free, before, after, current, chosen=chosen, kept=kept, fits=fits(after, free))
    head = f"memory {mode.value}: {gib(free)} GiB free; {what} needs ~{gib(before)} GiB"
    if not chosen:
        plan.message = head + (", fits as configured" if plan.fits else "")
    else:
        plan.message = f"{head} → {', '.join(chosen)} ({_needs(current)})"
    if kept:
        plan.message += f"; kept as set: {', '.join(kept)}"
    if not plan.fits:
        plan.message += " — it may run out of memory"
    return plan


def _needs(s: MemorySettings) -> str:
    """'~7.9 GiB', or '~5.9 GiB a step, ~12.1 GiB while caching' when the caching needs more."""
    parts = estimate(s)
    if parts["caching"] > parts["step"]:
        return f"~{gib(parts['step'])} GiB a step, ~{gib(parts['caching'])} GiB while caching"
    return f"~{gib(parts['total'])} GiB"


def _steps(settings: MemorySettings, *, explicit: set[str], bitsandbytes: bool) -> list[tuple]:
    """The savers in the order tried: (label, change, why it is skipped or "")."""
    r = dataclasses.replace
    steps: list[tuple] = []
    if not settings.gradient_checkpointing:
        blocked = "gradient_checkpointing=off" if "gradient_checkpointing" in explicit else ""
        steps.append(("gradient checkpointing", lambda s: r(s, gradient_checkpointing=True), blocked))
    if settings.optimizer == OptimizerName.ADAMW and bitsandbytes:
        blocked = "optimizer" if "optimizer" in explicit else ""
        steps.append(("8-bit optimizer state", lambda s: r(s, optimizer=OptimizerName.ADAMW_8BIT), blocked))
    if settings.method == Method.LORA and settings.precision != Precision.FP32:
        steps.append(("fp8 base weights", lambda s: r(s, fp8_base=True), ""))
    elif settings.method == Method.FULL and settings.precision == Precision.BF16:
        # Not fp16: fp16 weights overflow, and the fp16 gradient scaler refuses fp16 gradients.
        steps.append(("bf16 weights", lambda s: r(s, bf16_weights=True), ""))
    if settings.batch_size > 1:
        blocked = (
            f"gradient_accumulation={settings.gradient_accumulation}"
            if "gradient_accumulation" in explicit
            else ""
        )
        steps.append(("micro-batch", _to_micro_batch_one, blocked))
    return steps


def _to_micro_batch_one(s: MemorySettings) -> MemorySettings:
    return dataclasses.replace(s, batch_size=1, gradient_accumulation=s.gradient_accumulation * s.batch_size)


def _smallest_batch_needed(s: MemorySettings, free: int, *, lowest: bool) -> tuple[MemorySettings, str]:
    """The largest micro-batch dividing the batch that fits (1 under ``lowest``), keeping the
    effective batch; returns the settings and a label ("" when nothing changed)."""
    choice = s
    for micro in _micro_batches(s.batch_size):
        choice = dataclasses.replace(
            s, batch_size=micro, gradient_accumulation=s.gradient_accumulation * (s.batch_size // micro)
        )
        if not lowest and fits(estimate(choice)["total"], free):
            break
    if choice is s:
        return s, ""
    return choice, f"batch {choice.batch_size} × accumulation {choice.gradient_accumulation}"
