"""The run manager with a fake engine (milliseconds a step): queue order, one copy per name,
pause/resume/stop, recovery after a restart, and contained failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from fake_train import FakeTrain

from trainer.config import TrainConfig
from trainer.engine.events import Callbacks, RunState
from trainer.runfolder import RunFolder, RunPathError
from trainer.runs import RunManager, RunNotFound, RunStateError


class Recorder(Callbacks):
    """Keeps every event a listener receives, in order."""

    def __init__(self):
        self.events: list[tuple] = []
        self._lock = threading.Lock()

    def on_state(self, run, state, message=""):
        with self._lock:
            self.events.append(("state", run, RunState(state).value, message))

    def on_progress(self, progress):
        with self._lock:
            self.events.append(("progress", progress.run, progress.step))

    def on_sample(self, run, step, paths):
        with self._lock:
            self.events.append(("sample", run, step, [os.path.basename(p) for p in paths]))

    def on_checkpoint(self, run, step, path):
        with self._lock:
            self.events.append(("checkpoint", run, step, os.path.basename(path)))

    def states(self, run: str) -> list[str]:
        return [e[2] for e in self.events if e[0] == "state" and e[1] == run]


def config(name: str, *, steps: int = 6, every: int = 2, tmp_path=None, **kw) -> TrainConfig:
    return TrainConfig(
        run_name=name, max_steps=steps, checkpoint_every=every, output_dir=str(tmp_path or "unused"), **kw
    )


def until(predicate, timeout: float = 10.0):
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` (never asserts a time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.002)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture
def fake():
    return FakeTrain()


@pytest.fixture
def manager(tmp_path, fake):
    m = RunManager(tmp_path, train_fn=fake)
    yield m
    m.shutdown(timeout=5)


def test_two_runs_on_one_worker_run_in_order(manager, fake, tmp_path):
    rec = Recorder()
    manager.add_listener(rec)
    fake.gate = threading.Event()
    a = manager.submit(config("a", tmp_path=tmp_path))
    b = manager.submit(config("b", tmp_path=tmp_path))
    assert (a.note, b.note) == ("queued", "queued behind 1 run(s)")
    until(lambda: manager.get("a").state == "running")
    assert manager.get("b").state == "queued"
    fake.gate.set()
    assert manager.wait("b", timeout=10).state == "finished"
    assert [c[0] for c in fake.calls] == ["a", "b"]
    order = [(e[1], e[2]) for e in rec.events if e[0] == "state"]
    assert order.index(("a", "finished")) < order.index(("b", "running"))
    info = manager.get("a")
    assert (info.state, info.step, info.total, info.loss) == ("finished", 6, 6, pytest.approx(1 / 6))
    assert json.loads((tmp_path / "finetune" / "a" / "run.json").read_text())["status"]["state"] == "finished"
    checkpoints = [e[3] for e in rec.events if e[0] == "checkpoint" and e[1] == "a"]
    assert checkpoints == ["a-step00002.safetensors", "a-step00004.safetensors", "a-step00006.safetensors"]


def test_listener_sees_states_in_order(manager, tmp_path):
    rec = Recorder()
    manager.add_listener(rec)
    manager.submit(config("seq", tmp_path=tmp_path))
    manager.wait("seq", timeout=10)
    states = [(e[2], e[3]) for e in rec.events if e[0] == "state"]
    assert states == [
        ("queued", "queued"),
        ("running", "starting on default"),
        ("running", ""),
        ("finished", "finished"),
    ]
    steps = [e[2] for e in rec.events if e[0] == "progress"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_submit_of_a_running_name_returns_the_same_run(manager, fake, tmp_path):
    fake.gate = threading.Event()
    first = manager.submit(config("My LoRA / v2", tmp_path=tmp_path))
    until(lambda: manager.get("My-LoRA-v2").state == "running")
    again = manager.submit(config("My LoRA / v2", tmp_path=tmp_path, learning_rate=5e-4))
    assert (first.name, first.already_running) == ("My-LoRA-v2", False)
    assert (again.name, again.folder, again.already_running) == ("My-LoRA-v2", first.folder, True)
    assert again.note == "already running; not started twice"
    fake.gate.set()
    manager.wait("My-LoRA-v2", timeout=10)
    assert fake.calls == [("My-LoRA-v2", False)]


def test_pause_resume_and_stop_between_steps(manager, fake, tmp_path):
    rec = Recorder()
    manager.add_listener(rec)
    manager.submit(config("long", steps=100_000, every=5, tmp_path=tmp_path))
    until(lambda: manager.get("long").step >= 6)

    paused = manager.pause("long")
    assert paused.state == "paused"
    # The manager's message until the engine reaches its pause point, then the engine's.
    assert paused.message == "paused; resume to continue" or paused.message.startswith("paused at step ")
    until(fake.paused_now.is_set)
    held = manager.get("long").step
    assert manager.get("long").message == f"paused at step {held}"
    time.sleep(0.05)  # steps would advance ~20 times in this while if the pause leaked
    assert manager.get("long").step == held
    assert (
        json.loads((tmp_path / "finetune" / "long" / "run.json").read_text())["status"]["state"] == "paused"
    )

    assert manager.resume("long").state == "running"
    until(lambda: manager.get("long").step > held + 2)

    stopping = manager.stop("long")
    assert stopping.state == "stopping"
    final = manager.wait("long", timeout=10)
    assert final.state == "stopped"
    assert final.message.startswith("stopped by the user at step ")
    assert manager.get("long").state == "stopped"
    kept = sorted(p.name for p in (tmp_path / "finetune" / "long" / "checkpoints").iterdir())
    assert kept[0] == "long-step00005.safetensors"
    with pytest.raises(RunStateError, match="is stopped; cannot pause it"):
        manager.pause("long")
    # Listeners hear every change, in order (consecutive repeats differ only in their message).
    heard = [
        state for i, state in enumerate(rec.states("long")) if i == 0 or rec.states("long")[i - 1] != state
    ]
    assert heard == ["queued", "running", "paused", "running", "stopping", "stopped"]
    assert ("state", "long", "paused", "paused; resume to continue") in rec.events
    assert ("state", "long", "running", "resumed") in rec.events


def test_stop_a_queued_run_takes_it_out_of_the_queue(manager, fake, tmp_path):
    fake.gate = threading.Event()
    manager.submit(config("first", tmp_path=tmp_path))
    manager.submit(config("second", tmp_path=tmp_path))
    info = manager.stop("second")
    assert (info.state, info.message) == ("stopped", "stopped before it started")
    assert RunFolder.for_run(tmp_path, "second").read()["status"]["state"] == "stopped"
    manager.submit(config("third", tmp_path=tmp_path))
    with pytest.raises(RunStateError, match="'third' is queued; only a running run can be paused"):
        manager.pause("third")
    fake.gate.set()
    manager.wait("first", timeout=10)
    manager.wait("third", timeout=10)
    assert [c[0] for c in fake.calls] == ["first", "third"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_run(tmp_path, name: str, *, state: str, pid: int, step: int, checkpoint_steps=()) -> RunFolder:
    folder = RunFolder.for_run(tmp_path, name)
    folder.create()
    cfg = config(name, steps=10, every=3, tmp_path=tmp_path)
    from trainer.options import to_dict

    folder.update(config=to_dict(cfg), plan={"total_steps": 10})
    data = folder.read()
    data["status"] = {"state": state, "message": "", "pid": pid, "step": step, "updated_at": time.time()}
    folder.run_json.write_text(json.dumps(data))
    for s in range(1, step + 1):
        folder.append_metrics({"step": s, "loss": 0.5, "lr": 1e-4})
    for s in checkpoint_steps:
        (folder.checkpoints_dir / f"{name}-step{s:05d}.safetensors").write_bytes(b"w")
    return folder


def test_a_run_left_running_by_a_dead_process_is_interrupted_and_resumes(tmp_path, fake):
    _write_run(tmp_path, "crashed", state="running", pid=_dead_pid(), step=7, checkpoint_steps=(3, 6))
    _write_run(tmp_path, "same-pid", state="paused", pid=os.getpid(), step=2)
    m = RunManager(tmp_path, train_fn=fake)
    try:
        assert m.recovered == ["crashed", "same-pid"]
        info = m.get("crashed")
        assert info.state == "interrupted"
        assert (
            info.message
            == "ComfyUI stopped while this run was running at step 7; resume it to continue from its last checkpoint"
        )
        assert (info.step, info.total) == (7, 10)
        assert RunFolder.for_run(tmp_path, "crashed").read()["status"]["state"] == "interrupted"
        assert m.get("same-pid").state == "interrupted"

        resumed = m.resume("crashed")
        assert resumed.state in ("queued", "running", "finished")
        assert m.wait("crashed", timeout=10).state == "finished"
        assert fake.calls[0] == ("crashed", True)
        steps = [r["step"] for r in m.metrics("crashed")]
        assert steps == list(range(1, 11))  # rows 7 (logged after checkpoint 6) redone once

        m.resume("same-pid")  # no checkpoint: starts over
        m.wait("same-pid", timeout=10)
        assert fake.calls[1] == ("same-pid", False)
        with pytest.raises(RunStateError, match="has finished; there is nothing to resume"):
            m.resume("crashed")
    finally:
        m.shutdown(timeout=5)


def test_a_run_of_another_live_process_is_left_alone(tmp_path, fake):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write_run(tmp_path, "cli-run", state="running", pid=other.pid, step=4)
        m = RunManager(tmp_path, train_fn=fake)
        try:
            assert m.recovered == []
            info = m.get("cli-run")
            assert (info.state, info.external) == ("running", True)
            with pytest.raises(RunStateError, match="is running in another process; cannot stop it"):
                m.stop("cli-run")
            with pytest.raises(RunStateError, match=r"is running in another process \(pid \d+\)"):
                m.submit(config("cli-run", steps=10, every=3, tmp_path=tmp_path))
        finally:
            m.shutdown(timeout=5)
    finally:
        other.kill()
        other.wait()


def test_a_crashing_trainer_fails_the_run_keeps_checkpoints_and_the_worker(manager, fake, tmp_path):
    fake.crash_at["boom"] = 5
    manager.submit(config("boom", steps=10, every=2, tmp_path=tmp_path))
    manager.submit(config("after", tmp_path=tmp_path))
    info = manager.wait("boom", timeout=10)
    assert info.state == "failed"
    assert info.message == "the trainer crashed: RuntimeError: CUDA out of memory at step 5"
    status = RunFolder.for_run(tmp_path, "boom").read()["status"]
    assert (status["state"], status["message"]) == ("failed", info.message)
    ckpt = tmp_path / "finetune" / "boom" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "boom-step00002.safetensors",
        "boom-step00004.safetensors",
    ]
    assert (ckpt / "boom-step00004.safetensors").read_bytes() == b"weights at 4"
    assert manager.wait("after", timeout=10).state == "finished"


def test_nan_loss_reported_by_the_engine_fails_the_run(manager, fake, tmp_path):
    rec = Recorder()
    manager.add_listener(rec)
    fake.nan_at["nan"] = 3
    manager.submit(config("nan", tmp_path=tmp_path))
    info = manager.wait("nan", timeout=10)
    assert (info.state, info.message, info.step) == (
        "failed",
        "loss became NaN at step 3; lower the learning rate",
        2,
    )
    assert rec.states("nan")[-1] == "failed"
    assert rec.states("nan").count("failed") == 1


def test_a_listener_that_raises_does_not_stop_the_run(manager, tmp_path):
    class Broken(Callbacks):
        def on_progress(self, progress):
            raise RuntimeError("websocket closed")

    manager.add_listener(Broken())
    manager.submit(config("robust", tmp_path=tmp_path))
    assert manager.wait("robust", timeout=10).state == "finished"


def test_resubmitting_a_finished_run_reuses_it_and_a_changed_one_is_refused(manager, fake, tmp_path):
    manager.submit(config("done", tmp_path=tmp_path))
    manager.wait("done", timeout=10)
    again = manager.submit(config("done", tmp_path=tmp_path, validation_prompts=["a new prompt"]))
    assert (again.already_running, again.note) == (
        False,
        "already finished at step 6; change run_name to train again",
    )
    with pytest.raises(RunStateError) as err:
        manager.submit(config("done", tmp_path=tmp_path, learning_rate=3e-4))
    assert "run 'done' already exists" in str(err.value)
    assert "learning_rate 0.0001 -> 0.0003" in str(err.value)
    assert len(fake.calls) == 1


def test_resubmitting_a_stopped_run_resumes_it(manager, fake, tmp_path):
    fake.crash_at["again"] = 5
    manager.submit(config("again", steps=8, every=2, tmp_path=tmp_path))
    manager.wait("again", timeout=10)
    fake.crash_at.clear()
    handle = manager.submit(config("again", steps=8, every=2, tmp_path=tmp_path))
    assert handle.note == "queued, resuming from its last checkpoint"
    assert manager.wait("again", timeout=10).state == "finished"
    assert fake.calls == [("again", False), ("again", True)]


def test_metrics_since_and_lookups(manager, tmp_path):
    manager.submit(config("m", tmp_path=tmp_path))
    manager.wait("m", timeout=10)
    assert [r["step"] for r in manager.metrics("m", since=4)] == [5, 6]
    assert [i.name for i in manager.list()] == ["m"]
    assert manager.list()[0].to_dict(detail=False).keys() >= {
        "name",
        "state",
        "step",
        "total",
        "loss",
        "eta_s",
    }
    assert "config" not in manager.list()[0].to_dict(detail=False)
    assert manager.get("m").config["max_steps"] == 6
    assert manager.get("m").plan == {"total_steps": 6, "steps_per_epoch": 6}
    with pytest.raises(RunNotFound, match="no run named 'nope'"):
        manager.get("nope")
    with pytest.raises(RunPathError):
        manager.get("../m")
    with pytest.raises(RunStateError, match="is finished; cannot stop it"):
        manager.stop("m")


def test_devices_are_checked():
    with pytest.raises(ValueError, match="devices must name each device once"):
        RunManager("unused", devices=("cuda:0", "cuda:0"))


# The real engine on a tiny SD1.5 ---------------------------------------------------------------


@pytest.fixture
def real_manager(tmp_path):
    from train_helpers import make_images

    from trainer.config import Arch
    from trainer.engine.loop import train
    from trainer.models.tiny import tiny_bundle

    def train_tiny(config, **kwargs):
        return train(config, model_loader=lambda c: tiny_bundle(Arch.SD15, seed=0), **kwargs)

    data = make_images(tmp_path / "data", [(64, 64), (64, 64)])
    m = RunManager(tmp_path / "out", train_fn=train_tiny, devices=("cpu",))
    yield m, data
    m.shutdown(timeout=30)


def _tiny(tmp_path, data, name: str, **kw) -> TrainConfig:
    from train_helpers import tiny_config

    return tiny_config(tmp_path, data, run_name=name, **{"epochs": 5} | kw)


def _fail_batch_loss_at(monkeypatch, step: int, make):
    from trainer.engine import loop as loop_module

    real = loop_module.batch_loss
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return make(out) if calls["n"] == step else out

    monkeypatch.setattr(loop_module, "batch_loss", patched)


def test_real_engine_out_of_memory_fails_keeps_the_checkpoint_and_resumes(
    real_manager, tmp_path, monkeypatch
):
    import torch

    manager, data = real_manager

    def oom(_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _fail_batch_loss_at(monkeypatch, 3, oom)
    rec = Recorder()
    manager.add_listener(rec)
    manager.submit(_tiny(tmp_path, data, "oom", max_steps=6, checkpoint_every=2))
    info = manager.wait("oom", timeout=120)
    assert info.state == "failed"
    assert info.message == (
        "out of GPU memory at step 3 with batch 1 at 64 px: lower batch_size, enable gradient_checkpointing, or lower resolution"
    )
    folder = RunFolder(manager.runs_root / "oom")
    assert sorted(p.name for p in folder.checkpoints_dir.iterdir()) == ["oom-step00002.safetensors"]
    assert folder.read()["status"]["state"] == "failed"
    states = [(e[2], e[3]) for e in rec.events if e[0] == "state"]
    assert states[:3] == [
        ("queued", "queued"),
        ("running", "starting on cpu"),
        ("running", "loading the model"),
    ]
    assert states[-1] == ("failed", info.message)
    assert [s for s, _ in states].count("failed") == 1

    manager.resume("oom")  # one action: continues from the step-2 checkpoint
    done = manager.wait("oom", timeout=120)
    assert (done.state, done.step, done.total) == ("finished", 6, 6)
    assert [r["step"] for r in manager.metrics("oom")] == [1, 2, 3, 4, 5, 6]
    names = sorted(p.name for p in folder.checkpoints_dir.iterdir())
    assert names[:3] == [
        "oom-step00002.safetensors",
        "oom-step00004.safetensors",
        "oom-step00006.safetensors",
    ]


def test_real_engine_shutdown_saves_the_running_run_at_its_current_step(real_manager, tmp_path):
    manager, data = real_manager
    never = 100_000  # no cadence checkpoint: only the shutdown saves
    manager.submit(_tiny(tmp_path, data, "quit", max_steps=never, epochs=1000, checkpoint_every=never))
    manager.submit(_tiny(tmp_path, data, "waiting"))
    until(lambda: manager.get("quit").step >= 2, timeout=120)

    assert manager.shutdown(timeout=60, reason="ComfyUI shut down") == ["quit"]
    folder = RunFolder(manager.runs_root / "quit")
    status = folder.read()["status"]
    step = status["step"]
    assert (status["state"], status["message"]) == (
        "stopped",
        f"ComfyUI shut down at step {step}; resume to continue",
    )
    assert [p.name for p in folder.checkpoints_dir.iterdir()] == [f"quit-step{step:05d}.safetensors"]
    assert [p.name for p in (folder.path / "state").iterdir()] == [f"step-{step:05d}"]
    # The next ComfyUI finds it stopped (not interrupted); the queued run is the one marked.
    again = RunManager(manager.runs_root.parent, devices=("cpu",))
    try:
        assert again.recovered == ["waiting"]
        assert (again.get("quit").state, again.get("quit").step) == ("stopped", step)
    finally:
        again.shutdown(timeout=5)


def test_real_engine_nan_loss_and_a_failing_write_fail_the_run(real_manager, tmp_path, monkeypatch):
    import errno

    from trainer.engine import saving

    manager, data = real_manager
    _fail_batch_loss_at(monkeypatch, 2, lambda loss: loss * float("nan"))
    manager.submit(_tiny(tmp_path, data, "nan", max_steps=4, checkpoint_every=1))
    info = manager.wait("nan", timeout=120)
    assert info.state == "failed"
    assert info.message.startswith("the loss became nan at step 2")
    assert sorted(p.name for p in (manager.runs_root / "nan" / "checkpoints").iterdir()) == [
        "nan-step00001.safetensors"
    ]

    monkeypatch.undo()
    real_save = saving.save_lora
    calls = {"n": 0}

    def failing(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, tensors, metadata)

    monkeypatch.setattr(saving, "save_lora", failing)
    manager.submit(_tiny(tmp_path, data, "full-disk", max_steps=4, checkpoint_every=1))
    info = manager.wait("full-disk", timeout=120)
    ckpt = manager.runs_root / "full-disk" / "checkpoints"
    assert (info.state, info.message) == (
        "failed",
        f"disk full while writing {ckpt / 'full-disk-step00002.safetensors'}; free some space, then resume the run",
    )
    assert sorted(p.name for p in ckpt.iterdir()) == ["full-disk-step00001.safetensors"]
