"""Our trainer's step, through the engine's own code: ``prepare_trainables`` (LoRA / unfreeze,
dtypes, placement, gradient checkpointing), ``speed.apply``, the optimizer and schedule builders,
``Objective`` and the loop's own ``_train_step`` (loss, NaN check, backward, clipping, update).

Only the inputs are fixed: the step gets the same random cached-latent batch every time, as the
reference does, so the comparison is the step itself. ``train()`` end to end is in :mod:`.e2e`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import MethodType, SimpleNamespace

import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.engine import speed
from trainer.engine.denoiser import DiffusersDenoiser
from trainer.engine.graphs import StepGraphs, step_graphs_for
from trainer.engine.inputs import DenoiserInputs
from trainer.engine.loop import _Run
from trainer.engine.optim import OptimizerSettings, build_optimizer, build_schedule, param_groups
from trainer.engine.runtime import Runtime
from trainer.engine.setup import prepare_trainables
from trainer.engine.step import Objective, batch_loss

from .cases import BenchCase
from .models import step_bundle
from .reference import fake_batch


def case_config(case: BenchCase, *, device: torch.device, **overrides) -> TrainConfig:
    """The TrainConfig of a case: the reference's settings (LoRA r16/alpha 16 on attention, AdamW
    lr 1e-4, constant schedule, bf16 on GPU) and our defaults for everything else."""
    values = dict(
        run_name=f"bench-{case.name}",
        method=case.method,
        lora_rank=16,
        lora_alpha=16.0,
        lora_targets="attention",
        learning_rate=1e-4 if case.method == "lora" else 1e-5,
        lr_scheduler="constant",
        lr_warmup=0.0,
        batch_size=case.batch,
        resolution=case.resolution,
        gradient_checkpointing=case.gradient_checkpointing,
        mixed_precision="bf16" if device.type == "cuda" else "fp32",
        seed=0,
    )
    values.update(overrides)
    return TrainConfig.from_dict(values)


class _FixedInputs:
    """Stands in for the loop's InputBuilder: every micro-batch gets the same cached batch."""

    def __init__(self, inputs: DenoiserInputs):
        self._inputs = inputs

    def build(self, micro, images=None) -> DenoiserInputs:
        return self._inputs


@dataclass
class OurStep:
    """Our step for one case, ready to time.

    Attributes:
        step: one optimizer step through the engine's ``_train_step``; returns the loss.
        fwd_bwd: forward and backward only, gradients dropped, its own noise (FLOP counting:
            leaves the weights and the step's noise stream as they were).
        model: the denoiser (for cleanup).
        report: what speed.apply did.
        session: restores the process-wide flags.
        graphs: the step graphs (None when the variant has them off).
    """

    step: Callable[[], float]
    fwd_bwd: Callable[[], None]
    model: nn.Module
    report: speed.SpeedReport
    session: speed.SpeedSession
    graphs: StepGraphs | None = None


def our_step(
    case: BenchCase, device: torch.device, settings: speed.SpeedSettings, *, smoke: bool = False
) -> OurStep:
    """Build the model through the engine and return its step for ``case``.

    Args:
        settings: speed.py's settings for this variant.
        smoke: tiny models on the CPU.
    """
    config = case_config(case, device=device)
    rt = Runtime(precision=config.mixed_precision, device=str(device))
    bundle = step_bundle(case.arch, device, smoke=smoke)
    trainables = prepare_trainables(bundle, config, rt)
    session = speed.apply(bundle.denoiser, config, rt.device, settings=settings)
    groups = param_groups(
        denoiser_params=trainables.denoiser, text_params=trainables.text, lr=config.learning_rate
    )
    optimizer = build_optimizer(
        config.optimizer,
        groups,
        OptimizerSettings(
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            # The smoke run takes the fused AdamW a GPU run gets (the CPU has it too), so the
            # graph step's device-side update runs there as well.
            device_type="cuda" if smoke else rt.device.type,
        ),
    )
    scheduler = build_schedule(config.lr_scheduler, optimizer, warmup_steps=0, total_steps=1_000_000)
    objective = Objective.for_run(
        model_prediction=bundle.prediction_type, noise_scheduler=bundle.noise_scheduler, config=config
    )
    raw = fake_batch(bundle.denoiser, case.arch, case.batch, case.resolution, device)
    inputs = DenoiserInputs(
        latents=raw["latents"],
        prompt_embeds=raw["prompt_embeds"].to(rt.compute_dtype),
        pooled=raw["pooled"].to(rt.compute_dtype) if "pooled" in raw else None,
        time_ids=raw["time_ids"].to(rt.compute_dtype) if "time_ids" in raw else None,
        captions=[""] * case.batch,
    )
    denoiser = rt.wrap(bundle.denoiser)
    graphs = step_graphs_for(
        denoiser,
        bundle.arch,
        trainables,
        runtime=rt,
        enabled=settings.cuda_graphs,
        lora_dropout=config.lora_dropout,
        report=session.report,
    )
    if smoke and settings.cuda_graphs and graphs is None:
        # No CUDA graphs on the CPU: emulated ones (tests/test_graphs.py) check the plumbing.
        graphs = StepGraphs(denoiser, bundle.arch, trainables.denoiser, autocast_dtype=None, emulate=True)
    # The loop's own step method, on the attributes it reads (see _Run._train_step).
    model = DiffusersDenoiser(bundle)
    model.wrapped, model.runtime, model.trainables = denoiser, rt, trainables
    run = SimpleNamespace(
        config=config,
        runtime=rt,
        step=0,
        inputs=_FixedInputs(inputs),
        model=model,
        graphs=graphs,
        objective=objective,
        noise=torch.Generator(device="cpu").manual_seed(1),
        trainables=trainables,
        optimizer=optimizer,
        scheduler=scheduler,
    )
    # The methods _train_step calls on its run, bound to this namespace.
    run._update_queued = MethodType(_Run._update_queued, run)
    batch = SimpleNamespace(micro_batches=[None])
    # The loop hands the prefetched images of each micro-batch in (engine versions differ).
    extra = ([None],) if "images" in inspect.signature(_Run._train_step).parameters else ()

    def step() -> float:
        loss = _Run._train_step(run, batch, *extra)  # type: ignore[arg-type]
        run.step += 1
        return loss

    def fwd_bwd() -> None:
        with rt.autocast():
            loss = batch_loss(
                denoiser, bundle.arch, objective, inputs, generator=torch.Generator().manual_seed(2)
            ).mean()
        loss.backward()
        if graphs is not None:
            graphs.zero_grad()  # the gradients are views of the graphs' buffers
        else:
            optimizer.zero_grad(set_to_none=True)

    return OurStep(
        step=step,
        fwd_bwd=fwd_bwd,
        model=bundle.denoiser,
        report=session.report,
        session=session,
        graphs=graphs,
    )


def variant_settings(name: str, base: speed.SpeedSettings, *, device: torch.device) -> speed.SpeedSettings:
    """A variant's settings; on the CPU (smoke) compilation is left off, as a run there does."""
    if device.type != "cuda":
        return replace(base, compile=False)
    return base
