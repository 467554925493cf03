"""How a run fails: every known failure becomes one clear sentence for run.json and the UI.

The loop raises the exceptions below (or lets torch/OS ones through); :func:`failure_message`
turns any of them into what the user reads. Nothing here swallows an error: the loop ends the run
as failed with that message, keeps every checkpoint already written, and logs the traceback of
anything unexpected.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator

import torch

from ..models.errors import ModelLoadError
from ..options import ConfigError
from .state import StateError


class TrainingFailure(RuntimeError):
    """A failure whose message is already what the user should read."""


class NonFiniteLoss(TrainingFailure):
    """The loss (or the gradient) became NaN or infinite; nothing from this step may be saved."""

    def __init__(self, step: int, value: float, *, precision: str, what: str = "loss"):
        self.step = step
        self.value = value
        hint = (
            "switch mixed_precision from fp16 to bf16 or fp32"
            if precision == "fp16"
            else "try mixed_precision fp32"
        )
        super().__init__(
            f"the {what} became {value} at step {step}; the run was stopped before saving anything from this step. "
            f"Lower the learning_rate (e.g. by 10x) or {hint}."
        )


class ImageReadFailure(TrainingFailure):
    """An image that scanned fine could not be read mid-run (deleted, truncated, changed)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        super().__init__(
            f"could not read image {self.path}: {reason}. Fix or remove the file, then resume the run."
        )


class RunRefused(TrainingFailure):
    """A run that may not start in its folder as asked (changed settings on resume, a name
    already taken). It is refused before anything in the folder is written."""


# Errors that say where a run writes, not what it trains: each gets its cause and its fix.
_READ_ONLY = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
_NOT_A_FOLDER = frozenset({errno.ENOTDIR, errno.EEXIST})
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
WRITE_ERRNOS = _READ_ONLY | _NOT_A_FOLDER | _DISK_FULL


def write_failure_text(path: str, error: OSError) -> str:
    """One sentence naming why writing ``path`` failed and what to do about it."""
    if error.errno in _DISK_FULL:
        return f"disk full while writing {path}; free some space, then resume the run"
    if error.errno in _READ_ONLY:
        return (
            f"cannot write {path}: the output folder is read-only or not yours ({error.strerror}); "
            "choose a writable output_dir or fix the folder's permissions, then resume the run"
        )
    if error.errno in _NOT_A_FOLDER:
        return (
            f"cannot write {path}: a file stands where a folder of this path should be; "
            "move that file away or choose another output_dir, then resume the run"
        )
    return f"could not write {path}: {error.strerror or error}"


class WriteFailure(TrainingFailure):
    """Writing a checkpoint, a sample or the resume state failed."""

    def __init__(self, path: str | os.PathLike, error: OSError):
        self.path = str(path)
        self.errno = error.errno
        super().__init__(write_failure_text(self.path, error))


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_error_in(error: BaseException) -> OSError | None:
    """The OS error a non-OSError carries in its text, or None.

    safetensors' Rust writer raises ``SafetensorError("... No space left on device (os error 28)
    ...")``, which is neither an ``OSError`` nor a ``RuntimeError``; the errno in its text is
    what tells a full disk from a read-only folder.
    """
    match = _OS_ERROR.search(str(error))
    if match is None:
        return None
    number = int(match.group(1))
    return OSError(number, os.strerror(number))


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into a :class:`WriteFailure` naming it."""
    try:
        yield
    except WriteFailure:
        raise
    except OSError as e:
        raise WriteFailure(path, e) from e
    except Exception as e:
        carried = os_error_in(e)
        if carried is None and "No space left" in str(e):
            carried = OSError(errno.ENOSPC, "No space left on device")
        if carried is not None:
            raise WriteFailure(path, carried) from e
        raise


def oom_message(*, step: int, batch_size: int, resolution: int) -> str:
    return (
        f"out of GPU memory at step {step} with batch {batch_size} at {resolution} px: "
        "lower batch_size, enable gradient_checkpointing, or lower resolution"
    )


def is_oom(error: BaseException) -> bool:
    """True for CUDA (and other accelerator) out-of-memory errors."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def failure_message(
    error: BaseException, *, step: int, batch_size: int, resolution: int, output_dir: str = ""
) -> str:
    """The one sentence a user reads for ``error`` raised at ``step``.

    Args:
        error: what the loop caught.
        step: the optimizer step being run (1-based) or the last one finished.
        batch_size, resolution: named in the out-of-memory advice.
        output_dir: the run's output folder: an OS error on a path inside it is a write failure
            (run.json, metrics.jsonl and the run folder itself are written outside ``writing``).
    """
    if is_oom(error):
        return oom_message(step=step, batch_size=batch_size, resolution=resolution)
    if isinstance(error, (TrainingFailure, ConfigError, StateError, ModelLoadError)):
        return str(error)
    if isinstance(error, OSError):
        where = str(error.filename or "")
        if error.errno in _DISK_FULL or (
            error.errno in WRITE_ERRNOS and output_dir and where.startswith(str(output_dir))
        ):
            return write_failure_text(where or "a file of the run", error)
        return f"{type(error).__name__}{' ' + where if where else ''}: {error.strerror or error}"
    carried = os_error_in(error)
    if carried is not None and carried.errno in _DISK_FULL:
        return write_failure_text("a file of the run", carried)
    if isinstance(error, (ValueError, ImportError, FileNotFoundError)):
        # Model, dataset and dependency errors are raised with messages meant for users.
        return str(error)
    return f"unexpected error at step {step}: {type(error).__name__}: {error} (the log has the traceback)"
