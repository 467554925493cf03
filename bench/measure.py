"""Timing helpers for the benchmark: median step time, peak memory, GPU-busy fraction, FLOPs.

Every helper also runs on the CPU (``--smoke``), where memory and GPU-busy read 0.
"""

from __future__ import annotations

import gzip
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Measured bf16 dense matmul peak of the benchmark GPU class (H100 SXM, issue 7); MFU uses it.
PEAK_BF16_FLOPS = 730e12


@dataclass
class Measurement:
    """One row of the table.

    Attributes:
        name: "<case> <variant>".
        samples_per_s: batch / median step time.
        step_ms: median step time.
        peak_gib: peak allocated memory over warm-up and the timed steps.
        gpu_busy: fraction of wall time a kernel ran during the timed steps (NVML).
        mfu: model FLOPs per step (forward + backward, no recomputation) / step time / peak.
        compile_s: warm-up time beyond ``warmup`` steady steps (compilation, autotuning).
        ratio: samples/s over the reference's (filled in by the report).
        peer_ratio: samples/s over the peer's (the reference with the denoiser compiled).
        losses: every step's loss, warm-up included (the parity check compares them).
        note: anything unusual.
        profile: where the time goes (``--profile``).
    """

    name: str
    samples_per_s: float
    step_ms: float
    peak_gib: float
    gpu_busy: float
    mfu: float
    compile_s: float = 0.0
    ratio: float = 0.0
    peer_ratio: float = 0.0
    losses: list[float] = field(default_factory=list)
    note: str = ""
    profile: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_flops(step: Callable[[], object]) -> int:
    """FLOPs of one training step (forward + backward), counted by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def card_check(device: torch.device) -> dict:
    """What the card delivers right now: a bf16 matmul's TFLOP/s, its SM clock against the
    maximum, the power limit, NVML's clock-event (throttle) reasons, and the processes on it.

    A lent GPU can be shared, capped or throttled; this tells such a machine from a slow trainer
    (an H100 SXM gives ~730 TFLOP/s here at 1980 MHz).
    """
    if device.type != "cuda":
        return {}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    end.synchronize()
    out: dict = {"matmul_tflops": round(2 * n**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12, 1)}
    del a, b
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        out["sm_mhz"] = pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
        out["sm_mhz_max"] = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)
        out["power_limit_w"] = round(pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000)
        reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or (
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        )
        out["clock_event_reasons"] = hex(reasons(h))
        # This process included (PID namespaces keep us from telling which one is ours).
        out["compute_processes"] = len(pynvml.nvmlDeviceGetComputeRunningProcesses(h))
    except Exception as e:  # NVML is optional and its calls vary by driver; the matmul still says
        out["nvml"] = f"{type(e).__name__}: {e}"
    return out


class BusySampler:
    """Samples NVML's GPU utilisation (share of time a kernel ran) in a background thread.

    A context manager; ``fraction`` is the mean of the samples taken inside it, or None when NVML
    is not available (CPU runs, no ``pynvml``).
    """

    def __init__(self, device: torch.device, *, period_s: float = 0.02):
        self.device = device
        self.period_s = period_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml
        except ImportError:
            return  # NVML is optional: the column reads nan then
        try:
            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except pynvml.NVMLError:
            self._handle = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100.0)
            time.sleep(self.period_s)

    def __enter__(self) -> BusySampler:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    @property
    def fraction(self) -> float | None:
        # NVML averages over its own sample period (~1/6 s): drop the first samples, which still
        # cover the time before the window.
        usable = self.samples[8:] if len(self.samples) > 16 else self.samples
        return statistics.mean(usable) if usable else None


def time_steps(
    step: Callable[[], object], device: torch.device, *, count: int
) -> tuple[list[float], list[float]]:
    """Run ``count`` steps, each synchronised; returns (seconds per step, loss per step)."""
    times, losses = [], []
    for _ in range(count):
        t0 = time.perf_counter()
        loss = step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return times, losses


def measure(
    name: str,
    step: Callable[[], object],
    *,
    device: torch.device,
    batch: int,
    flops_per_step: float,
    warmup: int = 5,
    timed: int = 20,
    note: str = "",
) -> Measurement:
    """Warm up, then time ``timed`` steps and sample the GPU's busy fraction meanwhile.

    Args:
        step: one training step; returns its loss.
        flops_per_step: model FLOPs of one step (see :func:`train_flops`).
        warmup: steps before timing (compilation and cuDNN autotuning happen here).
        timed: timed steps; the median is reported.
    """
    # Peak over warm-up too: a CUDA graph's activations are allocated while it is captured (in
    # warm-up) and only replayed later, so the timed steps alone would not show them.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm_times, warm_losses = time_steps(step, device, count=warmup)
    with BusySampler(device) as busy:
        times, losses = time_steps(step, device, count=timed)
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    if device.type == "cuda":  # what the allocator holds, CUDA graph pools included
        note = f"{note} reserved {torch.cuda.max_memory_reserved(device) / 2**30:.1f}".strip()
    return Measurement(
        name=name,
        samples_per_s=batch / med,
        step_ms=med * 1e3,
        peak_gib=peak,
        gpu_busy=busy.fraction if busy.fraction is not None else float("nan"),
        mfu=flops_per_step / med / PEAK_BF16_FLOPS if device.type == "cuda" else 0.0,
        compile_s=max(0.0, sum(warm_times) - warmup * med),
        losses=warm_losses + losses,
        note=note,
    )


_KERNEL_KINDS = [
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("conv", ("conv", "dgrad", "wgrad", "fprop", "implicit", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90")),
    ("fused (triton)", ("triton",)),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
]


def _kind(name: str) -> str:
    low = name.lower()
    for kind, keys in _KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile_steps(
    step: Callable[[], object],
    device: torch.device,
    *,
    steps: int = 2,
    top: int = 0,
    trace: Path | None = None,
) -> str:
    """Where a step's time goes: wall vs. kernel time per step, kernels per step, time by kind.

    Args:
        top: also list this many kernels with the most time per step (name, ms, launches).
        trace: write the profiled steps there as a gzipped Chrome trace, with the input shapes of
            each operator (to tell the LoRA products from the base layers' in a viewer).

    Returns:
        One line for the report, plus one line per listed kernel ("" off CUDA).
    """
    if device.type != "cuda":
        return ""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=trace is not None
    ) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        wall = (time.perf_counter() - t0) / steps * 1e3
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        plain = trace.with_suffix("")
        prof.export_chrome_trace(str(plain))
        with open(plain, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        plain.unlink()
    kinds: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    count = 0
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            ms = e.time_range.elapsed_us() / 1e3 / steps
            kinds[_kind(e.name)] = kinds.get(_kind(e.name), 0.0) + ms
            entry = by_name.setdefault(e.name, [0.0, 0])
            entry[0] += ms
            entry[1] += 1
            count += 1
    busy = sum(kinds.values())
    parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    lines = [
        f"wall {wall:.0f} ms/step (under the profiler), kernels {busy:.0f} ms/step in {count // steps} kernels, "
        f"idle {max(0.0, wall - busy):.0f} ms; ms by kind: {parts}"
    ]
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    lines += [f"    {ms:7.2f} ms {n // steps:5d}x  {name[:150]}" for name, (ms, n) in ranked]
    return "\n".join(lines)
