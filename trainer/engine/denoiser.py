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

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..config import DEFAULT_RESOLUTION, Arch, Precision, TrainConfig
from ..models.bundle import ModelBundle
from .inputs import DenoiserInputs, InputBuilder
from .memory import MemorySettings
from .objectives import NoisedBatch, per_sample_loss
from .runtime import Runtime
from .setup import Trainables
from .step import Objective

log = logging.getLogger("finetune")


class TrainableDenoiser:
    """The interface the loop trains through (override every method that raises).

    Attributes:
        family: the model family, as its backend names it ("sd15", "Flux", "SD3"...), for run.json.
        prediction_type: "epsilon", "v_prediction" or "flow".
        source: the file it came from ("" when unknown).
        native_resolution: the default training side when the config gives none.
        memory_arch: the family ``memory_mode`` can plan for (None: the host places this model's
            weights itself, and the run plans nothing).
        graphs: CUDA-graph steps (diffusers path only), else None.
    """

    family: str = ""
    prediction_type: str = "epsilon"
    source: str = ""
    native_resolution: int = 512
    memory_arch: Arch | None = None
    graphs = None

    def prepare(
        self,
        config: TrainConfig,
        runtime: Runtime,
        *,
        cache_dir: Path,
        memory: MemorySettings | None = None,
    ) -> Trainables:
        """Add the adapters (or unfreeze), place the weights; returns what the optimizer updates.

        Called after :meth:`input_builder`. ``memory`` is what ``memory_mode`` chose (None: as
        configured)."""
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
        runtime: Runtime,
        park_encoders: bool,
        on_state: Callable[[str], None],
        on_move: Callable[[], None],
    ) -> InputBuilder:
        """The run's inputs (latents and conditioning through this model's VAE and text encoders).

        Args:
            park_encoders: fill every cache now and keep the encoders off the GPU until a render
                needs them, where the backend can (its caches can be filled up front).
            on_state: a status line for the user ("caching latents and captions").
            on_move: called after the encoders moved between devices (GPU memory changed).
        """
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

    def host_models(self) -> tuple:
        """The host's own loaded models this run trains on, which the host must keep loaded when
        it makes room for the run (a ComfyUI MODEL's patcher); none for a model the run loaded."""
        return ()

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
        self.native_resolution = DEFAULT_RESOLUTION[bundle.arch]
        self.memory_arch = bundle.arch
        self.trainables: Trainables | None = None
        self.speed = None
        self.graphs = None
        self.parking = None
        self.wrapped: nn.Module = bundle.denoiser
        self.runtime: Runtime | None = None

    def prepare(
        self,
        config: TrainConfig,
        runtime: Runtime,
        *,
        cache_dir: Path,
        memory: MemorySettings | None = None,
    ) -> Trainables:
        from .fp8 import store_fp8
        from .graphs import step_graphs_for
        from .setup import prepare_trainables
        from .speed import apply as apply_speed

        bundle = self.bundle
        self.runtime = runtime
        # bf16 weights only where the run computes in bf16 (a GPU without bf16 falls back to fp16).
        half = memory is not None and memory.bf16_weights and runtime.precision == Precision.BF16
        trainables = prepare_trainables(bundle, config, runtime, half_weights=half, frozen_placed=True)
        self.trainables = trainables
        self.speed = apply_speed(bundle.denoiser, config, runtime.device, cache_dir=cache_dir)
        if memory is not None and memory.fp8_base and runtime.device.type == "cuda":
            layers = store_fp8(bundle.denoiser, compute_dtype=runtime.compute_dtype)
            log.info("finetune: %d base layers stored in fp8", layers)
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

    def input_builder(self, config, *, dataset, buckets, runtime, park_encoders, on_state, on_move):
        from .inputs import input_builder_for
        from .setup import place_frozen, trainable_text_slots

        bundle = self.bundle
        # The caches are filled before the denoiser goes to the GPU, so the encoders never share
        # it with the denoiser unless a draw still needs them (see :mod:`.offload`).
        place_frozen(bundle, runtime, device=torch.device("cpu") if park_encoders else runtime.device)
        inputs = input_builder_for(
            config,
            bundle=bundle,
            dataset=dataset,
            buckets=buckets,
            device=runtime.device,
            dtype=runtime.compute_dtype,
            trains_text_encoder=bool(trainable_text_slots(bundle, config)),
        )
        if park_encoders:
            self._cache_and_park(inputs, runtime.device, on_state=on_state, on_move=on_move)
        return inputs

    def _cache_and_park(self, inputs: InputBuilder, device: torch.device, *, on_state, on_move) -> None:
        """Fill the caches with the encoders on the GPU, then park the idle ones on the CPU (the
        others go to the GPU for good). ``place_frozen`` left them all on the CPU."""
        from .offload import Parking, frozen_to_park

        bundle = self.bundle
        modules = frozen_to_park(
            bundle, latents_cached=inputs.latent_store.enabled, text_cached=inputs.text_store.enabled
        )
        for module in bundle.frozen_modules():
            if all(module is not m for m in modules.values()):
                module.to(device=device)  # still needed during steps
        self.parking = Parking(modules, device, on_move=on_move)
        self.parking.parked = True
        if modules:
            on_state("caching latents and captions")
            with self.parking.borrowed():
                latents, texts = inputs.fill_caches()
            log.info("finetune: cached %d latents and %d captions before the first step", latents, texts)

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

        with self.parking.borrowed() if self.parking is not None else contextlib.nullcontext():
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
