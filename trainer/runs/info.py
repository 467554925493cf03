"""What the run manager tells its callers about a run: handles, snapshots and errors.

Everything here is plain data built from memory (a live run) or from a run folder on disk (a run
from an earlier session), so the HTTP routes, the nodes and the tests all see the same shape.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..engine.events import Progress, RunState
from ..runfolder import RunFolder

# How much of metrics.jsonl's tail is read to find the newest row (rows are ~150 bytes).
_TAIL_BYTES = 8192


class RunNotFound(KeyError):
    """No run of that name in the runs folder. ``str()`` is the user-facing message."""

    def __init__(self, name: str, runs_root: str | os.PathLike):
        super().__init__(name)
        self.name = name
        self.message = f"no run named {name!r} in {str(runs_root)!r}; GET /finetune/runs lists the runs"

    def __str__(self) -> str:
        return self.message


class RunStateError(ValueError):
    """An action that the run's current state does not allow (pausing a finished run...)."""


@dataclass(frozen=True)
class RunHandle:
    """What a *Train* node returns (the ``FT_RUN`` value): which run, where, and what submit did.

    Attributes:
        name: the sanitised run name (the folder's name).
        folder: the run folder, ``<output>/finetune/<name>``.
        already_running: True when submit found the run queued or running and returned it
            instead of starting a second copy.
        note: one sentence for the UI: "queued", "already running", "resuming from step 800"...
    """

    name: str
    folder: str
    already_running: bool = False
    note: str = ""

    @property
    def run_folder(self) -> RunFolder:
        return RunFolder(Path(self.folder))

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_folder.checkpoints_dir


@dataclass
class RunInfo:
    """A snapshot of one run.

    Attributes:
        name: run (folder) name.
        state: a :class:`RunState` value ("queued", "running", ...).
        step: last optimizer step reported (0 before the first).
        total: planned total steps (0 when not known yet).
        loss, lr, samples_per_s, eta_s, epoch: from the last progress report or metrics row.
        message: why the run is in its state ("out of GPU memory at step 12 ...").
        latest_sample: file name of the newest validation render in ``samples/`` (or None).
        folder: the run folder.
        external: True when another live process (a CLI run) writes this run; read-only here.
        config, plan: run.json's ``config`` and ``plan`` (left out of listings).
    """

    name: str
    state: str
    step: int = 0
    total: int = 0
    loss: float | None = None
    lr: float | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None
    epoch: int | None = None
    message: str = ""
    latest_sample: str | None = None
    folder: str = ""
    external: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, *, detail: bool = True) -> dict[str, Any]:
        """JSON-ready dict; ``detail=False`` leaves out config and plan (for listings)."""
        data = asdict(self)
        if not detail:
            data.pop("config")
            data.pop("plan")
        return data

    def apply_progress(self, progress: Progress) -> None:
        self.step = progress.step
        self.total = progress.total_steps or self.total
        self.loss = progress.loss
        self.lr = progress.lr
        self.samples_per_s = progress.samples_per_s
        self.eta_s = progress.eta_s
        self.epoch = progress.epoch

    def apply_metrics_row(self, row: dict[str, Any]) -> None:
        self.step = int(row.get("step", self.step) or 0)
        for key in ("loss", "lr", "samples_per_s", "epoch"):
            if key in row:
                setattr(self, key, row[key])


def plan_total(plan: dict[str, Any]) -> int:
    """The planned total step count from run.json's ``plan`` (0 when it has none yet)."""
    for key in ("total_steps", "total"):
        value = plan.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def last_metrics_row(path: str | os.PathLike) -> dict[str, Any] | None:
    """The newest complete row of a metrics.jsonl, reading only the file's tail (runs get long)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
    except FileNotFoundError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a torn last line, or the first line cut by the seek
        if isinstance(row, dict):
            return row
    return None


def info_from_folder(folder: RunFolder, data: dict[str, Any] | None = None) -> RunInfo:
    """A :class:`RunInfo` built from the files of a run folder alone.

    Args:
        folder: the run folder.
        data: run.json already read (saves a second read), else it is read here.
    """
    data = folder.read() if data is None else data
    status = data.get("status") or {}
    plan = data.get("plan") or {}
    state = status.get("state") or RunState.QUEUED.value
    info = RunInfo(
        name=folder.name,
        state=str(state),
        message=str(status.get("message") or ""),
        folder=str(folder.path),
        config=data.get("config") or {},
        plan=plan,
        total=plan_total(plan) or int(status.get("total") or 0),
    )
    row = last_metrics_row(folder.metrics_path)
    if row is not None:
        info.apply_metrics_row(row)
    elif isinstance(status.get("step"), int):
        info.step = status["step"]
    sample = folder.latest_sample()
    info.latest_sample = sample.name if sample else None
    return info
