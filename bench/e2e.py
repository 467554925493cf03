"""End to end through ``trainer.engine.loop.train``: a real-size model with random weights (handed
to ``train`` through its ``model_loader`` hook), a small synthetic dataset on disk, latent and text
caches in memory, metrics every step and checkpoints (with resume state) on their cadence.

The steady window starts once every image's latents and captions are cached and compilation is
done, and it spans a checkpoint when the run is long enough, so the figure is what a user sees.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from trainer.checkpoints import CheckpointStore
from trainer.engine.events import Callbacks, Progress
from trainer.engine.loop import train
from trainer.engine.runtime import launched_world_size
from trainer.options import to_dict
from trainer.runfolder import RunFolder

from .cases import BenchCase
from .measure import BusySampler
from .models import real_bundle, step_bundle
from .ours import case_config

_COLOURS = [(230, 40, 40), (40, 80, 230), (40, 200, 90), (240, 200, 30), (200, 60, 200), (30, 200, 220)]


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def make_dataset(folder: Path, *, size: int, count: int) -> Path:
    """``count`` square images (a coloured disc on a gradient) with captions, in a kohya folder.

    Under ``accelerate launch`` rank 0 writes it into a temporary folder and renames it into place;
    the other ranks wait for it.
    """
    sub = folder / "1_things"
    if sub.is_dir() and len(list(sub.glob("*.png"))) == count:
        return folder
    if _rank() != 0:
        deadline = time.monotonic() + 600
        while not (sub.is_dir() and len(list(sub.glob("*.png"))) == count):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {_rank()}: rank 0 did not write the dataset {folder}")
            time.sleep(0.5)
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "1_things").mkdir(parents=True)
    for i in range(count):
        img = Image.linear_gradient("L").resize((size, size)).convert("RGB")
        draw = ImageDraw.Draw(img)
        draw.ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=_COLOURS[i % len(_COLOURS)])
        img.save(tmp / "1_things" / f"img{i:03d}.png")
        (tmp / "1_things" / f"img{i:03d}.txt").write_text(
            f"a photo of a thing, colour {i}, disc", encoding="utf-8"
        )
    tmp.rename(folder)
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
        processes: processes that trained together (samples/s counts all of them).
        plan: the run's plan as run.json records it (global batch, steps per epoch).
        checkpoint_files: LoRA files in the run folder at the end (written once, by rank 0).
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
    processes: int = 1
    plan: dict = field(default_factory=dict)
    checkpoint_files: list[str] = field(default_factory=list)

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
    compile: bool = True,
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
        compile: the run's ``compile`` (off: quick checks of the rest, e.g. CUDA graphs).
    """
    if not 0 < warm < steps:
        raise ValueError(f"warm must be between 0 and steps ({steps}), got {warm}")
    data = make_dataset(workdir / f"data-{case.resolution}-{images}", size=case.resolution, count=images)
    out = workdir / "runs"
    world = launched_world_size()
    if _rank() == 0:
        # The other ranks reach train() only after rank 0 does: joining the process group waits.
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
        compile=compile,
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
    folder = RunFolder.for_run(str(out), config.run_name)
    run_json = json.loads(folder.run_json.read_text()) if folder.run_json.is_file() else {}
    plan = {
        k: run_json.get("plan", {}).get(k)
        for k in ("batch_size", "num_processes", "samples_per_epoch", "steps_per_epoch", "total_steps")
    }
    files = [c.path.name for c in CheckpointStore(folder.path, config.run_name).list() if c.path]
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
        samples_per_s=case.batch * world * (steps - warm) / window_s,
        peak_gib=peak,
        gpu_busy=busy if busy is not None else float("nan"),
        first_steps_s=clock.times[warm] - t_start,
        checkpoints=clock.checkpoints,
        window=(warm, steps),
        setup_s=setup_s,
        step_ms=median * 1e3,
        checkpoint_s=checkpoint_s,
        processes=world,
        plan=plan,
        checkpoint_files=files,
    )


def to_dict_spec(folder: Path) -> dict:
    """The dataset spec (as a dict) of one folder with the default caption policy."""
    from trainer.config import DatasetPart, DatasetSource, DatasetSpec

    return to_dict(DatasetSpec(parts=[DatasetPart(source=DatasetSource(folder=str(folder)))]))
