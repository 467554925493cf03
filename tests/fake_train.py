"""A stand-in for ``trainer.engine.loop.train`` for run-manager and route tests: no torch, a few
milliseconds a step, a real run folder (run.json, metrics.jsonl, checkpoints, samples) and the
same contract (honours Commands, reports through Callbacks, returns a RunResult, never raises
unless told to crash).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

from trainer.checkpoints import CheckpointStore
from trainer.engine.events import Progress, RunState
from trainer.runfolder import RunFolder, atomic_write_bytes


@dataclass
class FakeResult:
    state: RunState
    final_checkpoint: str | None
    step: int
    message: str


@dataclass
class FakeTrain:
    """Callable like the engine's ``train``. Steps = ``config.max_steps``; a checkpoint every
    ``config.checkpoint_every`` steps; a PNG sample every ``config.validation_every`` steps.

    Attributes:
        step_s: sleep per step.
        crash_at: run name -> step at which ``train`` raises (a bug in the engine).
        nan_at: run name -> step whose loss is NaN (the engine's contained failure).
        calls: (run name, resume) per call, in order.
        paused_now: set while some run is blocked in ``wait_while_paused``.
        gate: when set, each run waits for it before its first step.
    """

    step_s: float = 0.002
    crash_at: dict[str, int] = field(default_factory=dict)
    nan_at: dict[str, int] = field(default_factory=dict)
    calls: list[tuple[str, bool]] = field(default_factory=list)
    paused_now: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event | None = None

    def __call__(self, config, *, callbacks, commands, host, resume, device):
        name = config.run_name
        self.calls.append((name, resume))
        folder = RunFolder.for_run(config.output_dir, name)
        folder.create()
        store = CheckpointStore(folder.path, name)
        total = config.max_steps
        start = 0
        if resume:
            latest = store.latest(include_final=False)
            start = latest.step if latest is not None else 0
            folder.truncate_metrics_after(start)
        folder.update(plan={"total_steps": total, "steps_per_epoch": total})
        folder.set_status(RunState.RUNNING.value, "", step=start)
        callbacks.on_state(name, RunState.RUNNING, "")
        if self.gate is not None:
            self.gate.wait(10)
        step = start
        while step < total:
            if commands.stop_requested:
                return self._end(
                    folder, callbacks, name, RunState.STOPPED, step, f"stopped by the user at step {step}"
                )
            if commands.paused:
                callbacks.on_state(name, RunState.PAUSED, f"paused at step {step}")
                self.paused_now.set()
                commands.wait_while_paused()
                self.paused_now.clear()
                callbacks.on_state(name, RunState.RUNNING, "")
                continue
            step += 1
            if self.crash_at.get(name) == step:
                raise RuntimeError(f"CUDA out of memory at step {step}")
            time.sleep(self.step_s)
            loss = float("nan") if self.nan_at.get(name) == step else 1.0 / step
            if math.isnan(loss):
                return self._end(
                    folder,
                    callbacks,
                    name,
                    RunState.FAILED,
                    step - 1,
                    f"loss became NaN at step {step}; lower the learning rate",
                )
            folder.append_metrics({"step": step, "loss": loss, "lr": 1e-4, "samples_per_s": 100.0})
            callbacks.on_progress(
                Progress(name, step, total, 0, loss, 1e-4, 100.0, (total - step) * self.step_s)
            )
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                path = store.path_for(step)
                atomic_write_bytes(path, f"weights at {step}".encode())
                callbacks.on_checkpoint(name, step, str(path))
            if config.validation_every and step % config.validation_every == 0:
                sample = folder.sample_path(step, 0)
                atomic_write_bytes(sample, _png_bytes(step))
                callbacks.on_sample(name, step, [str(sample)])
        atomic_write_bytes(store.final_path(), b"final weights")
        return self._end(
            folder, callbacks, name, RunState.FINISHED, step, "finished", final=str(store.final_path())
        )

    @staticmethod
    def _end(folder, callbacks, name, state, step, message, final=None):
        folder.set_status(state.value, message, step=step)
        callbacks.on_state(name, state, message)
        return FakeResult(state, final, step, message)


def _png_bytes(step: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (step % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()
