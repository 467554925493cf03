"""The bridge from training events to the browser: a :class:`Callbacks` that sends websocket messages.

Messages (``data`` of each; ``run`` is the run name):

- ``finetune.progress``: run, step, total, loss, lr, samples_per_s, eta_s, epoch — at most
  ``max_per_s`` a second per run; the last one before a state change is always delivered.
- ``finetune.sample``: run, step, urls (``/finetune/runs/<run>/samples/<file>``).
- ``finetune.state``: run, state, message.
- ``finetune.checkpoint``: run, step, file (the name the *Load LoRA* drop-down shows).
- ``finetune.error``: run, message — when a run fails.

Imports nothing from ComfyUI: the ``send`` function is given (``host.send_event`` in ComfyUI).
"""

from __future__ import annotations

import math
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..trainer.engine.events import Callbacks, Progress, RunState

Send = Callable[[str, dict], None]


def sample_url(run: str, file: str) -> str:
    """The HTTP path that serves one validation render (see nodes/routes.py)."""
    return f"/finetune/runs/{urllib.parse.quote(run, safe='')}/samples/{urllib.parse.quote(file, safe='')}"


def finite_or_none(value: Any) -> Any:
    """NaN and infinities become None: browsers' JSON.parse rejects Python's ``NaN``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class WebsocketProgress(Callbacks):
    """Forward run events to ``send(event, data)``, throttling progress per run.

    Args:
        send: delivers one websocket message; must be safe to call from any thread.
        max_per_s: progress messages per second per run (others are dropped, the newest kept
            for delivery before the next state change).
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(self, send: Send, *, max_per_s: float = 4.0, clock: Callable[[], float] = time.monotonic):
        if max_per_s <= 0:
            raise ValueError(f"max_per_s must be above 0 (got {max_per_s})")
        self._send = send
        self._interval = 1.0 / max_per_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_sent: dict[str, float] = {}
        self._held: dict[str, Progress] = {}

    def on_progress(self, progress: Progress) -> None:
        now = self._clock()
        with self._lock:
            last = self._last_sent.get(progress.run)
            if last is not None and now - last < self._interval:
                self._held[progress.run] = progress
                return
            self._last_sent[progress.run] = now
            self._held.pop(progress.run, None)
        self._send_progress(progress)

    def on_state(self, run: str, state: RunState, message: str = "") -> None:
        with self._lock:
            held = self._held.pop(run, None)
        if held is not None:
            self._send_progress(held)
        state = RunState(state)
        self._send("finetune.state", {"run": run, "state": state.value, "message": message})
        if state == RunState.FAILED:
            self._send("finetune.error", {"run": run, "message": message})
        if not state.is_active:
            with self._lock:
                self._last_sent.pop(run, None)

    def on_sample(self, run: str, step: int, paths: list[str]) -> None:
        urls = [sample_url(run, Path(p).name) for p in paths]
        self._send("finetune.sample", {"run": run, "step": step, "urls": urls})

    def on_checkpoint(self, run: str, step: int, path: str) -> None:
        self._send("finetune.checkpoint", {"run": run, "step": step, "file": Path(path).name})

    def _send_progress(self, p: Progress) -> None:
        data = {
            "run": p.run,
            "step": p.step,
            "total": p.total_steps,
            "loss": finite_or_none(p.loss),
            "lr": finite_or_none(p.lr),
            "samples_per_s": finite_or_none(p.samples_per_s),
            "eta_s": finite_or_none(p.eta_s),
            "epoch": p.epoch,
        }
        self._send("finetune.progress", data)
