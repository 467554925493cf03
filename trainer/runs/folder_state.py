"""Decisions read from a run folder's files: is it the same run, can it resume, does another
process train it, and marking the runs a dead process left "running" as interrupted.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ..checkpoints import CheckpointStore
from ..config import TrainConfig
from ..engine.events import RunState
from ..options import ConfigError, to_dict
from ..runfolder import RunFolder, list_runs

log = logging.getLogger("finetune")

# Settings that may change between a run and its resumption without making it a different run.
_RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "pause_while_host_busy",
        "dataloader_workers",
        "compile",
        "keep_checkpoints",
        "validation_prompts",
        "validation_negative_prompt",
        "validation_every",
        "validation_at_start",
        "validation_seed",
        "validation_steps",
        "validation_guidance",
        "validation_width",
        "validation_height",
    }
)
# A run.json written by another process less than this many seconds ago belongs to a live run.
_HEARTBEAT_S = 300.0


def state_of(status: dict[str, Any]) -> RunState | None:
    """The RunState of a run.json ``status`` (None when missing or unknown)."""
    try:
        return RunState(status.get("state"))
    except ValueError:
        return None


def config_changes(stored: dict[str, Any], config: TrainConfig) -> list[str]:
    """What differs between a run folder's stored config and a new one, ignoring settings that
    may change on resume (validation, workers...).

    Returns:
        Lines like ``"learning_rate 0.0001 -> 0.0002"``; empty when they are the same run.
    """
    try:
        old = to_dict(TrainConfig.from_dict(stored))
    except ConfigError as e:
        return [f"the stored config is not readable ({e})"]
    new = to_dict(config)
    return [
        f"{key} {_short(old.get(key))} -> {_short(new.get(key))}"
        for key in new
        if key not in _RESUMABLE_CHANGES and key != "run_name" and old.get(key) != new.get(key)
    ]


def harmless_changes(stored: dict[str, Any], config: TrainConfig) -> list[str]:
    """The settings that differ but may change on resume (validation, workers...), as
    ``"key old -> new"`` lines; empty when the stored config is unreadable."""
    try:
        old = to_dict(TrainConfig.from_dict(stored))
    except ConfigError:
        return []
    new = to_dict(config)
    return [
        f"{key} {_short(old.get(key))} -> {_short(new.get(key))}"
        for key in sorted(_RESUMABLE_CHANGES - {"output_dir"})
        if old.get(key) != new.get(key)
    ]


def resume_refusal(name: str, changes: list[str]) -> str:
    """The sentence refusing to resume run ``name`` with settings that change what it learns."""
    return (
        f"run {name!r} cannot resume with changed settings ({'; '.join(changes[:6])}): they change what "
        "the run learns from its saved state. Resume with the recorded settings (train <run>/run.json "
        "--resume), or choose another run_name to train with the new ones."
    )


def has_resume_point(folder: RunFolder) -> bool:
    """True when the run saved something to continue from: resume state or a step checkpoint."""
    state_dir = folder.state_dir
    if state_dir.is_dir() and any(not p.name.startswith(".") for p in state_dir.iterdir()):
        return True
    return CheckpointStore(folder.path, folder.name).latest(include_final=False) is not None


def alive_elsewhere(status: dict[str, Any]) -> bool:
    """True when run.json was written recently by another process that still exists (a CLI run)."""
    pid = status.get("pid")
    updated = status.get("updated_at")
    if not isinstance(pid, int) or pid == os.getpid() or not isinstance(updated, (int, float)):
        return False
    if time.time() - updated > _HEARTBEAT_S:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def mark_interrupted(output_dir: str | os.PathLike) -> list[str]:
    """Mark runs that run.json calls queued/running/paused/stopping, but that no live process
    trains, as interrupted (resumable), with a message saying where they stopped.

    Returns:
        The names of the runs marked interrupted.
    """
    marked = []
    for folder in list_runs(output_dir):
        status = folder.read().get("status") or {}
        state = state_of(status)
        if state is None or not state.is_active or alive_elsewhere(status):
            continue
        step = status.get("step")
        at = f" at step {step}" if isinstance(step, int) else ""
        message = f"ComfyUI stopped while this run was {state.value}{at}; resume it to continue from its last checkpoint"
        folder.set_status(RunState.INTERRUPTED.value, message)
        log.info(
            "finetune: run %s was %s in an earlier session; marked interrupted", folder.name, state.value
        )
        marked.append(folder.name)
    return marked


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
