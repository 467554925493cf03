"""End to end through ``trainer.engine.loop.train``: a real-size model with random weights (handed
to ``train`` through its ``model_loader`` hook), a small synthetic dataset on disk, latent and text
caches in memory, metrics every step and checkpoints (with resume state) on their cadence.

The steady window starts once every image's latents and captions are cached and compilation is
done, and it spans a checkpoint when the run is long enough, so the figure is what a user sees.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from trainer.engine.events import Callbacks, Progress
from trainer.engine.loop import train
from trainer.options import to_dict

from .cases import BenchCase
from .measure import BusySampler
from .models import real_bundle, step_bundle
from .ours import case_config

_COLOURS = [(230, 40, 40), (40, 80, 230), (40, 200, 90), (240, 200, 30), (200, 60, 200), (30, 200, 220)]


def make_dataset(folder: Path, *, size: int, count: int) -> Path:
    """``count`` square images (a coloured disc on a gradient) with captions, in a kohya folder."""
    sub = folder / "1_things"
    if sub.is_dir() and len(list(sub.glob("*.png"))) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    sub.mkdir(parents=True)
    for i in range(count):
        img = Image.linear_gradient("L").resize((size, size)).convert("RGB")
        draw = ImageDraw.Draw(img)
        draw.ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=_COLOURS[i % len(_COLOURS)])
        img.save(sub / f"img{i:03d}.png")
        (sub / f"img{i:03d}.txt").write_text(f"a photo of a thing, colour {i}, disc", encoding="utf-8")
    return folder


class _Clock(Callbacks):
    """Records when each step finished, and samples GPU-busy over the steady window."""

    def __init__(self, device: torch.device, *, window_start: int, window_end: int):
        self.times: dict[int, float] = {}
        self.window_start, self.window_end = window_start, window_end
        self.busy = BusySampler(device)
        self.checkpoints: list[int] = []

    def on_progress(self, progress: Progress) -> None:
        if progress.step == self.window_start:
            self.busy.__enter__()
        if progress.step == self.window_end:
            self.busy.__exit__(None, None, None)
        self.times[progress.step] = time.perf_counter()

    def on_checkpoint(self, run: str, step: int, path: str) -> None:
        self.checkpoints.append(step)


@dataclass
class EndToEnd:
    """The result of one end-to-end run.

    Attributes:
        name: "<case> e2e".
        state: how the run ended ("finished" expected) and its message.
        steps: optimizer steps done.
        samples_per_s: over the steady window (steps ``warm``..``steps``).
        peak_gib: peak allocated memory of the whole run (caching, compile and steps).
        gpu_busy: NVML busy fraction over the steady window.
        first_steps_s: wall time until the window starts (model setup excluded): caching + compile.
        checkpoints: steps at which checkpoints were written.
        window: (first, last) step of the steady window.
        setup_s: building the model (before ``train`` is called).
        step_ms: median step time in the window (checkpoint steps included in the median's input).
        checkpoint_s: extra time of the step after each checkpoint in the window, over the median.
    """

    name: str
    state: str
    steps: int
    samples_per_s: float
    peak_gib: float
    gpu_busy: float
    first_steps_s: float
    checkpoints: list[int]
    window: tuple[int, int]
    setup_s: float = 0.0
    step_ms: float = 0.0
    checkpoint_s: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def run_e2e(
    case: BenchCase,
    device: torch.device,
    *,
    steps: int,
    warm: int,
    checkpoint_every: int = 200,
    images: int = 8,
    workdir: Path,
    smoke: bool = False,
    with_t5: bool = True,
) -> EndToEnd:
    """Train ``case`` for ``steps`` steps through ``train`` and measure its steady window.

    Args:
        steps: optimizer steps (``max_steps``).
        warm: steps left out of the window (the first epoch fills the caches; compilation).
        checkpoint_every: checkpoint cadence (a checkpoint inside the window is part of the figure).
        images: dataset size (one bucket); the first ``images / batch`` steps encode them.
        workdir: where the dataset and the run folder go (wiped first).
        smoke: tiny models on the CPU.
        with_t5: SD3: build and use T5-XXL for caching the captions.
    """
    if not 0 < warm < steps:
        raise ValueError(f"warm must be between 0 and steps ({steps}), got {warm}")
    data = make_dataset(workdir / f"data-{case.resolution}-{images}", size=case.resolution, count=images)
    out = workdir / "runs"
    shutil.rmtree(out / "finetune" / f"bench-{case.name}", ignore_errors=True)
    config = case_config(
        case,
        device=device,
        output_dir=str(out),
        dataset=to_dict_spec(data),
        max_steps=steps,
        epochs=100_000,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=2,
        pause_while_host_busy=False,
        use_t5=with_t5,
    )
    t0 = time.perf_counter()
    bundle = (
        step_bundle(case.arch, device, smoke=True)
        if smoke
        else real_bundle(case.arch, device, with_t5=with_t5)
    )
    setup_s = time.perf_counter() - t0
    clock = _Clock(device, window_start=warm, window_end=steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_start = time.perf_counter()
    result = train(config, callbacks=clock, model_loader=lambda c: bundle, device=str(device))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    done = result.step
    if done < steps or warm not in clock.times:
        return EndToEnd(
            f"{case.name} e2e",
            f"{result.state.value}: {result.message}",
            done,
            0.0,
            peak,
            float("nan"),
            0.0,
            clock.checkpoints,
            (warm, steps),
            setup_s,
        )
    window_s = clock.times[steps] - clock.times[warm]
    busy = clock.busy.fraction
    durations = {s: clock.times[s] - clock.times[s - 1] for s in range(warm + 1, steps + 1)}
    median = statistics.median(durations.values())
    # A checkpoint is written after its step's progress event, so it lengthens the next step.
    checkpoint_s = [durations[c + 1] - median for c in clock.checkpoints if c + 1 in durations]
    return EndToEnd(
        name=f"{case.name} e2e",
        state=f"{result.state.value}: {result.message}",
        steps=done,
        samples_per_s=case.batch * (steps - warm) / window_s,
        peak_gib=peak,
        gpu_busy=busy if busy is not None else float("nan"),
        first_steps_s=clock.times[warm] - t_start,
        checkpoints=clock.checkpoints,
        window=(warm, steps),
        setup_s=setup_s,
        step_ms=median * 1e3,
        checkpoint_s=checkpoint_s,
    )


def to_dict_spec(folder: Path) -> dict:
    """The dataset spec (as a dict) of one folder with the default caption policy."""
    from trainer.config import DatasetPart, DatasetSource, DatasetSpec

    return to_dict(DatasetSpec(parts=[DatasetPart(source=DatasetSource(folder=str(folder)))]))
