"""The loop's one interface to a model (trainer/engine/denoiser.py) and the run manager's model
loader, without ComfyUI (the ComfyUI-model backend is tested in test_comfy_model_training.py)."""

from __future__ import annotations

import threading

import pytest
import torch
from diffusers import DDPMScheduler

from trainer.config import Arch, TrainConfig
from trainer.engine.denoiser import DiffusersDenoiser, TrainableDenoiser, as_trainable
from trainer.engine.events import Commands, RunState
from trainer.engine.inputs import DenoiserInputs
from trainer.engine.objectives import sample_noise
from trainer.engine.step import Objective
from trainer.models.tiny import tiny_bundle
from trainer.runs import RunManager


class ZeroPrediction(TrainableDenoiser):
    family = "zero"

    def predict(self, noised, inputs):
        return torch.zeros_like(noised.noisy)


def test_the_loss_is_the_objective_scored_on_the_backends_prediction():
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    inputs = DenoiserInputs(
        latents=latents, prompt_embeds=None, pooled=None, time_ids=None, captions=["a"] * 3
    )
    objective = Objective(kind="epsilon", scheduler=DDPMScheduler())
    loss = ZeroPrediction().loss(objective, inputs, generator=torch.Generator().manual_seed(5))
    # An epsilon target is the noise, drawn first from the same generator: a zero prediction scores
    # the noise's mean square per sample.
    noise = sample_noise(latents, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(loss, (noise**2).reshape(3, -1).mean(dim=1))


def test_a_bundle_gets_the_diffusers_backend_and_anything_else_is_refused():
    bundle = tiny_bundle(Arch.SD15)
    model = as_trainable(bundle)
    assert isinstance(model, DiffusersDenoiser)
    assert model.run_info() == {"arch": "sd15", "prediction_type": "epsilon", "source": ""}
    own = ZeroPrediction()
    assert as_trainable(own) is own
    with pytest.raises(
        TypeError, match="^a model loader returned str; expected a ModelBundle or a TrainableDenoiser$"
    ):
        as_trainable("model.safetensors")


class RecordingTrain:
    """A train_fn that records the model loader it was given and waits for a stop."""

    def __init__(self):
        self.loaders = []
        self.started = threading.Event()

    def __call__(self, config, *, callbacks, commands: Commands, host, resume, device, model_loader=None):
        self.loaders.append(model_loader)
        self.started.set()
        while not commands.stop_requested:
            commands.wait_while_paused(timeout=0.01)
        return type("Result", (), {"state": RunState.STOPPED, "message": "stopped"})()


def test_the_manager_hands_the_model_loader_to_the_run_and_keeps_it_for_a_resume(tmp_path):
    train = RecordingTrain()
    manager = RunManager(tmp_path, train_fn=train)
    try:

        def loader(config):
            return ZeroPrediction()

        manager.submit(
            TrainConfig(run_name="held", max_steps=4, output_dir=str(tmp_path)), model_loader=loader
        )
        assert train.started.wait(10)
        manager.stop("held")
        assert manager.wait("held", timeout=10).state == "stopped"
        train.started.clear()
        manager.resume("held")  # the panel's Resume: no loader given, the run's own is kept
        assert train.started.wait(10)
        manager.stop("held")
        assert manager.wait("held", timeout=10).state == "stopped"
    finally:
        manager.shutdown(timeout=5)
    assert train.loaders == [loader, loader]
