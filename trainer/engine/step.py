"""One forward pass and its loss, for each architecture's denoiser and objective."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import Arch, PredictionType, TrainConfig
from .inputs import DenoiserInputs
from .objectives import (
    FlowSchedule,
    NoisedBatch,
    flow_noised_batch,
    flow_schedule,
    per_sample_loss,
    unet_noised_batch,
)


@dataclass(frozen=True)
class Objective:
    """The training objective of a run, resolved from the model and the config.

    Attributes:
        kind: "epsilon", "v_prediction" or "flow".
        scheduler: the DDPM training scheduler (UNets), None for flow.
        flow: the shifted flow table (SD3), None for UNets.
    """

    kind: str
    scheduler: object | None = None
    flow: FlowSchedule | None = None
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0
    sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: str = "none"
    precondition: bool = True

    @classmethod
    def for_run(cls, *, model_prediction: str, noise_scheduler, config: TrainConfig) -> Objective:
        """Resolve the objective.

        Args:
            model_prediction: what the model was trained for ("epsilon", "v_prediction", "flow").
            noise_scheduler: the model's training scheduler.
            config: ``prediction_type`` overrides a UNet's objective; the flow options apply to SD3.
        """
        if model_prediction == "flow":
            n = int(getattr(noise_scheduler.config, "num_train_timesteps", 1000))
            return cls(
                kind="flow",
                flow=flow_schedule(num_train_timesteps=n, shift=config.flow_shift),
                sampling=config.timestep_sampling.value,
                logit_mean=config.logit_mean,
                logit_std=config.logit_std,
                mode_scale=config.mode_scale,
                weighting=config.flow_loss_weighting.value,
                precondition=config.precondition_outputs,
            )
        kind = (
            model_prediction
            if config.prediction_type == PredictionType.AUTO
            else config.prediction_type.value
        )
        return cls(
            kind=kind,
            scheduler=noise_scheduler,
            noise_offset=config.noise_offset,
            min_snr_gamma=config.min_snr_gamma,
        )

    def noised(
        self, latents: torch.Tensor, *, generator: torch.Generator, fixed: torch.Tensor | None = None
    ) -> NoisedBatch:
        """Noise a batch; ``fixed`` pins the timesteps (UNet) or schedule indices (flow)."""
        if self.kind == "flow":
            return flow_noised_batch(
                latents,
                schedule=self.flow,  # type: ignore[arg-type]
                generator=generator,
                sampling=self.sampling,
                logit_mean=self.logit_mean,
                logit_std=self.logit_std,
                mode_scale=self.mode_scale,
                weighting=self.weighting,
                precondition=self.precondition,
                indices=fixed,
            )
        return unet_noised_batch(
            latents,
            scheduler=self.scheduler,
            prediction_type=self.kind,
            generator=generator,
            noise_offset=self.noise_offset,
            min_snr_gamma=self.min_snr_gamma,
            timesteps=fixed,
        )


def denoise(denoiser: nn.Module, arch: Arch, noised: NoisedBatch, inputs: DenoiserInputs) -> torch.Tensor:
    """Run the denoiser on a noised batch with its conditioning; returns its raw prediction."""
    if arch == Arch.SD3:
        return denoiser(
            hidden_states=noised.noisy,
            timestep=noised.timesteps,
            encoder_hidden_states=inputs.prompt_embeds,
            pooled_projections=inputs.pooled,
            return_dict=False,
        )[0]
    added = None
    if arch == Arch.SDXL:
        added = {"text_embeds": inputs.pooled, "time_ids": inputs.time_ids}
    return denoiser(
        noised.noisy,
        noised.timesteps,
        encoder_hidden_states=inputs.prompt_embeds,
        added_cond_kwargs=added,
        return_dict=False,
    )[0]


def batch_loss(
    denoiser: nn.Module,
    arch: Arch,
    objective: Objective,
    inputs: DenoiserInputs,
    *,
    generator: torch.Generator,
    fixed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample losses ``[B]`` of one micro-batch (call under the run's autocast)."""
    noised = objective.noised(inputs.latents, generator=generator, fixed=fixed)
    pred = denoise(denoiser, arch, noised, inputs)
    return per_sample_loss(pred, noised)


@torch.no_grad()
def fixed_timestep_loss(
    denoiser: nn.Module,
    arch: Arch,
    objective: Objective,
    inputs: DenoiserInputs,
    *,
    points: torch.Tensor,
    seed: int = 0,
) -> float:
    """Mean loss over fixed timesteps (UNet) or schedule indices (flow) with fixed noise.

    Used to compare a model before and after training without the noise of random timesteps.

    Args:
        points: the timesteps / indices; each is evaluated on the whole batch.
        seed: seed of the noise (the same for every call, so two models see the same noise).
    """
    was_training = denoiser.training
    denoiser.eval()
    try:
        total = 0.0
        for i, t in enumerate(points.tolist()):
            generator = torch.Generator().manual_seed(seed + i)
            fixed = torch.full((inputs.latents.shape[0],), t, dtype=torch.long)
            total += float(
                batch_loss(denoiser, arch, objective, inputs, generator=generator, fixed=fixed).mean()
            )
        return total / len(points)
    finally:
        denoiser.train(was_training)
