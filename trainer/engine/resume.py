"""Before a run writes to its folder: refuse a start that does not fit the folder, then make the
folder ready.

A resume continues the run that was saved, so settings that change what it learns (rank, seed,
learning rate...) are refused before anything is written: run.json stays byte for byte as it was.
Harmless changes (validation, workers, keep_checkpoints...) are accepted with a warning naming
them. Then the temporaries a killed write left behind are deleted, metrics.jsonl drops the rows
of steps that will be trained again (all of them when there is no saved state), and the config is
recorded in run.json *before* the model loads, so a kill while loading still leaves a run.json
that ``train <run>/run.json --resume`` reads.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..checkpoints import CheckpointStore
from ..config import TrainConfig
from ..options import to_dict
from ..runfolder import RunFolder
from .failures import RunRefused
from .state import list_states, read_position

log = logging.getLogger("finetune")


def check_start(
    folder: RunFolder, store: CheckpointStore, config: TrainConfig, *, resume: bool, state_path: Path | None
) -> None:
    """Refuse a start that would overwrite or mix up a saved run; writes nothing.

    Args:
        folder: the run's folder.
        store: its checkpoints.
        config: the settings asked for.
        resume: whether the user asked to continue the run.
        state_path: the resume state the run would continue from (None: it starts at step 0).

    Raises:
        RunRefused: a fresh start over saved checkpoints, or a resume with settings that
            change what the run learns (naming them).
    """
    from ..runs.folder_state import config_changes, harmless_changes, resume_refusal

    if not resume and (store.list() or list_states(folder.state_dir)):
        raise RunRefused(
            f"run_name: {folder.name!r} already has checkpoints in {folder.path}; resume that run, or choose another run_name"
        )
    if state_path is None:
        return  # nothing is carried over: any settings train the same run from step 0
    stored = folder.read().get("config")
    if not isinstance(stored, dict):
        return  # killed before the config was recorded (older versions): nothing to compare
    changes = config_changes(stored, config)
    if changes:
        raise RunRefused(resume_refusal(folder.name, changes))
    harmless = harmless_changes(stored, config)
    if harmless:
        log.warning(
            "finetune: run %s resumes with changed settings that do not change what it learns: %s",
            folder.name,
            "; ".join(harmless),
        )


def prepare_folder(folder: RunFolder, config: TrainConfig, *, state_path: Path | None) -> None:
    """Create the folder, delete stale temporaries, drop metrics rows that will be redone and
    record the config (main process only; call after :func:`check_start`)."""
    folder.create()
    for path in folder.remove_stale_temporaries():
        log.info("finetune: removed %s, left by an interrupted write", path)
    step = read_position(state_path).step if state_path is not None else 0
    if folder.metrics_path.exists():
        folder.truncate_metrics_after(step)
    folder.update(config=to_dict(config))
