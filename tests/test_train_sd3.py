"""Training a tiny SD3 (MMDiT, rectified flow) on the CPU, with and without T5."""

from __future__ import annotations

import math

import pytest
from safetensors.torch import load_file
from train_helpers import eval_inputs, eval_loss, make_images, tiny_config

from trainer.checkpoints import CheckpointStore
from trainer.config import Arch
from trainer.engine.events import RunState
from trainer.engine.loop import train
from trainer.models.tiny import tiny_bundle
from trainer.runfolder import RunFolder


@pytest.mark.parametrize("method,lr,ratio", [("lora", 1e-2, 0.85), ("full", 3e-3, 0.7)])
def test_sd3_memorisation_lowers_the_fixed_timestep_loss(tmp_path, method, lr, ratio):
    data = make_images(tmp_path / "data", [(64, 64)], repeats=32, caption="thing")
    config = tiny_config(
        tmp_path,
        data,
        method=method,
        learning_rate=lr,
        lora_rank=8,
        lora_alpha=8.0,
        lora_targets="attention+ff",
    )
    bundle = tiny_bundle(Arch.SD3, seed=0)
    inputs = eval_inputs(bundle, data)
    before = eval_loss(bundle, inputs, config)
    result = train(config, model_loader=lambda c: bundle, device="cpu")
    assert result.state == RunState.FINISHED, result.message
    assert eval_loss(bundle, inputs, config) < ratio * before


def test_sd3_lora_without_t5_saves_transformer_keys(tmp_path):
    data = make_images(tmp_path / "data", [(64, 64), (64, 64)])
    config = tiny_config(
        tmp_path,
        data,
        max_steps=2,
        epochs=2,
        use_t5=False,
        timestep_sampling="mode",
        flow_loss_weighting="cosmap",
        precondition_outputs=False,
        validation_prompts=["thing"],
        validation_every=2,
        validation_steps=2,
    )
    result = train(config, model_loader=lambda c: tiny_bundle(Arch.SD3, seed=0, with_t5=False), device="cpu")
    assert result.state == RunState.FINISHED, result.message
    folder = RunFolder.for_run(config.output_dir, "tiny")
    keys = load_file(str(CheckpointStore(folder.path, "tiny").path_for(2))).keys()
    assert keys and all(k.startswith("lora_unet_") or k.startswith("transformer.") for k in keys)
    assert folder.sample_path(2, 0).is_file()


def test_sd3_full_checkpoint_is_in_comfyui_layout(tmp_path):
    data = make_images(tmp_path / "data", [(64, 64)])
    config = tiny_config(tmp_path, data, method="full", max_steps=1, epochs=1, learning_rate=1e-4)
    result = train(config, model_loader=lambda c: tiny_bundle(Arch.SD3, seed=0), device="cpu")
    assert result.state == RunState.FINISHED, result.message
    tensors = load_file(result.final_checkpoint)
    assert any(k.startswith("joint_blocks.0.x_block.attn.qkv.") for k in tensors)
    assert {t.dtype for t in tensors.values()} == {__import__("torch").float16}


def test_the_tutorials_full_fine_tune_settings_run_as_one_config(tmp_path):
    """lr 1.5e-5, batch 6, cosine with 10 % warm-up, checkpoint every 800 keeping 30, validation every 200."""
    data = make_images(tmp_path / "data", [(64, 64)], repeats=12)
    config = tiny_config(
        tmp_path,
        data,
        method="full",
        learning_rate=1.5e-5,
        batch_size=6,
        lr_scheduler="cosine",
        lr_warmup=0.1,
        checkpoint_every=800,
        keep_checkpoints=30,
        validation_every=200,
        epochs=2,
    )
    result = train(config, model_loader=lambda c: tiny_bundle(Arch.SD3, seed=0, with_t5=False), device="cpu")
    assert result.state == RunState.FINISHED, result.message
    run = RunFolder.for_run(config.output_dir, "tiny").read()
    plan = run["plan"]
    # 12 samples / batch 6 = 2 steps an epoch, 2 epochs; the cadences are the tutorial's, not the defaults.
    assert (plan["total_steps"], plan["checkpoint_every"], plan["validation_every"]) == (4, 800, 200)
    assert run["config"]["learning_rate"] == 1.5e-5 and run["config"]["keep_checkpoints"] == 30
    lrs = [row["lr"] for row in RunFolder.for_run(config.output_dir, "tiny").read_metrics()]
    # warm-up round(0.1 * 4) = 0 steps, then cosine from the peak to 0 over 4 steps (logged after each step)
    assert lrs == pytest.approx(
        [1.5e-5 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(1, 5)], abs=1e-12
    )
    # the run's end is always checkpointed even when the cadence is longer than the run
    assert CheckpointStore(RunFolder.for_run(config.output_dir, "tiny").path, "tiny").path_for(4).is_file()
