"""CUDA graphs over the training step: the denoiser's forward, the loss and the backward of one
micro-batch recorded once and replayed with a single launch.

Why: with the blocks compiled, an SDXL LoRA step still launches ~11k kernels (mostly LoRA's
rank-16 matrix products, six per adapted layer), and the host cannot issue them as fast as an H100
runs them, so the GPU idles. A replayed graph costs the host one call whatever it holds
(measured on an H100, SDXL LoRA batch 4: 15.9 -> 20.4 samples/s, GPU busy 0.8 -> 0.98; see
``bench/NOTES.md``).

What a graph holds and what stays outside:

- Outside, as in the eager step: the noise and timestep draws (a CPU generator, so a resumed run
  draws the same numbers), noising the latents (a few kernels), clipping, the optimizer, the
  schedule. Inside: forward, loss, backward. Clipping and a fused optimizer's update are queued
  behind the graph with a device-side "skip if not finite" flag (:meth:`StepGraphs.step`), so the
  host waits for the loss once, after the update is in flight.
- Inputs are copied into the graph's own tensors before each replay; one graph per input shape
  (aspect bucket, batch size, accumulation count). The first ``warmup`` micro-batches of a shape
  run eagerly (compilation, autotuning and cuDNN/cuBLAS set-up happen there); they are ordinary
  training micro-batches, nothing is run twice.
- Gradients live in one flat buffer per dtype that every micro-batch accumulates into and that is
  zeroed after the update, so accumulation needs no second graph and an all-reduce across GPUs is
  one call. The graphs share one memory pool, so more buckets do not multiply activation memory.

:func:`graphs_unavailable` says when a run cannot use them (CPU, fp16 loss scaling, a trained text
encoder whose gradients flow through the inputs, random LoRA dropout). A capture that fails turns
graphs off for the rest of the run with a logged warning; the step goes on eagerly, same numbers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import Arch, Precision
from .inputs import DenoiserInputs
from .objectives import NoisedBatch, per_sample_loss
from .runtime import Runtime
from .setup import Trainables
from .speed import SpeedReport
from .step import denoise

log = logging.getLogger("finetune")

#: Eager micro-batches of a shape before it is captured.
WARMUP_MICRO_BATCHES = 2

#: Shapes captured at most; later new shapes run eagerly (each graph keeps its kernels' launch
#: parameters; activation memory is shared).
MAX_GRAPHS = 16

# The tensors a graph reads, in a fixed order: the NoisedBatch fields, then the conditioning.
_NOISED = ("noisy", "timesteps", "target", "weights", "sigmas")
_CONDITIONING = ("latents", "prompt_embeds", "pooled", "time_ids")


def graphs_unavailable(
    *, enabled: bool, device: torch.device, precision: Precision, trains_text: bool, lora_dropout: float
) -> str:
    """Why a run's steps cannot be CUDA graphs; "" when they can.

    Args:
        enabled: the run's ``cuda_graphs`` switch.
        device: the training device.
        precision: the effective precision (fp16 scales its loss with a per-step CPU decision).
        trains_text: a text encoder trains (its forward runs while building the inputs, outside
            any graph).
        lora_dropout: the run's LoRA dropout.
    """
    if not enabled:
        return "cuda_graphs is off in the config"
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA GPU (this run is on {device.type})"
    if precision == Precision.FP16:
        return "fp16 loss scaling decides on the CPU every step; use bf16 for CUDA graphs"
    if trains_text:
        return "a trained text encoder runs outside the graph; its gradients would not reach it"
    if lora_dropout > 0:
        return "LoRA dropout draws random masks inside the step"
    return ""


def step_graphs_for(
    model: nn.Module,
    arch: Arch,
    trainables: Trainables,
    *,
    runtime: Runtime,
    enabled: bool,
    lora_dropout: float,
    report: SpeedReport,
) -> StepGraphs | None:
    """The run's step graphs, or None (the eager step) with the reason written to ``report``.

    Args:
        model: the denoiser (not DDP-wrapped: the graphs reduce gradients themselves).
        trainables: what the optimizer updates.
        runtime: device, precision and process group.
        enabled, lora_dropout: the run's ``cuda_graphs`` and ``lora_dropout``.
        report: the run's speed report (``cuda_graphs``, ``cuda_graphs_skipped``).
    """
    reason = graphs_unavailable(
        enabled=enabled,
        device=runtime.device,
        precision=runtime.precision,
        trains_text=bool(trainables.text),
        lora_dropout=lora_dropout,
    )
    report.cuda_graphs, report.cuda_graphs_skipped = not reason, reason
    if reason:
        if enabled and runtime.device.type == "cuda":
            log.info("finetune: steps run without CUDA graphs: %s", reason)
        return None
    return StepGraphs(
        model,
        arch,
        trainables.denoiser,
        autocast_dtype=None if runtime.precision == Precision.FP32 else runtime.compute_dtype,
    )


@dataclass
class GraphStats:
    """What the graphs did so far (logged at the end of a run, printed by the benchmark).

    Attributes:
        captured: graphs recorded (one per input shape).
        replayed: micro-batches run by replaying a graph.
        eager: micro-batches run eagerly (warm-up, shapes over the limit, after a failure).
        disabled: why graphs were turned off mid-run ("" while they are on).
    """

    captured: int = 0
    replayed: int = 0
    eager: int = 0
    disabled: str = ""


class _Recorded:
    """A stand-in for ``torch.cuda.CUDAGraph`` off the GPU: "capturing" keeps the function, a
    replay runs it again on the same input tensors. The CPU tests exercise the static-input and
    flat-gradient logic with it exactly as a real graph sees them."""

    def __init__(self, fn: Callable[[], torch.Tensor]):
        self._fn = fn
        self.output: torch.Tensor | None = None

    def replay(self) -> None:
        self.output = self._fn()


class StepGraphs:
    """Forward + loss + backward of a micro-batch, as CUDA graphs keyed by input shape.

    The owner calls :meth:`forward_backward` for each micro-batch, then :meth:`all_reduce_mean`
    when several processes train, :meth:`clip`, and :meth:`step` (fused optimizers; others step
    after a host-side NaN check and call :meth:`zero_grad` instead of ``optimizer.zero_grad()``),
    and :meth:`release` when the run ends.

    Args:
        model: the denoiser itself (not a DDP wrapper: gradients are reduced here).
        arch: the architecture (its forward signature).
        params: the trainable parameters; their ``.grad`` become views of the flat buffers.
        autocast_dtype: bf16 for mixed precision, None for fp32.
        warmup: eager micro-batches of a shape before it is captured.
        max_graphs: shapes captured at most.
        emulate: record and replay Python functions instead of CUDA graphs (CPU tests).
    """

    def __init__(
        self,
        model: nn.Module,
        arch: Arch,
        params: list[nn.Parameter],
        *,
        autocast_dtype: torch.dtype | None,
        warmup: int = WARMUP_MICRO_BATCHES,
        max_graphs: int = MAX_GRAPHS,
        emulate: bool = False,
    ):
        if not params:
            raise ValueError("StepGraphs needs the trainable parameters")
        self.model = model
        self.arch = arch
        self.params = list(params)
        self.device = self.params[0].device
        self.autocast_dtype = autocast_dtype
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.emulate = emulate
        self.stats = GraphStats()
        self._seen: dict[tuple, int] = {}
        self._graphs: dict[tuple, tuple[object, dict[str, torch.Tensor], object]] = {}
        self._pool = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.flat, self._views, self._groups = _flat_gradients(self.params)
        self.attach_gradients()
        self._copies = ComputeCopies.for_model(model, self.params, self.flat, autocast_dtype)

    @property
    def active(self) -> bool:
        return not self.stats.disabled

    # -------------------------------------------------------------------------------------------
    # Gradients

    def attach_gradients(self) -> None:
        """Point every parameter's ``.grad`` at its view of the flat buffers (again, if something
        set them to None: a graph writes into the buffers, not into whatever ``.grad`` holds)."""
        for p, view in zip(self.params, self._views, strict=True):
            if p.grad is not view:
                p.grad = view

    def zero_grad(self) -> None:
        """Zero the gradients after an update (in place: the graphs hold their addresses)."""
        for buffer in self.flat:
            buffer.zero_()
        self.attach_gradients()

    def clip(self, max_norm: float) -> torch.Tensor | None:
        """Clip the gradients to a total norm of ``max_norm``; returns that norm before clipping
        (a device tensor: no host sync), or None when clipping is off.

        The arithmetic of ``torch.nn.utils.clip_grad_norm_``, without its per-call sorting of
        1,000+ LoRA tensors by device and dtype.
        """
        if max_norm <= 0:
            return None
        norms = [n for views in self._groups for n in torch._foreach_norm(views, 2.0)]
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for views in self._groups:
            torch._foreach_mul_(views, coef)
        return total

    def step(self, optimizer: torch.optim.Optimizer, *, skip: torch.Tensor) -> None:
        """Update, unless ``skip`` (a device scalar) is true, then zero the gradients.

        The decision stays on the GPU (the fused optimizers' ``found_inf``, which loss scaling
        uses too), so the host can queue the update before it learns whether the loss was finite.
        """
        optimizer.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        self.zero_grad()

    def all_reduce_mean(self, world_size: int) -> None:
        """Average the gradients over the processes: one collective per flat buffer."""
        if world_size <= 1:
            return
        for buffer in self.flat:
            torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
            buffer.div_(world_size)

    def release(self) -> None:
        """Drop the graphs, their memory pool and the gradient buffers (the end of a run: inside
        ComfyUI the process lives on, and a graph's pool is only freed with the graph)."""
        self._graphs.clear()
        self._pool = None
        self._copies = None
        for p in self.params:
            p.grad = None
        self.flat, self._views, self._groups = [], [], []
        self.params = []
        self.stats.disabled = self.stats.disabled or "released"

    # -------------------------------------------------------------------------------------------
    # The step

    def forward_backward(self, noised: NoisedBatch, inputs: DenoiserInputs, *, divisor: int) -> torch.Tensor:
        """Loss and backward of one micro-batch; gradients are added to the flat buffers.

        Args:
            noised: the noised batch (drawn outside, so the noise stream is the eager one).
            inputs: the conditioning.
            divisor: micro-batches in the step (the backward is of ``loss / divisor``).

        Returns:
            The micro-batch's loss (a detached scalar tensor of its own; not divided).
        """
        self.attach_gradients()
        tensors = _input_tensors(noised, inputs)
        key = (_signature(tensors), divisor, noised.precondition)
        graph = self._graphs.get(key)
        if graph is not None:
            return self._replay(graph, tensors)
        seen = self._seen.get(key, 0)
        self._seen[key] = seen + 1
        if not self.active or seen < self.warmup or len(self._graphs) >= self.max_graphs:
            self.stats.eager += 1
            return self._eager(tensors, divisor, noised.precondition)
        try:
            graph = self._capture(tensors, divisor, noised.precondition)
        except Exception as e:  # noqa: BLE001 - a capture that fails must not end the run
            self.stats.disabled = (
                f"capture failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
            log.warning(
                "finetune: CUDA graphs are off for the rest of this run (%s)",
                self.stats.disabled,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            self._graphs.clear()
            self.stats.eager += 1
            return self._eager(tensors, divisor, noised.precondition)
        self._graphs[key] = graph
        self.stats.captured += 1
        return self._replay(graph, tensors)

    def _compute(self, tensors: dict[str, torch.Tensor], divisor: int, precondition: bool) -> torch.Tensor:
        noised = NoisedBatch(
            noisy=tensors["noisy"],
            timesteps=tensors["timesteps"],
            target=tensors["target"],
            weights=tensors.get("weights"),
            sigmas=tensors.get("sigmas"),
            precondition=precondition,
        )
        inputs = DenoiserInputs(
            latents=tensors["latents"],
            prompt_embeds=tensors["prompt_embeds"],
            pooled=tensors.get("pooled"),
            time_ids=tensors.get("time_ids"),
            captions=[],
        )
        # Autocast's weight cache would keep casts made during capture alive past it (PyTorch's
        # CUDA-graph notes); the eager warm-up uses the same setting so compiled blocks see the
        # same autocast state and are not recompiled inside the capture.
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        copies = self._copies.in_use() if self._copies is not None else contextlib.nullcontext()
        with copies:
            with autocast:
                loss = per_sample_loss(denoise(self.model, self.arch, noised, inputs), noised).mean()
            (loss / divisor).backward()
        if self._copies is not None:
            self._copies.fold_gradients()
        return loss.detach()

    def _eager(self, tensors: dict[str, torch.Tensor], divisor: int, precondition: bool) -> torch.Tensor:
        if self._stream is None or self.emulate:
            return self._compute(tensors, divisor, precondition).clone()
        # Warm up on the stream the capture will use: its cuBLAS workspace and other per-stream
        # state exist before capture (PyTorch's CUDA-graph notes).
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            loss = self._compute(tensors, divisor, precondition)
        current.wait_stream(self._stream)
        return loss.clone()

    def _capture(self, tensors: dict[str, torch.Tensor], divisor: int, precondition: bool):
        static = {name: t.clone() for name, t in tensors.items()}
        if self.emulate:
            recorded = _Recorded(lambda: self._compute(static, divisor, precondition))
            return recorded, static, None
        graph = torch.cuda.CUDAGraph()
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        # thread_local: ComfyUI's own thread may allocate or free GPU memory during our capture.
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
            out = self._compute(static, divisor, precondition)
        if self._pool is None:
            self._pool = graph.pool()
        # The eager warm-up's blocks are now cached but unused: give them back to the GPU.
        torch.cuda.empty_cache()
        log.info("finetune: captured a CUDA graph for inputs %s", _describe(static))
        return graph, static, out

    def _replay(self, graph, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        recorded, static, out = graph
        for name, t in tensors.items():
            static[name].copy_(t)
        recorded.replay()
        self.stats.replayed += 1
        result = recorded.output if out is None else out
        return result.clone()


#: Modules whose weight and bias autocast casts to the compute dtype at every use.
_CAST_BY_AUTOCAST = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ComputeCopies:
    """The trained fp32 weights as one bf16 (or fp16) buffer that the graphed forward reads in
    their place.

    Why: under autocast each fp32 LoRA weight costs a cast kernel at every forward, and each of
    its gradients a cast back and an add into ``.grad``. That is three or four tiny kernels per
    tensor, over 4,000 a step for an SDXL LoRA, each too small to fill the GPU. With the copies,
    one kernel casts every weight before the forward; the backward hands each copy its bf16
    gradient without accumulating it (the copies have no ``.grad`` to add to); a few multi-tensor
    kernels gather those into a flat buffer, and one kernel adds it into the fp32 gradients.

    The numbers are the same bits: the copy rounds each weight as autocast's cast does, a
    weight's gradient was a bf16 product before autocast's cast back to fp32 too, and it is added
    to the fp32 gradient once per micro-batch either way. The fp32 parameters stay what the
    optimizer updates, what is saved and what resume restores; the copies are swapped into their
    modules only while a micro-batch runs.

    Args:
        owners: for each parameter, the module holding it and its attribute name.
        params: the trained fp32 parameters, in the order of ``grad_buffer``.
        grad_buffer: their flat fp32 gradient buffer.
        dtype: the autocast dtype.
    """

    def __init__(
        self,
        owners: list[tuple[nn.Module, str]],
        params: list[nn.Parameter],
        grad_buffer: torch.Tensor,
        dtype: torch.dtype,
    ):
        self._owners = owners
        self._originals = params
        self._grad_buffer = grad_buffer
        self._values = torch.empty(grad_buffer.numel(), dtype=dtype, device=grad_buffer.device)
        self._grads = torch.zeros_like(self._values)
        self._copies = [nn.Parameter(v) for v in _views(self._values, params)]
        self._grad_views = _views(self._grads, params)

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        params: list[nn.Parameter],
        grad_buffers: list[torch.Tensor],
        dtype: torch.dtype | None,
    ) -> ComputeCopies | None:
        """Copies for ``params``, or None where they would not give the same numbers: no
        autocast, not all fp32 in one buffer, or a parameter autocast does not cast (a norm's
        weight in a full fine-tune, which runs in fp32) or that two modules share.

        Args:
            model: the denoiser.
            params: the trained parameters.
            grad_buffers: their flat gradient buffers (see :func:`_flat_gradients`).
            dtype: the autocast dtype (None: fp32, no copies).
        """
        if dtype is None or len(grad_buffers) != 1 or any(p.dtype != torch.float32 for p in params):
            return None
        wanted = {id(p) for p in params}
        owner: dict[int, tuple[nn.Module, str]] = {}
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is None or id(p) not in wanted:
                    continue
                if (
                    id(p) in owner
                    or not isinstance(module, _CAST_BY_AUTOCAST)
                    or name not in ("weight", "bias")
                ):
                    return None
                owner[id(p)] = (module, name)
        if len(owner) != len(params):
            return None
        return cls([owner[id(p)] for p in params], params, grad_buffers[0], dtype)

    @contextlib.contextmanager
    def in_use(self):
        """Refresh the copies from the fp32 weights and put them in the modules for the block."""
        for copy in self._copies:  # whatever a failed micro-batch (a failed capture) left
            copy.grad = None
        with torch.no_grad():
            torch._foreach_copy_(self._copies, self._originals)
        for (module, name), copy in zip(self._owners, self._copies, strict=True):
            module._parameters[name] = copy
        try:
            yield
        finally:
            for (module, name), p in zip(self._owners, self._originals, strict=True):
                module._parameters[name] = p

    def fold_gradients(self) -> None:
        """Add the copies' gradients of this micro-batch to the fp32 ones."""
        with torch.no_grad():
            handed = [
                (view, c.grad)
                for c, view in zip(self._copies, self._grad_views, strict=True)
                if c.grad is not None
            ]
            missing = [view for c, view in zip(self._copies, self._grad_views, strict=True) if c.grad is None]
            if handed:
                torch._foreach_copy_([view for view, _ in handed], [grad for _, grad in handed])
            if missing:  # a weight the forward did not use (SD3's last context query)
                torch._foreach_zero_(missing)
            self._grad_buffer.add_(self._grads)
        for copy in self._copies:
            copy.grad = None


def _views(buffer: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of flat ``buffer`` shaped like ``params``, in their order and layout (a
    channels-last weight gets a channels-last gradient, which fused AdamW requires)."""
    views, offset = [], 0
    for p in params:
        chunk = buffer[offset : offset + p.numel()]
        views.append(chunk.view_as(p) if p.is_contiguous() else chunk.as_strided(p.shape, p.stride()))
        offset += p.numel()
    return views


def _flat_gradients(
    params: list[nn.Parameter],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]]]:
    """One zeroed buffer per (device, dtype); each parameter's gradient view into it (in
    parameter order); and the views of each buffer (for the foreach kernels)."""
    by_kind: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        by_kind.setdefault((p.device, p.dtype), []).append(i)
    views: list[torch.Tensor] = [torch.empty(0)] * len(params)
    flat, groups = [], []
    for (device, dtype), indices in by_kind.items():
        buffer = torch.zeros(sum(params[i].numel() for i in indices), device=device, dtype=dtype)
        for i, view in zip(indices, _views(buffer, [params[i] for i in indices]), strict=True):
            views[i] = view
        flat.append(buffer)
        groups.append([views[i] for i in indices])
    return flat, views, groups


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` can skip an update on a device flag (the fused Adam/AdamW/SGD kernels)."""
    return bool(getattr(optimizer, "defaults", {}).get("fused"))


def _input_tensors(noised: NoisedBatch, inputs: DenoiserInputs) -> dict[str, torch.Tensor]:
    out = {name: getattr(noised, name) for name in _NOISED}
    out.update({name: getattr(inputs, name) for name in _CONDITIONING})
    return {name: t for name, t in out.items() if t is not None}


def _signature(tensors: dict[str, torch.Tensor]) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype) for name, t in tensors.items())


def _describe(tensors: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items())
