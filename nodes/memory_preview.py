"""What ``memory_mode`` would choose for a run queued now, for the Train and Step Plan nodes' text.

The run itself decides again when it starts (ComfyUI's models may be loaded or gone by then) and
records that choice in run.json; this line tells the user beforehand.
"""

from __future__ import annotations

from ..trainer.config import TrainConfig
from ..trainer.engine.fitting import peek_arch, plan_memory
from ..trainer.engine.memory import CardTooSmall
from . import host


def memory_line(config: TrainConfig) -> str:
    """One line: the memory plan for ``config`` on ComfyUI's GPU as it is now (or why there is none)."""
    arch = peek_arch(config)
    if arch is None:
        return f"memory {config.memory_mode.value}: chosen when the run starts (the model family is not known yet)"
    device, free = host.vram_for_a_new_run()
    try:
        plan = plan_memory(config, arch, free=free, device=device)
    except CardTooSmall as e:
        return f"refused at start: {e}"
    return plan.message
