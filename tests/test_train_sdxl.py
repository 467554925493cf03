"""Training a tiny SDXL on the CPU: its two text encoders, pooled embeddings and size conditioning."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file
from train_helpers import eval_inputs, eval_loss, make_images, tiny_config

from trainer.checkpoints import CheckpointStore
from trainer.config import Arch
from trainer.engine.events import RunState
from trainer.engine.loop import train
from trainer.models.tiny import tiny_bundle
from trainer.runfolder import RunFolder


@pytest.mark.slow
@pytest.mark.parametrize("method,lr,ratio", [("lora", 1e-2, 0.6), ("full", 1e-3, 0.6)])
def test_sdxl_memorisation_lowers_the_fixed_timestep_loss(tmp_path, method, lr, ratio):
    data = make_images(tmp_path / "data", [(64, 64)], repeats=24, caption="thing")
    config = tiny_config(
        tmp_path,
        data,
        method=method,
        learning_rate=lr,
        lora_rank=8,
        lora_alpha=8.0,
        lora_targets="attention+ff+conv",
    )
    bundle = tiny_bundle(Arch.SDXL, seed=0)
    inputs = eval_inputs(bundle, data)
    assert inputs.time_ids.tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]
    before = eval_loss(bundle, inputs, config)
    result = train(config, model_loader=lambda c: bundle, device="cpu")
    assert result.state == RunState.FINISHED, result.message
    assert eval_loss(bundle, inputs, config) < ratio * before


def test_sdxl_lora_with_both_text_encoders(tmp_path):
    data = make_images(tmp_path / "data", [(64, 64), (64, 64)])
    config = tiny_config(
        tmp_path,
        data,
        max_steps=2,
        epochs=2,
        train_text_encoder=True,
        text_encoder_lr=5e-4,
        gradient_checkpointing=True,
    )
    result = train(config, model_loader=lambda c: tiny_bundle(Arch.SDXL, seed=0), device="cpu")
    assert result.state == RunState.FINISHED, result.message
    folder = RunFolder.for_run(config.output_dir, "tiny")
    keys = load_file(str(CheckpointStore(folder.path, "tiny").path_for(2))).keys()
    prefixes = {k.split("_", 2)[1] for k in keys}
    assert prefixes == {"unet", "te1", "te2"}
