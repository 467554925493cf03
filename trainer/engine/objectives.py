"""Training objectives as pure functions: noise a batch of latents, then score the model's output.

Two families, as in diffusers' example scripts:

* UNet models (SD1.5, SDXL): DDPM noising with uniform timesteps, an epsilon or v-prediction
  target, optional noise offset and min-SNR-gamma weights (``train_text_to_image.py``).
* SD3: rectified flow. Timesteps come from a density (logit-normal, mode or uniform) over the
  shifted FlowMatch schedule, ``noisy = (1 - sigma) x0 + sigma noise``, the target is the
  velocity ``noise - x0`` or, with preconditioned outputs, ``x0`` itself
  (``train_dreambooth_lora_sd3.py``).

Every random draw takes an explicit ``torch.Generator`` (kept on the CPU so a resumed run draws
exactly the same noise on any device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
    compute_snr,
)

UNET_PREDICTIONS = ("epsilon", "v_prediction")
FLOW_SAMPLING = ("logit_normal", "mode", "uniform")
FLOW_WEIGHTING = ("none", "sigma_sqrt", "cosmap")


@dataclass
class NoisedBatch:
    """What the denoiser sees and what its output is compared with.

    Attributes:
        noisy: the noised latents, the denoiser's input.
        timesteps: the denoiser's timestep input, one per sample.
        target: what the loss compares the (possibly preconditioned) output with.
        weights: per-sample loss weights (shape ``[batch]``), or None for uniform.
        sigmas: flow only: each sample's sigma, broadcastable to the latents (needed to
            precondition the output); None for UNet objectives.
        precondition: flow only: turn the output into an x0 estimate before the loss.
    """

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None = None
    sigmas: torch.Tensor | None = None
    precondition: bool = False


def _randn_like(
    x: torch.Tensor, generator: torch.Generator | None, shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device, then moved to ``x``'s device and dtype."""
    gen_device = generator.device if generator is not None else x.device
    out = torch.randn(shape or tuple(x.shape), generator=generator, device=gen_device, dtype=torch.float32)
    return out.to(device=x.device, dtype=x.dtype)


# ------------------------------------------------------------------------------------------------
# UNet (DDPM) objectives


def sample_noise(
    latents: torch.Tensor, *, generator: torch.Generator | None, noise_offset: float = 0.0
) -> torch.Tensor:
    """Gaussian noise shaped like ``latents``, plus an optional per-channel offset.

    Args:
        latents: ``[B, C, H, W]``.
        generator: the noise generator (CPU generators keep resume exact across devices).
        noise_offset: scale of a per-sample, per-channel constant added to the noise; it lets the
            model learn very dark or bright images (0 = off).

    Returns:
        The noise tensor, on ``latents``' device and dtype.
    """
    noise = _randn_like(latents, generator)
    if noise_offset:
        offset = _randn_like(latents, generator, (latents.shape[0], latents.shape[1], 1, 1))
        noise = noise + noise_offset * offset
    return noise


def sample_timesteps(
    batch_size: int,
    *,
    num_train_timesteps: int,
    generator: torch.Generator | None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniform integer timesteps in ``[0, num_train_timesteps)``, one per sample."""
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=gen_device)
    return t.to(device=device, dtype=torch.long)


def min_snr_weights(
    scheduler, timesteps: torch.Tensor, *, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), as in diffusers' ``train_text_to_image.py``.

    Args:
        scheduler: a DDPM-style scheduler with ``alphas_cumprod``.
        timesteps: ``[B]`` integer timesteps.
        gamma: the clamp; 5 is the paper's choice.
        prediction_type: "epsilon" divides ``min(snr, gamma)`` by ``snr``; "v_prediction" by
            ``snr + 1`` (the v target already carries a factor of ``snr + 1``).

    Returns:
        ``[B]`` float weights.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be above 0 for min-SNR weighting (got {gamma})")
    snr = compute_snr(scheduler, timesteps)
    clamped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clamped / snr
    if prediction_type == "v_prediction":
        return clamped / (snr + 1)
    raise ValueError(
        f"prediction_type {prediction_type!r} has no min-SNR weighting; use one of {UNET_PREDICTIONS}"
    )


def unet_noised_batch(
    latents: torch.Tensor,
    *,
    scheduler,
    prediction_type: str,
    generator: torch.Generator | None,
    noise_offset: float = 0.0,
    min_snr_gamma: float = 0.0,
    timesteps: torch.Tensor | None = None,
) -> NoisedBatch:
    """Noise ``latents`` for a UNet step and build its target.

    Args:
        latents: ``[B, C, H, W]`` scaled VAE latents.
        scheduler: the model's DDPM-style training scheduler (``add_noise``, ``get_velocity``).
        prediction_type: "epsilon" or "v_prediction".
        generator: drives the noise and the timesteps.
        noise_offset: see :func:`sample_noise`.
        min_snr_gamma: 0 = uniform weights, else min-SNR-gamma weights.
        timesteps: fixed timesteps (evaluation on a known set); drawn uniformly when None. The
            noise is drawn first either way, so fixing the timesteps keeps the noise stream.

    Returns:
        A :class:`NoisedBatch` with ``sigmas`` None.
    """
    if prediction_type not in UNET_PREDICTIONS:
        raise ValueError(
            f"prediction_type {prediction_type!r} is not a UNet objective; use one of {UNET_PREDICTIONS}"
        )
    noise = sample_noise(latents, generator=generator, noise_offset=noise_offset)
    if timesteps is None:
        timesteps = sample_timesteps(
            latents.shape[0],
            num_train_timesteps=scheduler.config.num_train_timesteps,
            generator=generator,
            device=latents.device,
        )
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    weights = None
    if min_snr_gamma > 0:
        weights = min_snr_weights(scheduler, timesteps, gamma=min_snr_gamma, prediction_type=prediction_type)
    return NoisedBatch(noisy=noisy, timesteps=timesteps, target=target, weights=weights)


# ------------------------------------------------------------------------------------------------
# Rectified flow (SD3)


@dataclass(frozen=True)
class FlowSchedule:
    """The shifted FlowMatch training table: ``timesteps[i] = sigmas[i] * N``, sigma descending."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    @property
    def num_train_timesteps(self) -> int:
        return int(self.timesteps.shape[0])


def flow_schedule(*, num_train_timesteps: int = 1000, shift: float = 3.0) -> FlowSchedule:
    """The training table of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift)``.

    Built from the numbers rather than read from the model's scheduler, because pipelines call
    ``set_timesteps`` on that object and change its tables.

    Args:
        num_train_timesteps: N (1000 for SD3).
        shift: the timestep shift (3.0 for SD3 Medium); 1.0 is the plain linear schedule.
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be 1 or more (got {num_train_timesteps})")
    if shift <= 0:
        raise ValueError(f"flow shift must be above 0 (got {shift})")
    t = torch.linspace(1, num_train_timesteps, num_train_timesteps, dtype=torch.float64).flip(0)
    sigmas = t / num_train_timesteps
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return FlowSchedule(timesteps=(sigmas * num_train_timesteps).float(), sigmas=sigmas.float())


def sample_flow_indices(
    batch_size: int,
    *,
    schedule: FlowSchedule,
    sampling: str,
    generator: torch.Generator | None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Indices into ``schedule`` drawn from the SD3 paper's timestep densities.

    Args:
        sampling: "logit_normal", "mode" or "uniform".

    Returns:
        ``[B]`` long indices in ``[0, N)``.
    """
    if sampling not in FLOW_SAMPLING:
        raise ValueError(f"timestep sampling {sampling!r} is unknown; use one of {FLOW_SAMPLING}")
    u = compute_density_for_timestep_sampling(
        weighting_scheme=sampling,
        batch_size=batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        device=generator.device if generator is not None else "cpu",
        generator=generator,
    )
    n = schedule.num_train_timesteps
    return (u * n).long().clamp(0, n - 1).cpu()


def flow_loss_weights(weighting: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-element loss weights for SD3 ("none" = ones), as diffusers' ``compute_loss_weighting_for_sd3``."""
    if weighting not in FLOW_WEIGHTING:
        raise ValueError(f"flow loss weighting {weighting!r} is unknown; use one of {FLOW_WEIGHTING}")
    return compute_loss_weighting_for_sd3(weighting, sigmas)


def flow_noised_batch(
    latents: torch.Tensor,
    *,
    schedule: FlowSchedule,
    generator: torch.Generator | None,
    sampling: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    weighting: str = "none",
    precondition: bool = True,
    indices: torch.Tensor | None = None,
) -> NoisedBatch:
    """Noise ``latents`` along the rectified-flow path and build the target.

    Args:
        latents: ``[B, C, H, W]`` latents, already shifted and scaled for SD3's VAE.
        schedule: from :func:`flow_schedule`.
        generator: drives the noise and the timestep draw.
        sampling, logit_mean, logit_std, mode_scale: the timestep density.
        weighting: the loss weighting scheme.
        precondition: compare ``-sigma * pred + noisy`` (an x0 estimate) with ``x0``; otherwise
            compare the prediction with the velocity ``noise - x0``.
        indices: fixed indices into the schedule (evaluation); drawn when None, after the noise.

    Returns:
        A :class:`NoisedBatch` whose ``weights`` are per element (``[B, 1, 1, 1]`` broadcast).
    """
    noise = _randn_like(latents, generator)
    if indices is None:
        indices = sample_flow_indices(
            latents.shape[0],
            schedule=schedule,
            sampling=sampling,
            generator=generator,
            logit_mean=logit_mean,
            logit_std=logit_std,
            mode_scale=mode_scale,
        )
    indices = indices.cpu()
    timesteps = schedule.timesteps[indices].to(latents.device)
    sigmas = schedule.sigmas[indices].to(device=latents.device, dtype=latents.dtype)
    sigmas = sigmas.reshape(-1, *([1] * (latents.ndim - 1)))
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    target = latents if precondition else noise - latents
    weights = flow_loss_weights(weighting, sigmas.float())
    return NoisedBatch(
        noisy=noisy,
        timesteps=timesteps,
        target=target,
        weights=weights,
        sigmas=sigmas,
        precondition=precondition,
    )


def precondition_flow_output(
    model_pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor
) -> torch.Tensor:
    """The x0 estimate of a velocity prediction: ``pred * (-sigma) + noisy``."""
    return model_pred * (-sigmas) + noisy


# ------------------------------------------------------------------------------------------------
# The loss


def per_sample_loss(model_pred: torch.Tensor, batch: NoisedBatch) -> torch.Tensor:
    """Weighted mean squared error per sample, in fp32.

    Args:
        model_pred: the denoiser's raw output, shaped like the latents.
        batch: from :func:`unet_noised_batch` or :func:`flow_noised_batch`.

    Returns:
        ``[B]`` losses; ``.mean()`` of it is the step's loss.
    """
    pred = model_pred.float()
    if batch.precondition:
        if batch.sigmas is None:
            raise ValueError("a preconditioned loss needs the sigmas of a flow batch")
        pred = precondition_flow_output(pred, batch.noisy.float(), batch.sigmas.float())
    err = (pred - batch.target.float()) ** 2
    weights = batch.weights
    if weights is not None and weights.ndim > 1:
        # Flow weights are per element: weight before the mean, as the SD3 script does.
        err = err * weights.float()
        weights = None
    loss = err.reshape(err.shape[0], -1).mean(dim=1)
    if weights is not None:
        loss = loss * weights.float().to(loss.device)
    return loss


def is_finite_loss(value: float) -> bool:
    """False for NaN and infinities (the run must stop before saving a poisoned checkpoint)."""
    return math.isfinite(value)
