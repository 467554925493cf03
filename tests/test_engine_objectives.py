"""The objectives on known numbers: v targets, min-SNR weights, the flow path and preconditioning."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from trainer.engine.objectives import (
    NoisedBatch,
    flow_noised_batch,
    flow_schedule,
    min_snr_weights,
    per_sample_loss,
    precondition_flow_output,
    sample_flow_indices,
    sample_noise,
    unet_noised_batch,
)


def ddpm() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )


def test_v_target_is_alpha_noise_minus_sigma_x0():
    sched = ddpm()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    batch = unet_noised_batch(
        latents,
        scheduler=sched,
        prediction_type="v_prediction",
        generator=torch.Generator().manual_seed(1),
        timesteps=t,
    )
    noise = sample_noise(latents, generator=torch.Generator().manual_seed(1))
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(batch.target, a * noise - s * latents, atol=1e-6)
    assert torch.allclose(batch.noisy, a * latents + s * noise, atol=1e-6)
    assert batch.weights is None


def test_epsilon_target_is_the_noise_and_timesteps_are_seeded():
    sched = ddpm()
    latents = torch.zeros(3, 4, 4, 4)
    a = unet_noised_batch(
        latents, scheduler=sched, prediction_type="epsilon", generator=torch.Generator().manual_seed(5)
    )
    b = unet_noised_batch(
        latents, scheduler=sched, prediction_type="epsilon", generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(a.timesteps, b.timesteps)
    assert torch.equal(a.target, b.target)
    assert a.timesteps.dtype == torch.long and int(a.timesteps.min()) >= 0 and int(a.timesteps.max()) < 1000
    with pytest.raises(ValueError, match="'flow' is not a UNet objective"):
        unet_noised_batch(latents, scheduler=sched, prediction_type="flow", generator=None)


def test_min_snr_weights_on_known_snr_values():
    # alphas_cumprod chosen so the SNRs are exactly 9, 1 and 0.25.
    class Sched:
        alphas_cumprod = torch.tensor([0.9, 0.5, 0.2])

    t = torch.tensor([0, 1, 2])
    eps = min_snr_weights(Sched(), t, gamma=5.0, prediction_type="epsilon")
    v = min_snr_weights(Sched(), t, gamma=5.0, prediction_type="v_prediction")
    assert eps.tolist() == pytest.approx([5 / 9, 1.0, 1.0], rel=1e-5)
    assert v.tolist() == pytest.approx([5 / 10, 1 / 2, 0.25 / 1.25], rel=1e-5)


def test_noise_offset_adds_a_per_channel_constant():
    latents = torch.zeros(2, 3, 4, 4)
    plain = sample_noise(latents, generator=torch.Generator().manual_seed(3))
    offset = sample_noise(latents, generator=torch.Generator().manual_seed(3), noise_offset=0.1)
    diff = offset - plain
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff))
    assert float(diff.abs().max()) > 0


def test_flow_schedule_matches_diffusers_flow_match_scheduler():
    ours = flow_schedule(num_train_timesteps=1000, shift=3.0)
    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    assert torch.allclose(ours.sigmas, theirs.sigmas, atol=1e-6)
    assert torch.allclose(ours.timesteps, theirs.timesteps, atol=1e-3)
    assert ours.sigmas[0] == pytest.approx(1.0)


def test_flow_interpolation_targets_and_precondition():
    schedule = flow_schedule(num_train_timesteps=10, shift=1.0)  # sigmas 1.0, 0.9, ... 0.1
    x0 = torch.full((2, 1, 2, 2), 2.0)
    idx = torch.tensor([0, 5])
    vel = flow_noised_batch(
        x0, schedule=schedule, generator=torch.Generator().manual_seed(0), precondition=False, indices=idx
    )
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    sig = torch.tensor([1.0, 0.5]).view(-1, 1, 1, 1)
    assert torch.allclose(vel.noisy, (1 - sig) * x0 + sig * noise, atol=1e-6)
    assert torch.allclose(vel.target, noise - x0, atol=1e-6)
    assert vel.timesteps.tolist() == pytest.approx([10.0, 5.0])
    # The perfect velocity gives zero loss either way: x0_hat = noisy - sigma * (noise - x0) = x0.
    pre = flow_noised_batch(
        x0, schedule=schedule, generator=torch.Generator().manual_seed(0), precondition=True, indices=idx
    )
    assert torch.equal(pre.target, x0)
    assert torch.allclose(precondition_flow_output(noise - x0, pre.noisy, pre.sigmas), x0, atol=1e-6)
    assert per_sample_loss(noise - x0, pre).tolist() == pytest.approx([0.0, 0.0], abs=1e-10)
    assert per_sample_loss(noise - x0, vel).tolist() == pytest.approx([0.0, 0.0], abs=1e-10)
    # A zero prediction costs (noise - x0)^2 on the velocity, x0 - noisy... on the x0 estimate.
    zero = torch.zeros_like(x0)
    assert per_sample_loss(zero, pre)[1].item() == pytest.approx(
        float(((pre.noisy[1] - x0[1]) ** 2).mean()), rel=1e-5
    )


def test_flow_weighting_and_sampling_choices():
    schedule = flow_schedule(num_train_timesteps=1000, shift=3.0)
    x0 = torch.zeros(4, 2, 2, 2)
    batch = flow_noised_batch(
        x0, schedule=schedule, generator=torch.Generator().manual_seed(0), weighting="cosmap"
    )
    s = batch.sigmas.flatten()
    assert batch.weights.flatten().tolist() == pytest.approx(
        (2 / (math.pi * (1 - 2 * s + 2 * s**2))).tolist(), rel=1e-5
    )
    for sampling in ("logit_normal", "mode", "uniform"):
        idx = sample_flow_indices(
            64, schedule=schedule, sampling=sampling, generator=torch.Generator().manual_seed(1)
        )
        assert idx.dtype == torch.long and int(idx.min()) >= 0 and int(idx.max()) <= 999
    with pytest.raises(ValueError, match="timestep sampling 'beta' is unknown"):
        sample_flow_indices(2, schedule=schedule, sampling="beta", generator=None)


def test_per_sample_loss_applies_weights_per_sample():
    target = torch.zeros(2, 1, 2, 2)
    batch = NoisedBatch(
        noisy=target, timesteps=torch.tensor([1, 2]), target=target, weights=torch.tensor([1.0, 0.5])
    )
    pred = torch.ones(2, 1, 2, 2) * torch.tensor([1.0, 2.0]).view(-1, 1, 1, 1)
    assert per_sample_loss(pred, batch).tolist() == pytest.approx([1.0, 2.0])
