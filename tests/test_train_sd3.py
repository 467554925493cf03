"""Training a tiny SD3 (MMDiT, rectified flow) on the CPU, with and without T5."""

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
