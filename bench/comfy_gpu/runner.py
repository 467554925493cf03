"""One scenario against a running server: (a) the run alone, (b) the run while prompts render,
(c) the sweep and stock loaders on its checkpoints, (u) the same run uncapped for the loss curve."""

from __future__ import annotations

import logging
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from . import card
from .comfy_process import Server, VramSampler
from .scenarios import Scenario, sweep_prompt, training_prompt, txt2img_prompt

log = logging.getLogger("comfy_gpu")
LORA_NOT_LOADED = "lora key not loaded"
OOM_PATTERN = re.compile(r"OutOfMemoryError|CUDA out of memory|out of memory", re.IGNORECASE)
_COLOURS = [(230, 40, 40), (40, 80, 230), (40, 200, 90), (240, 200, 30), (200, 60, 200), (30, 200, 220)]


@dataclass
class Settings:
    """How much each part does (``--smoke`` shrinks all of it).

    Attributes:
        steps: ``max_steps`` of each run (None: the scenario's).
        prompts: txt2img prompts queued during run (b).
        render_steps: sampler steps of every render.
        render_size: render size (None: the scenario's resolution).
        idle_renders: timed renders on the idle server (after one warm-up render).
        warm_fraction: the steady window starts at this fraction of the steps (caches filled,
            compiled); run (b) queues its prompts there.
        images: dataset size.
        timeout: seconds for one run or prompt.
        smoke: tiny settings on the CPU.
    """

    steps: int | None = None
    prompts: int = 10
    render_steps: int = 20
    render_size: int | None = None
    idle_renders: int = 2
    warm_fraction: float = 0.3
    images: int = 8
    timeout: float = 1200.0
    smoke: bool = False


@dataclass
class RunResult:
    """One training run as the routes report it."""

    name: str
    state: str = ""
    message: str = ""
    steps: int = 0
    window: tuple[int, int] = (0, 0)
    window_s: float = math.nan
    samples_per_s: float = math.nan
    trainer_peak_gib: float = math.nan
    process_peak_gib: float = math.nan
    losses: dict[int, float] = field(default_factory=dict)
    pauses: int = 0
    chosen: str = ""


@dataclass
class Row:
    """Everything the table shows for one scenario."""

    scenario: str
    card_gib: float
    card: str = ""
    card_held: bool | None = None
    idle_render_s: float = math.nan
    alone: RunResult | None = None
    busy: RunResult | None = None
    uncapped: RunResult | None = None
    render_during_s: list[float] = field(default_factory=list)
    render_errors: list[str] = field(default_factory=list)
    renders_in_run: int = 0
    sweep: str = ""
    stock: str = ""
    lora_not_loaded: int = 0
    ooms: int = 0
    notes: list[str] = field(default_factory=list)


def write_dataset(folder: Path, *, size: int, count: int) -> Path:
    """``count`` square images (a coloured disc on a gradient) with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = Image.linear_gradient("L").resize((size, size)).convert("RGB")
        draw = ImageDraw.Draw(img)
        draw.ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=_COLOURS[i % len(_COLOURS)])
        img.save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"k4s4 style, a disc, colour {i}", encoding="utf-8")
    return folder


def steady_window(rows: list[dict], first: int, last: int) -> tuple[int, int, float]:
    """(first, last, seconds) between two logged steps (clamped to what was logged)."""
    times = {int(r["step"]): float(r["time"]) for r in rows if "time" in r}
    if not times:
        return first, last, math.nan
    steps = sorted(times)
    first = min((s for s in steps if s >= first), default=steps[0])
    last = max(s for s in steps if s <= last) if any(s <= last for s in steps) else steps[-1]
    return first, last, (times[last] - times[first]) if last > first else math.nan


def loss_gap(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float, int]:
    """(max |Δloss|/loss step by step, mean loss a, mean loss b, steps compared)."""
    common = sorted(set(a) & set(b))
    if not common:
        return math.nan, math.nan, math.nan, 0
    rel = [abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in common]
    return (
        max(rel),
        statistics.fmean(a[s] for s in common),
        statistics.fmean(b[s] for s in common),
        len(common),
    )


def count_ooms(text: str) -> int:
    return len(OOM_PATTERN.findall(text))


def memory_choice(log: str, run: str) -> str:
    """What memory_mode chose for ``run``: its ``finetune: run <name>: memory …`` log line."""
    marker = f"finetune: run {run}: "
    for line in log.splitlines():
        at = line.find(marker)
        if at >= 0 and line[at + len(marker) :].startswith("memory "):
            return line[at + len(marker) :].strip()
    return ""


class ScenarioRunner:
    """Runs the parts of one scenario on ``server`` and fills a :class:`Row`."""

    def __init__(self, server: Server, scenario: Scenario, settings: Settings, card_gib: float):
        self.server, self.s, self.cfg = server, scenario, settings
        self.card_gib = card_gib
        self.vram = VramSampler(server.proc.pid).start()
        self.steps = settings.steps or scenario.steps
        self.size = settings.render_size or scenario.resolution
        self.row = Row(scenario.name, card_gib)

    # pieces -------------------------------------------------------------------------------

    def _render(self, seed: int, **loader) -> str:
        prompt = txt2img_prompt(
            self.s.arch, size=self.size, steps=self.cfg.render_steps, seed=seed,
            prefix=f"harness/{self.s.name}", **loader,
        )  # fmt: skip
        return self.server.queue(prompt)

    def _wait_render(self, pid: str) -> tuple[float, str | None]:
        start, end, error = self.server.wait_prompt(pid, timeout=self.cfg.timeout)
        return end - start, error

    def _train(self, name: str) -> str:
        prompt = training_prompt(self.s, run_name=name, steps=self.steps, smoke=self.cfg.smoke)
        pid = self.server.queue(prompt)
        _, error = self._wait_render(pid)
        if error:
            raise RuntimeError(f"the training prompt of {name} failed: {error}")
        return name

    def _detail(self, run: str) -> dict:
        return self.server.get(f"/finetune/runs/{run}")

    def _wait_step(self, run: str, step: int) -> dict:
        deadline = time.monotonic() + self.cfg.timeout
        while time.monotonic() < deadline:
            detail = self._detail(run)
            if detail["state"] not in ("queued", "running", "paused") or (detail.get("step") or 0) >= step:
                return detail
            time.sleep(0.2)
        raise RuntimeError(f"run {run} did not reach step {step} within {self.cfg.timeout:.0f} s")

    def _collect(self, run: str) -> RunResult:
        detail = self._wait_step(run, 10**9)
        rows = self.server.get(f"/finetune/runs/{run}/metrics")["rows"]
        first = max(1, round(self.steps * self.cfg.warm_fraction))
        first, last, window_s = steady_window(rows, first, self.steps)
        config = detail.get("config") or {}
        batch = int(config.get("batch_size") or 1) * int(config.get("gradient_accumulation") or 1)
        peaks = [float(r["peak_vram"]) for r in rows if r.get("peak_vram")]
        chosen = memory_choice(self.server.log_text(), run)
        result = RunResult(
            name=run,
            state=detail["state"],
            message=detail.get("message", ""),
            steps=int(detail.get("step") or 0),
            window=(first, last),
            window_s=window_s,
            samples_per_s=batch * (last - first) / window_s if window_s and window_s > 0 else math.nan,
            trainer_peak_gib=max(peaks) / 2**30 if peaks else math.nan,
            process_peak_gib=self.vram.peak_gib(),
            losses={int(r["step"]): float(r["loss"]) for r in rows if r.get("loss") is not None},
            pauses=sum(1 for _, state, _m in self.server.run_states(run) if state == "paused"),
            chosen=str(chosen),
        )
        if result.state != "finished":
            self.row.notes.append(f"{run}: {result.state}: {result.message}")
        return result

    # parts --------------------------------------------------------------------------------

    def check_card(self) -> None:
        report = self.server.get("/harness/card")
        if self.card_gib and not report.get("plan"):
            # The hook caps at the first CUDA memory query; ComfyUI makes one at start-up.
            self.row.notes.append("card hook did not report a cap")
        self.row.card = card.describe(report) if report.get("plan") else card.describe({"card_gib": 0})
        if report.get("plan"):
            self.row.card_held = bool(report.get("probe_fail_refused") and report.get("probe_fit_allowed"))
        log.info("%s: %s", self.s.name, self.row.card)

    def idle(self) -> None:
        _, error = self._wait_render(self._render(seed=0))  # loads the model
        if error:
            self.row.render_errors.append(f"idle warm-up: {error}")
        times = []
        for i in range(self.cfg.idle_renders):
            took, error = self._wait_render(self._render(seed=1 + i))
            if error:
                self.row.render_errors.append(f"idle: {error}")
            times.append(took)
        self.row.idle_render_s = statistics.median(times) if times else math.nan

    def alone(self) -> None:
        self.vram.reset()
        self.row.alone = self._collect(self._train(f"{self.s.name}-a"))

    def with_prompts(self) -> None:
        self.vram.reset()
        run = self._train(f"{self.s.name}-b")
        first = max(1, round(self.steps * self.cfg.warm_fraction))
        self._wait_step(run, first)
        ids = [self._render(seed=100 + i) for i in range(self.cfg.prompts)]
        finished = self._wait_step(run, 10**9)  # noqa: F841 - waits for the run's end
        end = time.monotonic()
        for pid in ids:
            start, stop, error = self.server.wait_prompt(pid, timeout=self.cfg.timeout)
            if error:
                self.row.render_errors.append(error)
                continue
            self.row.render_during_s.append(stop - start)
            if start < end:
                self.row.renders_in_run += 1
        self.row.busy = self._collect(run)

    def sweep_and_stock(self) -> None:
        run = self.row.alone.name if self.row.alone else f"{self.s.name}-a"
        before = self.server.log_text().count(LORA_NOT_LOADED)
        _, error = self._wait_render(
            self.server.queue(sweep_prompt(self.s.arch, run, size=self.size, steps=self.cfg.render_steps))
        )
        checkpoints = self.server.get(f"/finetune/runs/{run}/checkpoints")["checkpoints"]
        self.row.sweep = f"error: {error}" if error else f"ok ({len(checkpoints)} checkpoints + base)"
        ok = 0
        for c in checkpoints:
            loader = {"lora": c["file"]} if self.s.method == "lora" else {"unet": c["file"]}
            _, error = self._wait_render(self._render(seed=7, **loader))
            if error:
                self.row.render_errors.append(f"stock {c['file']}: {error}")
            else:
                ok += 1
        what = "Load LoRA" if self.s.method == "lora" else "Load Diffusion Model"
        if self.s.arch == "flux":
            what = "LoraLoaderModelOnly"
        self.row.stock = f"{ok}/{len(checkpoints)} via {what}"
        self.row.lora_not_loaded = self.server.log_text().count(LORA_NOT_LOADED) - before

    def uncapped_twin(self) -> None:
        if self.card_gib and not self.cfg.smoke:
            self.row.notes.append(
                "uncapped twin: " + card.describe(self.server.post("/harness/card", {"gib": 0}))
            )
        self.vram.reset()
        self.row.uncapped = self._collect(self._train(f"{self.s.name}-u"))

    def run(self, parts: str, on_part=None) -> Row:
        """Run the card check, the idle renders and ``parts``; ``on_part(row)`` after each (the
        caller saves the partial row, so a command stopped at its time limit keeps it)."""
        steps = [("card", self.check_card), ("idle", self.idle)]
        steps += [(p, fn) for p, fn in (
            ("a", self.alone), ("b", self.with_prompts), ("c", self.sweep_and_stock), ("u", self.uncapped_twin),
        ) if p in parts]  # fmt: skip
        log_start = len(self.server.log_text())
        for name, fn in steps:
            t0 = time.monotonic()
            try:
                fn()
            except Exception as e:  # one failing part is a note of the row, the others still run
                log.exception("%s: part %s failed", self.s.name, name)
                self.row.notes.append(
                    f"part {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                )
            log.info("%s: part %s took %.0f s", self.s.name, name, time.monotonic() - t0)
            if on_part is not None:
                on_part(self.row)
        self.row.ooms = count_ooms(self.server.log_text()[log_start:])
        self.vram.stop()
        return self.row
