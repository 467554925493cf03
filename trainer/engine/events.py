"""How a running trainer talks to whoever hosts it (CLI, run manager, ComfyUI) without knowing them.

The trainer is built from (config, callbacks, commands, host), as in OneTrainer: callbacks receive
what happened, commands are flags checked once per step, and host hooks let a host (ComfyUI) free
memory or ask the trainer to wait. A callback that raises is logged and never kills the run.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

log = logging.getLogger("finetune")


class RunState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    FINISHED = "finished"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # the process died mid-run; resumable from its last checkpoint
    STOPPED = "stopped"  # stopped by the user; resumable too

    @property
    def is_active(self) -> bool:
        return self in (RunState.QUEUED, RunState.RUNNING, RunState.PAUSED, RunState.STOPPING)


@dataclass
class Progress:
    run: str
    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    samples_per_s: float
    eta_s: float | None
    peak_vram_bytes: int = 0


class Callbacks:
    """Override what you need; the defaults do nothing."""

    def on_state(self, run: str, state: RunState, message: str = "") -> None: ...

    def on_progress(self, progress: Progress) -> None: ...

    def on_sample(self, run: str, step: int, paths: list[str]) -> None: ...

    def on_checkpoint(self, run: str, step: int, path: str) -> None: ...


class FanOutCallbacks(Callbacks):
    """Calls several listeners; one that raises is logged and the others still run."""

    def __init__(self, *listeners: Callbacks):
        self.listeners = [cb for cb in listeners if cb is not None]

    def _call(self, name: str, *args: Any) -> None:
        for cb in self.listeners:
            try:
                getattr(cb, name)(*args)
            except Exception:
                log.exception("finetune: a %s listener failed; the run goes on", name)

    def on_state(self, run, state, message=""):
        self._call("on_state", run, state, message)

    def on_progress(self, progress):
        self._call("on_progress", progress)

    def on_sample(self, run, step, paths):
        self._call("on_sample", run, step, paths)

    def on_checkpoint(self, run, step, path):
        self._call("on_checkpoint", run, step, path)


@dataclass
class Commands:
    """Thread-safe flags the training loop checks between steps."""

    _stop: threading.Event = field(default_factory=threading.Event)
    _resume: threading.Event = field(default_factory=lambda: _set(threading.Event()))
    _stop_reason: str = ""

    def stop(self, reason: str = "") -> None:
        """Ask the run to stop after its current step.

        Args:
            reason: what the run's message says stopped it ("" for the user); the first
                request's reason is kept.
        """
        if not self._stop.is_set():
            self._stop_reason = reason
        self._stop.set()
        self._resume.set()  # a paused run must wake up to stop

    def pause(self) -> None:
        self._resume.clear()

    def resume(self) -> None:
        self._resume.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def stop_reason(self) -> str:
        return self._stop_reason

    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    def wait_while_paused(self, timeout: float | None = None) -> bool:
        """Block while paused; returns False if still paused after ``timeout``."""
        return self._resume.wait(timeout)


def _set(event: threading.Event) -> threading.Event:
    event.set()
    return event


class HostHooks:
    """What a host can do for the trainer. The defaults are those of a standalone process."""

    def free_memory(self) -> None:
        """Ask the host to release the GPU memory it holds (before the trainer loads models)."""

    def reserve(self, nbytes: int) -> None:
        """Ask the host to leave ``nbytes`` of GPU memory free for the trainer (0 = nothing).

        Only what the trainer is about to take counts: the cached blocks its steps reuse, and the
        growth back to its working set after it lent memory. What it holds is already gone from
        the free memory the host sees."""

    def make_room(self, nbytes: int, keep: tuple = ()) -> bool:
        """Ask the host to free ``nbytes`` of GPU memory for the trainer, unloading its own models
        if it must, but not those in ``keep`` (the host's models the run trains on). False when it
        cannot now (it is running work); the trainer waits and asks again.

        Called when a run that lent its memory to the host's prompts takes it back."""
        return True

    def is_busy(self) -> bool:
        """True while the host is executing work the trainer should yield the GPU to."""
        return False

    def free_vram(self, device: Any) -> int | None:
        """GPU bytes free for the trainer on ``device`` as the host sees them (after
        ``free_memory``, less what the host keeps for itself); None lets the trainer ask the driver."""
        return None
