"""The pack's own socket types, declared once and reused by every node module.

- ``FT_DATASET`` carries a :class:`trainer.config.DatasetSpec` (serialisable, re-scannable).
- ``FT_RUN`` carries a handle to a training run (its folder and name), from the train nodes.
- ``FT_CHECKPOINTS`` carries a run's list of checkpoints, for sweeps and strips.
"""

from __future__ import annotations

from comfy_api.latest import io

FtDataset = io.Custom("FT_DATASET")
FtRun = io.Custom("FT_RUN")
FtCheckpoints = io.Custom("FT_CHECKPOINTS")

# The ComfyUI category every node of the pack lives under; node modules add a sub-category.
CATEGORY = "finetune"
