"""End-to-end training of a tiny SD1.5 on the CPU: learning, checkpoints, resume, validation,
pauses and every contained failure."""

from __future__ import annotations

import errno
import importlib.util
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import eval_inputs, eval_loss, make_images, tiny_config

from trainer.checkpoints import CheckpointStore
from trainer.config import Arch
from trainer.engine import loop as loop_module
from trainer.engine.events import Callbacks, Commands, HostHooks, RunState
from trainer.engine.loop import train
from trainer.models.tiny import tiny_bundle
from trainer.runfolder import RunFolder


class Recorder(Callbacks):
    def __init__(self, stop_at: int | None = None, commands: Commands | None = None):
        self.states: list[tuple[RunState, str]] = []
        self.steps: list[int] = []
        self.checkpoints: list[int] = []
        self.samples: list[tuple[int, list[str]]] = []
        self.stop_at = stop_at
        self.commands = commands

    def on_state(self, run, state, message=""):
        self.states.append((state, message))

    def on_progress(self, progress):
        self.steps.append(progress.step)
        if self.stop_at is not None and progress.step == self.stop_at:
            self.commands.stop()

    def on_sample(self, run, step, paths):
        self.samples.append((step, paths))

    def on_checkpoint(self, run, step, path):
        self.checkpoints.append(step)


def loader(arch=Arch.SD15, holder: list | None = None):
    def load(config):
        bundle = tiny_bundle(arch, seed=0)
        if holder is not None:
            holder.append(bundle)
        return bundle

    return load


@pytest.fixture
def data(tmp_path):
    return make_images(tmp_path / "data", [(64, 64), (64, 64)])


@pytest.mark.slow
@pytest.mark.parametrize("method,lr", [("lora", 1e-2), ("full", 1e-3)])
def test_memorisation_lowers_the_fixed_timestep_loss(tmp_path, method, lr):
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
    bundle = tiny_bundle(Arch.SD15, seed=0)
    inputs = eval_inputs(bundle, data)
    before = eval_loss(bundle, inputs, config)
    result = train(config, model_loader=lambda c: bundle, device="cpu")
    assert result.state == RunState.FINISHED, result.message
    assert result.step == 24
    after = eval_loss(bundle, inputs, config)
    assert after < 0.6 * before, (before, after)


def test_checkpoints_keep_limit_metrics_and_run_json(tmp_path, data):
    config = tiny_config(tmp_path, data, max_steps=8, epochs=10, checkpoint_every=2, keep_checkpoints=2)
    rec = Recorder()
    result = train(config, callbacks=rec, model_loader=loader(), device="cpu")
    assert result.state == RunState.FINISHED, result.message
    folder = RunFolder.for_run(config.output_dir, config.run_name)
    store = CheckpointStore(folder.path, folder.name)
    assert [c.step for c in store.list()] == [4, 6, 8]
    assert rec.checkpoints == [2, 4, 6, 8]
    assert result.final_checkpoint == str(store.path_for(8))
    rows = folder.read_metrics(0)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert set(rows[0]) == {"step", "epoch", "loss", "lr", "samples_per_s", "peak_vram", "time"}
    assert rows[0]["lr"] == pytest.approx(1e-3)
    run = json.loads(folder.run_json.read_text())
    assert run["status"]["state"] == "finished"
    assert run["plan"]["total_steps"] == 8
    assert run["config"]["run_name"] == "tiny"
    assert set(run["versions"]) == {"python", "torch", "diffusers", "peft", "transformers"}
    assert rec.states[-1][0] == RunState.FINISHED
    # A kohya-format LoRA: lora_unet_ keys with lora_down/lora_up/alpha, metadata attached.
    tensors = load_file(str(store.path_for(8)))
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert any(k.endswith(".lora_down.weight") for k in tensors)
    alphas = [float(v) for k, v in tensors.items() if k.endswith(".alpha")]
    assert alphas and set(alphas) == {4.0}
    assert (folder.path / "loss.png").is_file()


@pytest.mark.parametrize(
    "method",
    [
        dict(lora_dropout=0.1),
        # bitsandbytes nests its 8-bit state in a dict and shares one quantisation map among all
        # parameters: both must survive the resume state's safetensors + JSON.
        pytest.param(
            dict(method="full", optimizer="adamw8bit", learning_rate=1e-4),
            marks=pytest.mark.skipif(
                importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (the test extra)"
            ),
        ),
    ],
    ids=["lora", "full-adamw8bit"],
)
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, data, method):
    common = dict(max_steps=6, epochs=10, checkpoint_every=4, flip=True, **method)
    straight = tiny_config(tmp_path / "a", data, **common)
    assert train(straight, model_loader=loader(), device="cpu").state == RunState.FINISHED

    split = tiny_config(tmp_path / "b", data, **common)
    commands = Commands()
    first = train(
        split,
        callbacks=Recorder(stop_at=3, commands=commands),
        commands=commands,
        model_loader=loader(),
        device="cpu",
    )
    assert first.state == RunState.STOPPED
    assert first.step == 3
    assert "stopped" in first.message
    second = train(split, resume=True, model_loader=loader(), device="cpu")
    assert second.state == RunState.FINISHED, second.message

    a = load_file(
        str(CheckpointStore(RunFolder.for_run(straight.output_dir, "tiny").path, "tiny").path_for(6))
    )
    b = load_file(str(CheckpointStore(RunFolder.for_run(split.output_dir, "tiny").path, "tiny").path_for(6)))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    rows = RunFolder.for_run(split.output_dir, "tiny").read_metrics(0)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "batch,accum,per_epoch",
    [
        (2, 1, 3),  # 3 squares -> 2 batches, 2 wide -> 1 batch
        (1, 2, 3),  # 5 single-image batches, 2 per step -> the last step has one
    ],
)
def test_steps_match_the_plan_with_unequal_buckets(tmp_path, batch, accum, per_epoch):
    data = make_images(tmp_path / "data", [(64, 64), (64, 64), (64, 64), (128, 64), (128, 64)], repeats=1)
    # At 128 px the small images get buckets of their own size: 3 squares and 2 wide ones.
    config = tiny_config(
        tmp_path,
        data,
        batch_size=batch,
        gradient_accumulation=accum,
        epochs=2,
        resolution=128,
        max_bucket_resolution=256,
    )
    rec = Recorder()
    result = train(config, callbacks=rec, model_loader=loader(), device="cpu")
    assert result.state == RunState.FINISHED, result.message
    run = json.loads(RunFolder.for_run(config.output_dir, "tiny").run_json.read_text())
    assert run["plan"]["steps_per_epoch"] == per_epoch
    assert run["buckets"] == {"128x64": 2, "64x64": 3}
    assert rec.steps == list(range(1, 2 * per_epoch + 1))


def test_validation_samples_and_host_pause(tmp_path, data):
    class BusyHost(HostHooks):
        def __init__(self):
            self.calls = 0
            self.reserved: list[int] = []
            self.freed = 0

        def free_memory(self):
            self.freed += 1

        def reserve(self, nbytes):
            self.reserved.append(nbytes)

        def is_busy(self):
            self.calls += 1
            return self.calls in (2, 3)

    config = tiny_config(
        tmp_path,
        data,
        max_steps=4,
        epochs=5,
        validation_every=2,
        validation_prompts=["thing", "disc"],
        validation_steps=2,
        validation_at_start=True,
        pause_while_host_busy=True,
    )
    rec, host = Recorder(), BusyHost()
    result = train(config, callbacks=rec, host=host, model_loader=loader(), device="cpu")
    assert result.state == RunState.FINISHED, result.message
    assert [s for s, _ in rec.samples] == [0, 2, 4]
    step2 = rec.samples[1][1]
    assert [p.rsplit("/", 1)[1] for p in step2] == ["step00002-0.png", "step00002-1.png"]
    assert Image.open(step2[0]).size == (64, 64)
    assert (RunState.PAUSED, "waiting while ComfyUI runs a prompt") in rec.states
    assert host.freed == 1
    assert host.reserved[-1] == 0


def test_user_pause_then_stop_keeps_a_checkpoint(tmp_path, data):
    commands = Commands()

    class PauseAt2(Recorder):
        def on_progress(self, progress):
            super().on_progress(progress)
            if progress.step == 2:
                commands.pause()

        def on_state(self, run, state, message=""):
            super().on_state(run, state, message)
            if state == RunState.PAUSED:
                commands.stop()

    config = tiny_config(tmp_path, data, max_steps=6, epochs=5, checkpoint_every=5)
    rec = PauseAt2()
    result = train(config, callbacks=rec, commands=commands, model_loader=loader(), device="cpu")
    assert result.state == RunState.STOPPED
    assert result.step == 2
    assert result.final_checkpoint.endswith("tiny-step00002.safetensors")
    states = [s for s, _ in rec.states]
    assert states[-2:] == [RunState.PAUSED, RunState.STOPPED]
    run = json.loads(RunFolder.for_run(config.output_dir, "tiny").run_json.read_text())
    assert run["status"]["state"] == "stopped"


# ------------------------------------------------------------------------------------------------
# Failures: each ends the run as failed with its message; earlier checkpoints stay.


def _fail_at(monkeypatch, step_to_fail: int, make):
    real = loop_module.batch_loss
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step_to_fail:
            return make(real(*args, **kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "batch_loss", patched)


def _raise_oom(_):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_fails_with_advice(tmp_path, data, monkeypatch):
    _fail_at(monkeypatch, 3, _raise_oom)
    config = tiny_config(tmp_path, data, max_steps=6, epochs=5, checkpoint_every=2, batch_size=1)
    rec = Recorder()
    result = train(config, callbacks=rec, model_loader=loader(), device="cpu")
    assert result.state == RunState.FAILED
    assert result.message == (
        "out of GPU memory at step 3 with batch 1 at 64 px: lower batch_size, enable gradient_checkpointing, or lower resolution"
    )
    assert rec.states[-1] == (RunState.FAILED, result.message)
    folder = RunFolder.for_run(config.output_dir, "tiny")
    assert [c.step for c in CheckpointStore(folder.path, "tiny").list()] == [2]
    status = json.loads(folder.run_json.read_text())["status"]
    assert (status["state"], status["message"], status["step"]) == ("failed", result.message, 2)


def test_nan_loss_stops_before_saving(tmp_path, data, monkeypatch):
    _fail_at(monkeypatch, 3, lambda loss: loss * float("nan"))
    config = tiny_config(tmp_path, data, max_steps=6, epochs=5, checkpoint_every=3)
    result = train(config, model_loader=loader(), device="cpu")
    assert result.state == RunState.FAILED
    assert result.message.startswith(
        "the loss became nan at step 3; the run was stopped before saving anything"
    )
    assert "learning_rate" in result.message
    folder = RunFolder.for_run(config.output_dir, "tiny")
    assert CheckpointStore(folder.path, "tiny").list() == []
    assert [r["step"] for r in folder.read_metrics(0)] == [1, 2]


def test_disk_full_while_writing_a_checkpoint(tmp_path, data, monkeypatch):
    from trainer.engine import saving

    real = saving.save_lora
    calls = {"n": 0}

    def failing(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, tensors, metadata)

    monkeypatch.setattr(saving, "save_lora", failing)
    config = tiny_config(tmp_path, data, max_steps=6, epochs=5, checkpoint_every=2)
    result = train(config, model_loader=loader(), device="cpu")
    folder = RunFolder.for_run(config.output_dir, "tiny")
    store = CheckpointStore(folder.path, "tiny")
    assert result.state == RunState.FAILED
    assert (
        result.message == f"disk full while writing {store.path_for(4)}; free some space, then resume the run"
    )
    assert [c.step for c in store.list()] == [2]
    assert result.final_checkpoint == str(store.path_for(2))


def test_unreadable_image_mid_run_names_the_file(tmp_path, data):
    bad = data / "1_things" / "img1.png"

    class Corrupt(Recorder):
        def on_progress(self, progress):
            if progress.step == 1:
                bad.write_bytes(b"not a png any more")

    config = tiny_config(tmp_path, data, max_steps=4, epochs=5, cache_latents="off")
    result = train(config, callbacks=Corrupt(), model_loader=loader(), device="cpu")
    assert result.state == RunState.FAILED
    assert result.message.startswith(f"could not read image {bad}")


def test_config_and_model_errors_pass_their_message(tmp_path, data):
    config = tiny_config(tmp_path, data)
    result = train(config, device="cpu")  # no model_loader and no base_model
    assert result.state == RunState.FAILED
    assert result.message == "base_model: is empty; choose a diffusers folder or a .safetensors checkpoint"

    missing = tiny_config(tmp_path, tmp_path / "nowhere", run_name="other")
    result = train(missing, model_loader=loader(), device="cpu")
    assert result.state == RunState.FAILED
    assert "nowhere" in result.message


def test_a_finished_run_is_not_overwritten(tmp_path, data):
    config = tiny_config(tmp_path, data, max_steps=2, epochs=5)
    assert train(config, model_loader=loader(), device="cpu").state == RunState.FINISHED
    again = train(config, model_loader=loader(), device="cpu")
    assert again.state == RunState.FAILED
    assert again.message.startswith("run_name: 'tiny' already has checkpoints in ")


def test_a_finished_run_holds_nothing_of_its_model(tmp_path, data):
    """When a run ends, its model, optimizer and caches are freed at once (and the GPU's cached
    blocks handed back), not when Python's cycle collector next runs: inside ComfyUI the next run
    or prompt needs that memory."""
    import gc
    import weakref

    held = []

    def load(_config):
        bundle = tiny_bundle(Arch.SD15, seed=0)
        held.append(weakref.ref(bundle.denoiser))
        return bundle

    gc.disable()  # only the run itself may collect its cycles
    try:
        result = train(tiny_config(tmp_path, data, max_steps=2, epochs=10), model_loader=load, device="cpu")
        assert result.state == RunState.FINISHED, result.message
        assert [ref() for ref in held] == [None]
    finally:
        gc.enable()
