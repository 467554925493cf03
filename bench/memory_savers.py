"""``python -m bench.memory_savers CASE:SAVER ...``: memory_mode's savers through our step on the GPU.

Each argument is a bench case and a saver, e.g. ``sdxl-lora-b4:fp8`` (LoRA with the frozen base
stored in fp8) or ``sdxl-full-b1:bf16w`` (a full fine-tune with bf16 weights, gradients and
optimizer state); gradient checkpointing is on in both, as memory_mode turns it on first. The
step is the engine's default (compiled blocks, CUDA graphs), built as :func:`bench.ours.our_step`
builds it, with the saver applied where the loop applies it (fp8 after ``speed.apply``; bf16
weights in ``prepare_trainables``). Prints peak memory against :func:`trainer.engine.memory.estimate`,
the step time and the losses (they must stay finite; the bf16/fp8 numerics differ from the
default's). ``--smoke``: tiny models on the CPU.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch

from trainer.config import Arch, Method
from trainer.engine.fp8 import store_fp8
from trainer.engine.memory import GiB, MemorySettings, estimate

from . import ours
from .cases import CASES, SMOKE_CASES, VARIANTS


def check(name: str, saver: str, *, smoke: bool, steps: int = 12) -> str:
    """One case with one saver ("fp8", "bf16w" or "none"); returns its result line."""
    device = torch.device("cpu" if smoke else "cuda")
    case = dataclasses.replace((SMOKE_CASES if smoke else CASES)[name], gradient_checkpointing=True)
    real_apply, real_prepare = ours.speed.apply, ours.prepare_trainables

    def prepare(bundle, config, rt):
        return real_prepare(bundle, config, rt, half_weights=saver == "bf16w")

    def apply(model, config, dev, **kwargs):
        session = real_apply(model, config, dev, **kwargs)
        if saver == "fp8":
            store_fp8(model, compute_dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
        return session

    ours.prepare_trainables, ours.speed.apply = prepare, apply
    try:
        settings = ours.variant_settings("default", VARIANTS["default"], device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step = ours.our_step(case, device, settings, smoke=smoke)
        losses, times = [], []
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            losses.append(step.step())
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        cuda = device.type == "cuda"
        peak = torch.cuda.max_memory_allocated() / GiB if cuda else 0.0
        reserved = torch.cuda.max_memory_reserved() / GiB if cuda else 0.0
        settings_m = MemorySettings(
            Arch(case.arch), Method(case.method), case.resolution, case.batch, gradient_checkpointing=True,
            fp8_base=saver == "fp8", bf16_weights=saver == "bf16w",
        )  # fmt: skip
        est = estimate(settings_m)["step"] / GiB
        ms = sorted(times[steps // 2 :])[len(times[steps // 2 :]) // 2] * 1000
        line = (
            f"{name} gc+{saver}: peak {peak:.2f} GiB (reserved {reserved:.2f}), estimate {est:.2f} GiB, "
            f"{ms:.1f} ms/step ({case.batch / ms * 1000:.2f} samples/s), {time.perf_counter() - start:.0f} s "
            f"with compile, losses {[round(x, 4) for x in losses]}"
        )
        step.session.restore()
        if step.graphs is not None:
            step.graphs.release()
        torch._dynamo.reset()
        return line
    finally:
        ours.prepare_trainables, ours.speed.apply = real_prepare, real_apply


def main(argv: list[str]) -> None:
    smoke = "--smoke" in argv
    for arg in [a for a in argv if not a.startswith("--")]:
        name, saver = arg.split(":")
        print(check(name, saver, smoke=smoke), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
