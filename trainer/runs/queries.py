"""Read-only questions about run folders, answered safely: which run, which sample, which checkpoint.

The HTTP routes are thin wrappers around these functions. Every user-given name goes through
:func:`trainer.runfolder.resolve_inside`, so '..', absolute paths and symlinks that leave the runs
folder are refused with :class:`~trainer.runfolder.RunPathError` naming the value.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from ..checkpoints import list_checkpoints
from ..runfolder import RunFolder, RunPathError, resolve_inside
from .info import RunNotFound

_SAMPLE_NAME = re.compile(r"^step(\d+)-(\d+)\.png$")


def open_run(runs_root: str | os.PathLike, name: str) -> RunFolder:
    """The folder of run ``name``, checked to be a direct child of ``runs_root`` with a run.json.

    Raises:
        RunPathError: the name has a separator, '..', or resolves outside the runs folder.
        RunNotFound: no run of that name.
    """
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise RunPathError(f"run name {name!r} must be a plain folder name (no '/', '\\\\' or '..')")
    path = resolve_inside(runs_root, name)
    if path.parent != Path(runs_root).resolve():
        raise RunPathError(f"run name {name!r} points outside the runs folder (through a symlink?)")
    folder = RunFolder(path)
    if not folder.exists():
        raise RunNotFound(name, runs_root)
    return folder


def list_samples(folder: RunFolder) -> list[dict[str, Any]]:
    """The run's validation renders, oldest first: ``[{"file", "step", "index"}]``."""
    out = []
    for path in folder.samples():
        match = _SAMPLE_NAME.match(path.name)
        step, index = (int(match.group(1)), int(match.group(2))) if match else (None, None)
        out.append({"file": path.name, "step": step, "index": index})
    return out


def sample_file(runs_root: str | os.PathLike, name: str, file: str) -> Path:
    """The path of one validation render, for serving.

    Raises:
        RunPathError: ``file`` is not a plain .png name, or resolves outside the run's samples folder.
        RunNotFound: no such run.
        FileNotFoundError: no such sample (message names it).
    """
    folder = open_run(runs_root, name)
    if not file or "/" in file or "\\" in file or not file.lower().endswith(".png"):
        raise RunPathError(f"sample {file!r} must be a .png file name from GET /finetune/runs/{name}/samples")
    path = resolve_inside(runs_root, f"{folder.name}/samples/{file}")
    if path.parent != folder.samples_dir.resolve():
        raise RunPathError(f"sample {file!r} points outside the run's samples folder (through a symlink?)")
    if not path.is_file():
        raise FileNotFoundError(f"run {name!r} has no sample {file!r}")
    return path


def list_run_checkpoints(folder: RunFolder) -> list[dict[str, Any]]:
    """The run's checkpoints, oldest step first and the final one last.

    Returns:
        ``[{"file", "label", "kind", "step", "size"}]``; ``file`` is the name ComfyUI's loaders
        list (the run's checkpoints folder is registered as a model folder).
    """
    if not folder.checkpoints_dir.is_dir():
        return []
    out = []
    for info in list_checkpoints(folder.checkpoints_dir):
        if info.path is None:
            continue
        try:
            size = info.path.stat().st_size if info.path.is_file() else None
        except FileNotFoundError:  # pruned while listing
            continue
        out.append(
            {"file": info.path.name, "label": info.label, "kind": info.kind, "step": info.step, "size": size}
        )
    return out


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, recursively: browsers' JSON.parse
    rejects the ``NaN`` that Python's json writes (a run that failed on a NaN loss logs one)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
