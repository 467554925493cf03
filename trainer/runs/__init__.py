"""Background training runs: the run manager, run snapshots and safe run-folder queries."""

from .info import RunHandle, RunInfo, RunNotFound, RunStateError
from .manager import RunManager

__all__ = ["RunHandle", "RunInfo", "RunManager", "RunNotFound", "RunStateError"]
