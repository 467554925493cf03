"""The run manager: a FIFO queue of training runs and one worker thread per device.

It knows nothing about ComfyUI. A host (the ComfyUI extension, a test, a CLI) creates ONE
:class:`RunManager` for an output folder, submits :class:`~trainer.config.TrainConfig` objects, and
controls runs by name. Each run is a folder (see :mod:`trainer.runfolder`); the manager keeps the
state of this session's runs in memory and mirrors what it decides into ``run.json``, so a run
seen by a later session (after a crash or restart) shows as ``interrupted`` and resumes with one
call to :meth:`RunManager.resume`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..engine.events import Callbacks, Commands, FanOutCallbacks, HostHooks, Progress, RunState
from ..options import ConfigError, to_dict
from ..runfolder import RunFolder, RunPathError, list_runs, runs_root, sanitize_run_name
from .folder_state import (
    config_changes,
    harmless_changes,
    has_resume_point,
    mark_interrupted,
    resume_refusal,
    state_of,
)
from .info import RunHandle, RunInfo, RunNotFound, RunStateError, info_from_folder
from .queries import open_run

log = logging.getLogger("finetune")

#: ``train_fn(config, *, callbacks, commands, host, resume, device) -> RunResult`` (trainer.engine.loop.train).
TrainFn = Callable[..., Any]


def _ordered_events(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a state-changing method under the manager's event lock (see ``RunManager._events``)."""

    @functools.wraps(method)
    def wrapper(self: RunManager, *args: Any, **kwargs: Any) -> Any:
        with self._events:
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class _Run:
    """This session's bookkeeping for one submitted run (guarded by the manager's lock)."""

    name: str
    folder: RunFolder
    config: TrainConfig
    resume: bool
    state: RunState = RunState.QUEUED
    message: str = ""
    commands: Commands = field(default_factory=Commands)
    progress: Progress | None = None
    device: str | None = None
    # Loads the model for a host that already holds it (ComfyUI's MODEL); None loads config.base_model.
    model_loader: Callable[[TrainConfig], Any] | None = None


class RunManager:
    """Queue, run and control training runs in background threads.

    Args:
        output_dir: the parent of the runs folder; runs live in ``<output_dir>/finetune/<name>``.
        host: hooks into the host application (free GPU memory, busy check), passed to every run.
        train_fn: the training entry point, ``train(config, *, callbacks, commands, host, resume,
            device) -> RunResult``; default ``trainer.engine.loop.train``, imported on first use.
        devices: one worker thread per entry; "default" lets the engine pick its device.

    Raises:
        ValueError: ``devices`` empty or with duplicates.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        host: HostHooks | None = None,
        train_fn: TrainFn | None = None,
        devices: Iterable[str] = ("default",),
    ):
        devices = tuple(devices)
        if not devices or len(set(devices)) != len(devices):
            raise ValueError(
                f"devices must name each device once, e.g. ('cuda:0', 'cuda:1'); got {devices!r}"
            )
        self.output_dir = Path(output_dir)
        self.runs_root = runs_root(output_dir)
        self._host = host or HostHooks()
        self._train_fn = train_fn
        self._lock = threading.RLock()
        # Held from a state change until its listeners have heard of it (taken before _lock), so
        # they hear changes in the order they happened: never "stopping" after "stopped".
        self._events = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._runs: dict[str, _Run] = {}
        self._queue: deque[str] = deque()
        self._listeners: list[Callbacks] = []
        self._closed = False
        self.recovered = mark_interrupted(self.output_dir)
        self._workers = [
            threading.Thread(target=self._work, args=(device,), name=f"finetune-{device}", daemon=True)
            for device in devices
        ]
        for worker in self._workers:
            worker.start()

    # Listeners -----------------------------------------------------------------------------------

    def add_listener(self, callbacks: Callbacks) -> None:
        """Receive every run's state, progress, sample and checkpoint events (from worker threads)."""
        with self._lock:
            if callbacks not in self._listeners:
                self._listeners.append(callbacks)

    def remove_listener(self, callbacks: Callbacks) -> None:
        with self._lock:
            if callbacks in self._listeners:
                self._listeners.remove(callbacks)

    def _fan_out(self) -> FanOutCallbacks:
        with self._lock:
            return FanOutCallbacks(*self._listeners)

    # Submitting ----------------------------------------------------------------------------------

    @_ordered_events
    def submit(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        model_loader: Callable[[TrainConfig], Any] | None = None,
    ) -> RunHandle:
        """Queue a run, or return the one already queued or running under that name.

        The run name is sanitised (it becomes the folder name) and ``output_dir`` is set to the
        manager's. When the folder already holds a run with the same settings, a finished one is
        returned as is (nothing is retrained) and a stopped, failed or interrupted one resumes
        from its last checkpoint.

        Args:
            config: the run.
            resume: continue from the run's last saved state (when it has one).
            model_loader: gives the engine the model to train (``train``'s ``model_loader``), for a
                host that already holds it; kept for this session's later resumes of the run.

        Returns:
            The run's handle; ``already_running`` is True when no new run was queued because one
            with that name is queued, running or paused.

        Raises:
            RunStateError: the folder holds a run with different settings, or the manager is shut down.
            RunPathError: the run name has no usable characters.
        """
        if not isinstance(config, TrainConfig):
            raise TypeError(f"submit() takes a TrainConfig, got {type(config).__name__}")
        name = sanitize_run_name(config.run_name)
        config = dataclasses.replace(config, run_name=name, output_dir=str(self.output_dir))
        folder = RunFolder(self.runs_root / name)
        with self._lock:
            if self._closed:
                raise RunStateError("the run manager is shut down; restart ComfyUI to train again")
            current = self._runs.get(name)
            if current is not None and current.state.is_active:
                return RunHandle(
                    name,
                    str(folder.path),
                    already_running=True,
                    note=f"already {current.state.value}; not started twice",
                )
            data = folder.read()
            status = data.get("status") or {}
            disk_state = state_of(status)
            if current is None and disk_state is not None and disk_state.is_active:
                raise RunStateError(
                    f"run {name!r} is {status.get('state')} in another process (pid {status.get('pid')}); "
                    "wait for it to end or choose another run_name"
                )
            if isinstance(data.get("config"), dict) and resume and has_resume_point(folder):
                # Checked before anything is written: a refused resume leaves run.json as it was.
                changes = config_changes(data["config"], config)
                if changes:
                    raise RunStateError(resume_refusal(name, changes))
                harmless = harmless_changes(data["config"], config)
                if harmless:
                    log.warning(
                        "finetune: run %s resumes with changed settings that do not change what it learns: %s",
                        name,
                        "; ".join(harmless),
                    )
            if isinstance(data.get("config"), dict) and not resume:
                changes = config_changes(data["config"], config)
                if changes:
                    raise RunStateError(
                        f"run {name!r} already exists in {str(folder.path)!r} with different settings "
                        f"({'; '.join(changes[:4])}). Choose another run_name, or delete that folder to start over."
                    )
                if disk_state == RunState.FINISHED:
                    step = status.get("step", "?")
                    return RunHandle(
                        name,
                        str(folder.path),
                        note=f"already finished at step {step}; change run_name to train again",
                    )
                resume = True
            resume = resume and has_resume_point(folder)
            note = self._enqueue(name, folder, config, resume=resume, model_loader=model_loader)
        self._emit_state(name, RunState.QUEUED, note)
        return RunHandle(name, str(folder.path), note=note)

    def _enqueue(
        self,
        name: str,
        folder: RunFolder,
        config: TrainConfig,
        *,
        resume: bool,
        model_loader: Callable[[TrainConfig], Any] | None = None,
    ) -> str:
        """Create the folder, write run.json and queue the run. Caller holds the lock."""
        busy = sum(1 for r in self._runs.values() if r.state.is_active and r.state != RunState.QUEUED)
        ahead = len(self._queue) + max(0, busy - len(self._workers) + 1)
        note = "queued" if ahead == 0 else f"queued behind {ahead} run(s)"
        if resume:
            note += ", resuming from its last checkpoint"
        folder.create()
        folder.update(config=to_dict(config))
        folder.set_status(RunState.QUEUED.value, note)
        previous = self._runs.get(name)
        if model_loader is None and previous is not None:
            model_loader = previous.model_loader  # resuming a run of this session keeps its model
        self._runs[name] = _Run(
            name=name, folder=folder, config=config, resume=resume, message=note, model_loader=model_loader
        )
        self._queue.append(name)
        self._changed.notify_all()
        return note

    # Control -------------------------------------------------------------------------------------

    @_ordered_events
    def stop(self, name: str) -> RunInfo:
        """Stop a run after its current step, keeping every checkpoint it saved; a queued run
        leaves the queue.

        Raises:
            RunNotFound: no such run.
            RunStateError: the run is not queued, running or paused.
        """
        event = None
        with self._lock:
            run = self._live_run(name, action="stop")
            if run.state == RunState.QUEUED:
                self._queue.remove(run.name)
                event = self._user_state(run, RunState.STOPPED, "stopped before it started")
            elif run.state != RunState.STOPPING:
                run.commands.stop()
                event = self._user_state(
                    run, RunState.STOPPING, "stopping after the current step; saved checkpoints are kept"
                )
        if event:
            self._emit_state(*event)
        return self.get(name)

    @_ordered_events
    def pause(self, name: str) -> RunInfo:
        """Pause a running run between two steps (it keeps its GPU memory).

        Raises:
            RunNotFound: no such run.
            RunStateError: the run is not running.
        """
        with self._lock:
            run = self._live_run(name, action="pause")
            if run.state in (RunState.QUEUED, RunState.STOPPING):
                raise RunStateError(f"run {name!r} is {run.state.value}; only a running run can be paused")
            run.commands.pause()
            event = self._user_state(run, RunState.PAUSED, "paused; resume to continue")
        if event:
            self._emit_state(*event)
        return self.get(name)

    @_ordered_events
    def resume(self, name: str) -> RunInfo:
        """Continue a run with one action: a paused run goes on; an interrupted, stopped or failed
        run is queued again and continues from its last checkpoint (from the start if none).

        Raises:
            RunNotFound: no such run.
            RunStateError: the run is finished, stopping, or owned by another process.
        """
        event = None
        with self._lock:
            run = self._runs.get(name)
            live = run is not None and run.state.is_active
            if live and run.state == RunState.STOPPING:
                raise RunStateError(f"run {name!r} is stopping; resume it once it has stopped")
            if live and run.state == RunState.PAUSED:
                run.commands.resume()
                event = self._user_state(run, RunState.RUNNING, "resumed")
        if live:  # queued or running: nothing to do
            if event:
                self._emit_state(*event)
            return self.get(name)
        with self._lock:
            folder = self._folder(name)
            data = folder.read()
            state = state_of(data.get("status") or {})
            if state == RunState.FINISHED:
                raise RunStateError(f"run {name!r} has finished; there is nothing to resume")
            if state is not None and state.is_active:
                raise RunStateError(f"run {name!r} is {state.value} in another process; control it there")
            try:
                config = TrainConfig.from_dict(data.get("config") or {})
            except ConfigError as e:
                raise RunStateError(
                    f"run {name!r} cannot be resumed: its run.json config is invalid ({e})"
                ) from None
            config = dataclasses.replace(config, run_name=folder.name, output_dir=str(self.output_dir))
            note = self._enqueue(folder.name, folder, config, resume=has_resume_point(folder))
        self._emit_state(folder.name, RunState.QUEUED, note)
        return self.get(name)

    def _live_run(self, name: str, *, action: str) -> _Run:
        run = self._runs.get(name)
        if run is not None and run.state.is_active:
            return run
        info = self.get(name)  # raises RunNotFound for an unknown name
        where = " in another process" if info.external else ""
        raise RunStateError(f"run {name!r} is {info.state}{where}; cannot {action} it")

    # Reading -------------------------------------------------------------------------------------

    def get(self, name: str) -> RunInfo:
        """A snapshot of one run: live values for this session's runs, run folder files otherwise.

        Raises:
            RunNotFound: no run of that name.
            RunPathError: the name would leave the runs folder.
        """
        folder = self._folder(name)
        info = info_from_folder(folder)
        with self._lock:
            run = self._runs.get(folder.name)
            if run is not None:
                info.state = run.state.value
                info.message = run.message
                if run.progress is not None and run.progress.step >= info.step:
                    info.apply_progress(run.progress)
            else:
                state = state_of({"state": info.state})
                info.external = state is not None and state.is_active
        return info

    def list(self) -> list[RunInfo]:
        """Every run in the runs folder, by name."""
        names = {folder.name for folder in list_runs(self.output_dir)}
        with self._lock:
            names.update(self._runs)
        infos = []
        for name in sorted(names):
            try:
                infos.append(self.get(name))
            except RunNotFound:
                continue  # deleted while listing
            except RunPathError as e:
                log.warning("finetune: run folder %s is not listed: %s", name, e)
        return infos

    def metrics(self, name: str, since: int = 0) -> list[dict[str, Any]]:
        """metrics.jsonl rows with step > ``since``."""
        return self._folder(name).read_metrics(since)

    def wait(self, name: str, timeout: float | None = None) -> RunInfo:
        """Block until the run is no longer queued/running/paused/stopping (or ``timeout`` passes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while (run := self._runs.get(name)) is not None and run.state.is_active:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._changed.wait(left)
        return self.get(name)

    def _folder(self, name: str) -> RunFolder:
        return open_run(self.runs_root, name)

    # Shutdown ------------------------------------------------------------------------------------

    def shutdown(self, *, timeout: float = 30.0, reason: str = "the run manager shut down") -> list[str]:
        """Stop running runs after their current step (each saves a checkpoint and its resume
        state there), leave queued ones for a later resume, and wait up to ``timeout`` seconds
        for the workers.

        Args:
            timeout: seconds to wait for the runs to save and end.
            reason: what the stopped runs' messages say stopped them.

        Returns:
            The names of the runs that were asked to stop.
        """
        with self._lock:
            self._closed = True
            self._queue.clear()
            stopping = []
            for run in self._runs.values():
                if run.state in (RunState.RUNNING, RunState.PAUSED, RunState.STOPPING):
                    run.commands.stop(reason)
                    stopping.append(run.name)
            self._changed.notify_all()
        if stopping:
            log.info(
                "finetune: %s: stopping after the current step and saving (waiting up to %.0f s)",
                ", ".join(stopping),
                timeout,
            )
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        return stopping

    # Workers -------------------------------------------------------------------------------------

    def _work(self, device: str) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
            with self._events:
                with self._lock:
                    if self._closed or not self._queue:
                        continue  # another worker took it, or it was stopped meanwhile
                    run = self._runs[self._queue.popleft()]
                    run.device = device
                    changed = self._set_state(run, RunState.RUNNING, f"starting on {device}")
                if changed:
                    self._emit_state(run.name, RunState.RUNNING, run.message)
            state, message = self._train(run, device)
            with self._events:
                with self._lock:
                    changed = self._set_state(run, state, message, mirror=True, force=True)
                if changed:
                    self._emit_state(run.name, state, message)

    def _train(self, run: _Run, device: str) -> tuple[RunState, str]:
        """Run one training to its end; never raises (a crash becomes a failed state)."""
        try:
            train_fn = self._train_fn or _default_train_fn()
            extra = {"model_loader": run.model_loader} if run.model_loader is not None else {}
            result = train_fn(
                run.config,
                callbacks=_RunCallbacks(self, run),
                commands=run.commands,
                host=self._host,
                resume=run.resume,
                device=None if device == "default" else device,
                **extra,
            )
        except Exception as e:  # the engine returns on failure; reaching here is a bug or a missing module
            log.exception("finetune: run %s crashed", run.name)
            return RunState.FAILED, f"the trainer crashed: {type(e).__name__}: {e}"
        state = state_of({"state": getattr(result, "state", None)})
        message = str(getattr(result, "message", "") or "")
        if state is None or state.is_active:
            return (
                RunState.FAILED,
                f"the trainer returned an unexpected state {getattr(result, 'state', None)!r}. {message}".strip(),
            )
        return state, message

    # State changes (call with the lock held; emit after releasing it) ---------------------------

    def _set_state(
        self, run: _Run, state: RunState, message: str, *, mirror: bool = False, force: bool = False
    ) -> bool:
        """Record a state; mirror it in run.json when the engine does not write it itself.

        Returns:
            True when state or message changed (listeners should hear about it).
        """
        if not force and not run.state.is_active:
            return False  # a late event from a run that has already ended
        changed = (run.state, run.message) != (state, message)
        run.state, run.message = state, message
        if mirror:
            current = run.folder.read().get("status") or {}
            if (current.get("state"), current.get("message")) != (state.value, message):
                extra = {"step": run.progress.step} if run.progress is not None else {}
                run.folder.set_status(state.value, message, **extra)
        self._changed.notify_all()
        return changed

    def _user_state(self, run: _Run, state: RunState, message: str) -> tuple[str, RunState, str] | None:
        """Record a state the user asked for and mirror it in run.json. Caller holds the lock.

        Returns:
            The event to emit once the lock is released, or None when nothing changed.
        """
        return (run.name, state, message) if self._set_state(run, state, message, mirror=True) else None

    def _emit_state(self, name: str, state: RunState, message: str) -> None:
        self._fan_out().on_state(name, state, message)

    @_ordered_events
    def _on_engine_state(self, run: _Run, state: Any, message: str) -> None:
        coerced = state_of({"state": state})
        if coerced is None:
            log.warning("finetune: run %s reported an unknown state %r; ignored", run.name, state)
            return
        with self._lock:
            # The user's stop or pause wins over the engine saying "running" (it does after a
            # host-busy wait) or "paused" (while it winds down to stop).
            if coerced in (RunState.RUNNING, RunState.PAUSED) and run.commands.stop_requested:
                coerced, message = RunState.STOPPING, run.message
            elif coerced == RunState.RUNNING and run.commands.paused:
                coerced, message = RunState.PAUSED, run.message
            changed = self._set_state(run, coerced, message)
        if changed:
            self._emit_state(run.name, coerced, message)

    def _on_engine_progress(self, run: _Run, progress: Progress) -> None:
        with self._lock:
            run.progress = progress
        self._fan_out().on_progress(progress)


class _RunCallbacks(Callbacks):
    """What the engine calls for one run; the manager records it and passes it to its listeners."""

    def __init__(self, manager: RunManager, run: _Run):
        self._manager = manager
        self._run = run

    def on_state(self, run: str, state: RunState, message: str = "") -> None:
        self._manager._on_engine_state(self._run, state, message)

    def on_progress(self, progress: Progress) -> None:
        self._manager._on_engine_progress(self._run, progress)

    def on_sample(self, run: str, step: int, paths: list[str]) -> None:
        self._manager._fan_out().on_sample(self._run.name, step, list(paths))

    def on_checkpoint(self, run: str, step: int, path: str) -> None:
        self._manager._fan_out().on_checkpoint(self._run.name, step, str(path))


def _default_train_fn() -> TrainFn:
    from ..engine.loop import train  # heavy (torch, diffusers): imported when the first run starts

    return train
