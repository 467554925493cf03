"""A run is a folder: ``<output>/finetune/<run-name>/`` with run.json, metrics.jsonl, samples/,
checkpoints/ and state/. This module owns its layout, its atomic writes and its path safety.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNS_SUBDIR = "finetune"
RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
_NAME_MAX = 64


class RunPathError(ValueError):
    """A run name or a file inside a run that would leave the runs folder."""


def runs_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / RUNS_SUBDIR


def sanitize_run_name(name: str) -> str:
    """Turn any user text into a safe folder name: ASCII letters, digits, '-', '_' and '.'.

    "My LoRA / v2" becomes "My-LoRA-v2". Raises RunPathError when nothing usable is left.
    """
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    text = text[:_NAME_MAX].strip("-.")
    if not text:
        raise RunPathError(f"run name {name!r} has no usable characters; use letters, digits, '-' or '_'")
    return text


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so a reader sees the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=False).encode("utf-8"))


def resolve_inside(root: str | os.PathLike, relative: str) -> Path:
    """Resolve ``relative`` under ``root``; refuse absolute paths, '..' and symlinks that escape.

    Raises:
        RunPathError: naming the offending value.
    """
    if not relative or os.path.isabs(relative) or relative.startswith(("/", "\\")):
        raise RunPathError(f"{relative!r} must be a relative path inside the runs folder")
    parts = Path(relative).parts
    if any(p == ".." for p in parts) or any(":" in p for p in parts):
        raise RunPathError(f"{relative!r} may not contain '..' or a drive")
    root_real = Path(root).resolve()
    target = (root_real / relative).resolve()
    if target != root_real and root_real not in target.parents:
        raise RunPathError(f"{relative!r} points outside the runs folder (through a symlink?)")
    return target


@dataclass(frozen=True)
class RunFolder:
    """Paths and files of one run. Cheap to create; touches the disk only when asked."""

    path: Path

    @classmethod
    def for_run(cls, output_dir: str | os.PathLike, run_name: str) -> RunFolder:
        return cls(runs_root(output_dir) / sanitize_run_name(run_name))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def run_json(self) -> Path:
        return self.path / RUN_JSON

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def state_dir(self) -> Path:
        return self.path / "state"

    def create(self) -> None:
        for d in (self.path, self.samples_dir, self.checkpoints_dir, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)

    def exists(self) -> bool:
        return self.run_json.is_file()

    # run.json ---------------------------------------------------------------------------------

    def read(self) -> dict[str, Any]:
        """run.json as a dict ({} if missing or unreadable: a run folder being created)."""
        try:
            return json.loads(self.run_json.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def update(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into run.json atomically and stamp ``updated_at``."""
        with _lock_for(self.run_json):
            data = self.read()
            data.update(fields)
            data["updated_at"] = time.time()
            atomic_write_json(self.run_json, data)
            return data

    def set_status(self, state: str, message: str = "", **fields: Any) -> dict[str, Any]:
        # Read and write under one lock: the trainer thread and the run manager both set status,
        # and a read outside the lock would let one drop the other's fields (step, message).
        with _lock_for(self.run_json):
            status = dict(self.read().get("status") or {})
            status.update(fields)
            status.update(state=state, message=message, pid=os.getpid(), updated_at=time.time())
            return self.update(status=status)

    # metrics.jsonl ----------------------------------------------------------------------------

    def append_metrics(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, separators=(",", ":")) + "\n"
        with _lock_for(self.metrics_path), open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line)

    def read_metrics(self, since_step: int = 0) -> list[dict[str, Any]]:
        """Rows with step > since_step. A torn last line (crash mid-write) is ignored."""
        rows = []
        try:
            with open(self.metrics_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if row.get("step", 0) > since_step:
                        rows.append(row)
        except FileNotFoundError:
            pass
        return rows

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint we resume from (they will be redone)."""
        rows = self.read_metrics(0)
        kept = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows if r.get("step", 0) <= step)
        atomic_write_bytes(self.metrics_path, kept.encode("utf-8"))

    # temporaries ------------------------------------------------------------------------------

    def stale_temporaries(self) -> list[Path]:
        """Temporary files and folders a killed writer of this run left behind, sorted by path.

        Only names this run's own writers make, in this run's folders: safetensors' ``.tmpXXXXXX``
        (its Rust writer's temp file) in checkpoints/ and state/, the pack's
        ``.<file>.<pid>-<id>.tmp`` / ``.<file>.tmp-<pid>`` / ``.<file>.tmp`` beside a file of the
        run, ``.<name>.XXXX.tmp`` beside run.json and metrics.jsonl, and an unfinished
        ``state/.tmp-step-NNNNN``. Files a user put there under other names are left alone.
        """
        found: list[Path] = []
        run_files = (RUN_JSON, METRICS, "loss.png")
        for path in _children(self.path):
            if path.is_file() and path.name.startswith(tuple(f".{n}." for n in run_files)):
                if path.name.endswith(".tmp"):
                    found.append(path)
        for folder in (
            self.checkpoints_dir,
            self.checkpoints_dir / "text_encoders",
            self.state_dir,
            self.samples_dir,
        ):
            for path in _children(folder):
                if _SAFETENSORS_TMP.match(path.name) and path.is_file():
                    found.append(path)
                elif folder == self.state_dir and _STATE_TMP.match(path.name) and path.is_dir():
                    found.append(path)
                elif path.is_file() and _is_own_temp(path.name, self.name):
                    found.append(path)
        return sorted(found)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete :meth:`stale_temporaries` (call it only while no process writes this run).

        Returns:
            What was deleted.
        """
        removed = []
        for path in self.stale_temporaries():
            try:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
        return removed

    # samples ----------------------------------------------------------------------------------

    def sample_path(self, step: int, index: int) -> Path:
        return self.samples_dir / f"step{step:05d}-{index}.png"

    def samples(self) -> list[Path]:
        if not self.samples_dir.is_dir():
            return []
        return sorted(
            p for p in self.samples_dir.iterdir() if p.suffix == ".png" and not p.name.startswith(".")
        )

    def latest_sample(self) -> Path | None:
        files = self.samples()
        return files[-1] if files else None


def list_runs(output_dir: str | os.PathLike) -> list[RunFolder]:
    root = runs_root(output_dir)
    if not root.is_dir():
        return []
    return sorted((RunFolder(p) for p in root.iterdir() if (p / RUN_JSON).is_file()), key=lambda r: r.name)


# safetensors (0.5+) writes through Rust's tempfile crate: ".tmp" and six random characters.
_SAFETENSORS_TMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")
_STATE_TMP = re.compile(r"^\.tmp-step-\d{5,}$")
# trainer.lora.io: ".<file>.<pid>-<8 hex>.tmp"; models.files: ".<file>.tmp-<pid>"; saving: ".<file>.tmp";
# atomic_write_bytes (mkstemp): ".<file>.<random>.tmp".
_OWN_TEMP = re.compile(r"^\.(?P<file>.+?)\.(?:[^.]+\.tmp|tmp-\d+|tmp)$")


def _is_own_temp(name: str, run_name: str) -> bool:
    """True for a temporary of a file named after the run (``<run>-step00030.safetensors``...)
    or of a sample (``step00010-0.png``)."""
    match = _OWN_TEMP.match(name)
    if match is None:
        return False
    target = match.group("file")
    own = (f"{run_name}.", f"{run_name}-step", f"{run_name}-te")
    return target.startswith(own) or bool(re.match(r"^step\d{5,}-\d+\.png$", target))


def _children(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


_locks: dict[Path, threading.RLock] = {}
_locks_guard = threading.Lock()


def _lock_for(path: Path) -> threading.RLock:
    # One lock per file: the trainer thread and HTTP handlers write the same run.json.
    # Re-entrant because set_status holds it around update().
    with _locks_guard:
        return _locks.setdefault(Path(path), threading.RLock())
