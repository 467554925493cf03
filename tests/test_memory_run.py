"""memory_mode inside a run (tiny models on the CPU): the encoders leave the "GPU" after caching and
come back only for validation renders, the host's reservation follows them, the chosen savers are
applied and recorded, and a card too small is refused before anything loads."""

from __future__ import annotations

import json

import pytest
import torch
from log_capture import captured_logs
from train_helpers import make_images, tiny_config

from trainer.config import Arch
from trainer.engine import loop as loop_module
from trainer.engine import offload, setup, validation
from trainer.engine.events import Callbacks, HostHooks, RunState
from trainer.engine.inputs import InputBuilder
from trainer.engine.loop import train
from trainer.engine.memory import GiB
from trainer.engine.offload import Parking
from trainer.engine.runtime import Runtime
from trainer.models.tiny import tiny_bundle
from trainer.runfolder import RunFolder

MiB = 2**20


@pytest.fixture
def data(tmp_path):
    return make_images(tmp_path / "data", [(64, 64), (64, 64)])


def loader(holder: list | None = None, calls: list | None = None):
    def load(config):
        if calls is not None:
            calls.append(config.base_model)
        bundle = tiny_bundle(Arch.SD15, seed=0)
        if holder is not None:
            holder.append(bundle)
        return bundle

    return load


class RecordingHost(HostHooks):
    def __init__(self):
        self.reserved: list[int] = []

    def reserve(self, nbytes):
        self.reserved.append(nbytes)


class Where:
    """Stands in for a GPU on the CPU: which side the parked encoders are on, as Parking moves them."""

    def __init__(self):
        self.on_gpu = True
        self.moves: list[tuple[str, bool]] = []  # (names moved, now on the GPU)


@pytest.fixture
def where(monkeypatch):
    w = Where()

    class SpyParking(Parking):
        def _move(self, dest):
            w.on_gpu = self.parked  # parked modules move in; unparked ones move out
            w.moves.append((",".join(self.modules), w.on_gpu))
            super()._move(dest)

    monkeypatch.setattr(offload, "Parking", SpyParking)
    # The run's GPU memory: 900 MiB of tensors and 100 MiB of cached blocks of its own, plus
    # 600 + 100 MiB while the encoders are there.
    monkeypatch.setattr(Runtime, "memory_reserved", lambda self: (1000 + 700 * w.on_gpu) * MiB)
    monkeypatch.setattr(Runtime, "memory_allocated", lambda self: (900 + 600 * w.on_gpu) * MiB)
    return w


class Steps(Callbacks):
    def __init__(self, where: Where):
        self.where = where
        self.on_gpu_at_step: list[bool] = []
        self.states: list[tuple[RunState, str]] = []

    def on_progress(self, progress):
        self.on_gpu_at_step.append(self.where.on_gpu)

    def on_state(self, run, state, message=""):
        self.states.append((state, message))


def test_encoders_leave_after_caching_and_come_back_only_for_validation(tmp_path, data, where, monkeypatch):
    rendered_with: list[bool] = []
    real_render = validation.render_prompts

    def render(*args, **kwargs):
        rendered_with.append(where.on_gpu)
        return real_render(*args, **kwargs)

    monkeypatch.setattr(validation, "render_prompts", render)
    encoded_with: list[tuple[str, bool]] = []
    for name in ("encode_pixels", "_encode_texts"):
        real = getattr(InputBuilder, name)

        def spy(self, x, _real=real, _name=name):
            encoded_with.append((_name, where.on_gpu))
            return _real(self, x)

        monkeypatch.setattr(InputBuilder, name, spy)
    real_prepare = setup.prepare_trainables

    def prepare(*args, **kwargs):
        encoded_with.append(("denoiser to the GPU", where.on_gpu))
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(setup, "prepare_trainables", prepare)
    config = tiny_config(
        tmp_path,
        data,
        flip=True,
        max_steps=4,
        epochs=5,
        validation_every=2,
        validation_prompts=["thing"],
        validation_steps=1,
        validation_at_start=True,
    )
    host, steps = RecordingHost(), Steps(where)
    result = train(config, callbacks=steps, host=host, model_loader=loader(), device="cpu")
    assert result.state == RunState.FINISHED, result.message
    names = "vae,text_encoder_0"
    # On the GPU only to fill the caches (before the denoiser is there) and for each of the three
    # renders, parked again after each.
    assert where.moves == [(names, True), (names, False)] * 4
    assert steps.on_gpu_at_step == [False] * 4
    assert rendered_with == [True, True, True]
    # Every encoder call came before the encoders left, and before the denoiser went to the GPU:
    # both captions in one batch, then each image and its mirror image, one at a time; no step
    # encoded anything.
    assert encoded_with == [("_encode_texts", True)] + [("encode_pixels", True)] * 4 + [
        ("denoiser to the GPU", False)
    ]
    # The host keeps room for the cached blocks alone (the run's tensors are already gone from
    # what it sees as free): more during renders, 0 at the end.
    assert [n // MiB for n in host.reserved] == [200, 100] + [200, 100] * 3 + [0]
    assert (RunState.RUNNING, "caching latents and captions") in steps.states
    record = json.loads(RunFolder.for_run(config.output_dir, "tiny").run_json.read_text())
    assert record["memory"]["message"] == "memory auto: no GPU, nothing to fit (SD1.5 LoRA 64 b1)"
    assert record["memory"]["chosen"] == []


def test_memory_mode_off_keeps_the_encoders_where_they_are(tmp_path, data, where):
    config = tiny_config(tmp_path, data, max_steps=2, memory_mode="off")
    host = RecordingHost()
    result = train(config, host=host, model_loader=loader(), device="cpu")
    assert result.state == RunState.FINISHED, result.message
    assert where.moves == []
    assert [n // MiB for n in host.reserved] == [200, 0]


def test_a_random_crop_keeps_the_vae_and_parks_the_text_encoder(tmp_path, data, where):
    config = tiny_config(tmp_path, data, max_steps=2, crop="random")
    result = train(config, host=RecordingHost(), model_loader=loader(), device="cpu")
    assert result.state == RunState.FINISHED, result.message
    assert where.moves == [("text_encoder_0", True), ("text_encoder_0", False)]


def test_an_out_of_memory_step_with_parked_encoders_ends_the_run_cleanly(tmp_path, data, where, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop_module, "batch_loss", oom)
    host = RecordingHost()
    result = train(tiny_config(tmp_path, data, max_steps=2), host=host, model_loader=loader(), device="cpu")
    assert result.state == RunState.FAILED
    assert result.message.startswith("out of GPU memory at step 1 with batch 1 at 64 px")
    assert host.reserved[-1] == 0


class Allocator:
    """Stands in for the CUDA caching allocator: 1000 MiB of the run's tensors, 800 MiB of blocks a
    step leaves cached, until emptied, and ``graph_pool`` free bytes a step leaves in a CUDA graph's
    private pool, which emptying the cache does not release."""

    def __init__(self):
        self.live, self.cached, self.pooled, self.graph_pool = 1000 * MiB, 0, 0, 0

    def step(self):
        self.cached, self.pooled = 800 * MiB, self.graph_pool


@pytest.fixture
def allocator(monkeypatch) -> Allocator:
    a = Allocator()
    monkeypatch.setattr(Runtime, "memory_reserved", lambda self: a.live + a.cached + a.pooled)
    monkeypatch.setattr(Runtime, "memory_allocated", lambda self: a.live)
    monkeypatch.setattr(Runtime, "empty_cache", lambda self: setattr(a, "cached", 0))
    return a


class LendingHost(HostHooks):
    """A host with a prompt queued before one step, and the memory events the run sends it."""

    def __init__(self, allocator: Allocator, *, busy_before_step: int, refuse_room: int = 0):
        self.allocator = allocator
        self.busy_before_step = busy_before_step
        self.refuse_room = refuse_room  # how many make_room calls find a prompt running
        self.step = 1  # the step the run is about to take
        self.polls = 0
        self.events: list[tuple] = []

    def reserve(self, nbytes):
        self.events.append(("reserve", nbytes // MiB))

    def make_room(self, nbytes, keep=()):
        self.events.append(("make_room", nbytes // MiB, self.allocator.cached // MiB))
        if self.refuse_room:
            self.refuse_room -= 1
            return False
        return True

    def is_busy(self):
        # Busy for the first two polls before the step (the prompt renders while the run waits on
        # the second); idle from the third.
        if self.step != self.busy_before_step:
            return False
        self.polls += 1
        if self.polls == 2:
            self.events.append(("render", self.allocator.cached // MiB))
        return self.polls <= 2


@pytest.mark.parametrize(
    ("refuse_room", "graph_pool"), [(0, 0), (1, 0), (0, 300)], ids=["room", "prompt-started", "graph-pool"]
)
def test_a_paused_run_lends_its_cached_memory_to_the_prompts_and_takes_it_back(
    tmp_path, data, monkeypatch, allocator, refuse_room, graph_pool
):
    allocator.graph_pool = graph_pool * MiB
    real_loss = loop_module.batch_loss

    def loss(*args, **kwargs):
        allocator.step()
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(loop_module, "batch_loss", loss)
    host = LendingHost(allocator, busy_before_step=2, refuse_room=refuse_room)

    class Steps(Callbacks):
        def on_progress(self, progress):
            host.step = progress.step + 1
            host.events.append(("step", progress.step))

    config = tiny_config(tmp_path, data, max_steps=3, epochs=5, pause_while_host_busy=True, memory_mode="off")
    with captured_logs("finetune") as logs:
        result = train(config, callbacks=Steps(), host=host, model_loader=loader(), device="cpu")
    assert result.state == RunState.FINISHED, result.message
    assert [m for m in logs if "GPU memory" in m] == [
        "finetune: run tiny lends 800 MiB of GPU memory while it waits",
        "finetune: run tiny took back 800 MiB of GPU memory",
    ]
    # The prompt renders with the 800 MiB cache back with the driver, and only the graph pool the
    # run cannot release still reserved; before step 2 the run asks for the 800 MiB back (again,
    # when the first ask found a prompt running) and reserves them while its step regrows the cache.
    taken_back = [("make_room", 800, 0)] * (1 + refuse_room) + [("reserve", 800 + graph_pool)]
    assert host.events == [
        ("reserve", 0),
        ("reserve", 800 + graph_pool),
        ("step", 1),
        ("reserve", graph_pool),
        ("render", 0),
        *taken_back,
        ("step", 2),
        ("step", 3),
        ("reserve", 0),
    ]


def test_a_run_paused_before_its_first_step_takes_back_what_its_plan_estimates(tmp_path, data, allocator):
    host = LendingHost(allocator, busy_before_step=1)
    config = tiny_config(tmp_path, data, max_steps=1, pause_while_host_busy=True)
    result = train(config, host=host, model_loader=loader(), device="cpu")
    assert result.state == RunState.FINISHED, result.message
    estimate = json.loads(RunFolder.for_run(config.output_dir, "tiny").run_json.read_text())["memory"]
    # No step has shown the run's working set yet: the plan's estimate, less what the run holds.
    first_step = (estimate["chosen_estimate_bytes"] - allocator.live) // MiB
    assert first_step > 0
    assert host.events[:5] == [
        ("reserve", 0),
        ("reserve", 0),
        ("render", 0),
        ("make_room", first_step, 0),
        ("reserve", first_step),
    ]


def test_a_run_on_the_cpu_lends_nothing(tmp_path, data):
    host = LendingHost(Allocator(), busy_before_step=2)

    class Steps(Callbacks):
        def on_progress(self, progress):
            host.step = progress.step + 1

    config = tiny_config(tmp_path, data, max_steps=3, epochs=5, pause_while_host_busy=True, memory_mode="off")
    result = train(config, callbacks=Steps(), host=host, model_loader=loader(), device="cpu")
    assert result.state == RunState.FINISHED, result.message
    assert host.polls == 4
    assert host.events == [("reserve", 0), ("render", 0), ("reserve", 0)]


def test_the_chosen_savers_train_and_run_json_keeps_the_users_config(tmp_path, data, monkeypatch):
    monkeypatch.setattr(loop_module, "free_gpu_memory", lambda device, host: 10 * GiB)
    holder: list = []
    config = tiny_config(tmp_path, data, max_steps=1, batch_size=2, memory_mode="lowest")
    result = train(config, model_loader=loader(holder), device="cpu")
    assert result.state == RunState.FINISHED, result.message
    assert holder[0].denoiser.is_gradient_checkpointing
    record = json.loads(RunFolder.for_run(config.output_dir, "tiny").run_json.read_text())
    memory = record["memory"]
    # fp32 on the CPU: no fp8 storage to choose; no bitsandbytes off CUDA.
    assert memory["chosen"] == ["gradient checkpointing", "batch 1 × accumulation 2"]
    assert (memory["settings"]["batch_size"], memory["settings"]["gradient_accumulation"]) == (1, 2)
    assert memory["message"].startswith("memory lowest: 10.0 GiB free; SD1.5 LoRA 64 b2 needs ~")
    assert (record["config"]["batch_size"], record["config"]["gradient_checkpointing"]) == (2, False)
    assert record["plan"]["total_steps"] == 1


def test_a_card_too_small_is_refused_before_the_model_loads(tmp_path, data, monkeypatch):
    monkeypatch.setattr(loop_module, "free_gpu_memory", lambda device, host: 2 * GiB)
    calls: list = []
    config = tiny_config(tmp_path, data, arch="sdxl", base_model="/models/sdxl.safetensors")
    result = train(config, model_loader=loader(calls=calls), device="cpu")
    assert result.state == RunState.FAILED
    assert calls == []
    assert result.message.startswith("memory_mode: SDXL LoRA 64 b1 needs at least ~")
    assert (
        "of GPU memory even with every memory saver on, but only 2.0 GiB is free on this GPU"
        in result.message
    )
    status = json.loads(RunFolder.for_run(config.output_dir, "tiny").run_json.read_text())["status"]
    assert (status["state"], status["message"]) == ("failed", result.message)


def test_a_resumed_run_keeps_the_memory_plan_it_started_with(tmp_path, data, monkeypatch):
    from trainer.engine.events import Commands

    free = {"bytes": 10 * GiB}
    monkeypatch.setattr(loop_module, "free_gpu_memory", lambda device, host: free["bytes"])
    config = tiny_config(tmp_path, data, max_steps=4, epochs=5, batch_size=2, memory_mode="lowest")
    commands = Commands()

    class StopAt2(Callbacks):
        def on_progress(self, progress):
            if progress.step == 2:
                commands.stop()

    first = train(config, callbacks=StopAt2(), commands=commands, model_loader=loader(), device="cpu")
    assert (first.state, first.step) == (RunState.STOPPED, 2)
    folder = RunFolder.for_run(config.output_dir, "tiny")
    started = json.loads(folder.run_json.read_text())["memory"]
    free["bytes"] = 3 * GiB  # another card now: the plan recorded at the start still holds
    again = train(config, resume=True, model_loader=loader(), device="cpu")
    assert (again.state, again.step) == (RunState.FINISHED, 4), again.message
    assert json.loads(folder.run_json.read_text())["memory"] == started
    assert started["settings"]["batch_size"] == 1 and started["settings"]["gradient_accumulation"] == 2
