"""What the training loop trains: "a trainable denoiser", one small interface for every backend.

The loop never asks where a model came from. It asks a :class:`TrainableDenoiser` to

- ``prepare`` itself for the run (adapters added, weights placed) and say what trains;
- give the run's ``objective`` (epsilon, v or flow, with its noise table and the options on top);
- ``predict`` the model's native output for noised latents and their conditioning;
- make the run's ``input_builder`` (latents and conditioning through its own VAE and text encoders);
- ``save_adapter`` (a LoRA file in the format its loader applies) and ``render`` validation images.

Two implementations: :class:`DiffusersDenoiser` here (a :class:`~trainer.models.bundle.ModelBundle`
loaded from a file; the CLI, multi-GPU and full fine-tune path), and the ComfyUI-model backend in
``nodes/comfy_denoiser.py`` (the MODEL ComfyUI loaded; every family ComfyUI runs). ``trainer/``
knows nothing of the second one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..config import TrainConfig
from ..models.bundle import ModelBundle
from .inputs import DenoiserInputs, InputBuilder
from .objectives import NoisedBatch, per_sample_loss
from .runtime import Runtime
from .setup import Trainables
from .step import Objective


class TrainableDenoiser:
    """The interface the loop trains through (override every method that raises).

    Attributes:
        family: the model family, as its backend names it ("sd15", "Flux", "SD3"...), for run.json.
        prediction_type: "epsilon", "v_prediction" or "flow".
        source: the file it came from ("" when unknown).
        native_resolution: the default training side when the config gives none.
        graphs: CUDA-graph steps (diffusers path only), else None.
    """

    family: str = ""
    prediction_type: str = "epsilon"
    source: str = ""
    native_resolution: int = 512
    graphs = None

    def prepare(self, config: TrainConfig, runtime: Runtime, *, cache_dir: Path) -> Trainables:
        """Add the adapters (or unfreeze), place the weights; returns what the optimizer updates."""
        raise NotImplementedError

    def objective(self, config: TrainConfig) -> Objective:
        """The run's objective: the model's own prediction type and noise table, options on top."""
        raise NotImplementedError

    def predict(self, noised: NoisedBatch, inputs: DenoiserInputs) -> torch.Tensor:
        """The model's native prediction (epsilon, v or flow velocity) for ``noised.noisy``."""
        raise NotImplementedError

    def loss(
        self,
        objective: Objective,
        inputs: DenoiserInputs,
        *,
        generator: torch.Generator,
        fixed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample losses ``[B]`` of one micro-batch (call under the run's autocast)."""
        noised = objective.noised(inputs.latents, generator=generator, fixed=fixed)
        return per_sample_loss(self.predict(noised, inputs), noised)

    def input_builder(
        self,
        config: TrainConfig,
        *,
        dataset,
        buckets: Sequence,
        device: torch.device,
        dtype: torch.dtype,
        trains_text_encoder: bool,
    ) -> InputBuilder:
        raise NotImplementedError

    def save_adapter(self, path: Path, *, step: int, epoch: int, ctx) -> Path:
        """Write the checkpoint of ``step`` (atomically) in the format its loader applies."""
        raise NotImplementedError

    def render(
        self, prompts: list[str], *, config: TrainConfig, runtime: Runtime, resolution: int
    ) -> list[Image.Image]:
        """Validation images with the weights being trained."""
        raise NotImplementedError

    def before_step(self) -> None:
        """Called before every optimizer step (a host that may unload the model reloads it here)."""

    def sync_module(self) -> nn.Module | None:
        """The module DDP wraps (for ``no_sync``), if any."""
        return None

    def host_held_bytes(self) -> int:
        """GPU memory of this model that the host already accounts for (its own loaded weights)."""
        return 0

    def run_info(self) -> dict:
        """What run.json records under ``model``."""
        return {"arch": self.family, "prediction_type": self.prediction_type, "source": self.source}

    def speed_report(self) -> dict:
        return {}

    def release(self) -> None:
        """Undo what ``prepare`` changed outside the run (speed switches, graphs, injected hooks)."""


class DiffusersDenoiser(TrainableDenoiser):
    """A diffusers model loaded from a file (:class:`ModelBundle`), trained with peft LoRA or in full."""

    def __init__(self, bundle: ModelBundle):
        self.bundle = bundle
        self.family = bundle.arch.value
        self.prediction_type = bundle.prediction_type
        self.source = bundle.source
        self.trainables: Trainables | None = None
        self.speed = None
        self.graphs = None
        self.wrapped: nn.Module = bundle.denoiser
        self.runtime: Runtime | None = None

    def prepare(self, config: TrainConfig, runtime: Runtime, *, cache_dir: Path) -> Trainables:
        from .graphs import step_graphs_for
        from .setup import prepare_trainables
        from .speed import apply as apply_speed

        bundle = self.bundle
        self.runtime = runtime
        self.native_resolution = config.native_resolution(bundle.arch)
        trainables = prepare_trainables(bundle, config, runtime)
        self.trainables = trainables
        self.speed = apply_speed(bundle.denoiser, config, runtime.device, cache_dir=cache_dir)
        self.graphs = step_graphs_for(
            bundle.denoiser,
            bundle.arch,
            trainables,
            runtime=runtime,
            enabled=config.cuda_graphs,
            lora_dropout=config.lora_dropout,
            report=self.speed.report,
        )
        # DDP's gradient hooks cannot live inside a CUDA graph: graph steps all-reduce their own
        # flat gradient buffers instead.
        self.wrapped = (
            runtime.wrap(bundle.denoiser) if self.graphs is None else runtime.share(bundle.denoiser)
        )
        return trainables

    def objective(self, config: TrainConfig) -> Objective:
        return Objective.for_run(
            model_prediction=self.bundle.prediction_type,
            noise_scheduler=self.bundle.noise_scheduler,
            config=config,
        )

    def predict(self, noised: NoisedBatch, inputs: DenoiserInputs) -> torch.Tensor:
        from .step import denoise

        return denoise(self.wrapped, self.bundle.arch, noised, inputs)

    def input_builder(self, config, *, dataset, buckets, device, dtype, trains_text_encoder):
        from .inputs import input_builder_for

        return input_builder_for(
            config,
            bundle=self.bundle,
            dataset=dataset,
            buckets=buckets,
            device=device,
            dtype=dtype,
            trains_text_encoder=trains_text_encoder,
        )

    def save_adapter(self, path: Path, *, step: int, epoch: int, ctx) -> Path:
        from .saving import save_checkpoint

        return save_checkpoint(
            path,
            denoiser=self.runtime.unwrap(self.wrapped),
            text_slots=self.trainables.text_encoder_slots,
            step=step,
            epoch=epoch,
            ctx=ctx,
        )

    def render(self, prompts, *, config, runtime, resolution):
        from .validation import render_prompts

        return render_prompts(
            self.bundle,
            runtime.unwrap(self.wrapped),
            prompts=prompts,
            config=config,
            runtime=runtime,
            resolution=resolution,
        )

    def sync_module(self) -> nn.Module | None:
        return self.wrapped

    def speed_report(self) -> dict:
        return self.speed.report.to_dict() if self.speed is not None else {}

    def release(self) -> None:
        if self.speed is not None:
            self.speed.restore()
        if self.graphs is not None:
            self.graphs.release()


def as_trainable(model: ModelBundle | TrainableDenoiser) -> TrainableDenoiser:
    """What a model loader returned, as the loop's interface (a bundle gets the diffusers backend)."""
    if isinstance(model, TrainableDenoiser):
        return model
    if isinstance(model, ModelBundle):
        return DiffusersDenoiser(model)
    raise TypeError(
        f"a model loader returned {type(model).__name__}; expected a ModelBundle or a TrainableDenoiser"
    )
