"""Where and how a run computes: device, precision, autocast, gradient scaling and, under
``accelerate launch``, the other processes.

A single process (the CLI, or a run-manager thread inside ComfyUI) uses plain torch: accelerate's
state is a process-wide singleton that refuses a second run with another precision, and ComfyUI
runs many trainings in one process. Under ``accelerate launch``/``torchrun`` (``WORLD_SIZE`` > 1)
an ``accelerate.Accelerator`` sets up the process group and wraps the denoiser in DDP.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..config import Precision

log = logging.getLogger("finetune")

_DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16, Precision.FP32: torch.float32}


def launched_world_size() -> int:
    """Processes started by ``accelerate launch`` / ``torchrun`` (1 when run directly)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def pick_device(device: str | None) -> torch.device:
    """``device`` if given, else the first CUDA device, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def effective_precision(precision: Precision | str, device: torch.device) -> Precision:
    """The precision a run really uses: fp32 on the CPU (half-precision CPU training is slow and
    inexact), bf16 falls back to fp16 on GPUs without bf16."""
    precision = Precision(precision)
    if device.type != "cuda":
        if precision != Precision.FP32:
            log.info(
                "finetune: training on %s in fp32 (mixed precision %s is for GPUs)", device, precision.value
            )
        return Precision.FP32
    if precision == Precision.BF16 and not torch.cuda.is_bf16_supported():
        log.warning("finetune: this GPU has no bf16; using fp16 mixed precision instead")
        return Precision.FP16
    return precision


class Runtime:
    """Device, precision and process group of one run.

    Attributes:
        device: where the denoiser trains.
        precision: the effective mixed precision.
        compute_dtype: dtype of the frozen weights and of autocast (fp32 = no autocast).
        rank, world_size: this process and how many train together.
    """

    def __init__(self, *, precision: Precision | str, device: str | None = None):
        self.world_size = launched_world_size()
        self.accelerator = None
        if self.world_size > 1:
            from accelerate import Accelerator

            mp = Precision(precision)
            if not torch.cuda.is_available():
                # accelerate only joins CPU processes into a group when told to (torchrun sets no flag).
                os.environ.setdefault("ACCELERATE_USE_CPU", "1")
            # Accumulation is done by hand (ragged epoch ends), so accelerate accumulates nothing.
            self.accelerator = Accelerator(
                mixed_precision="no" if mp == Precision.FP32 else mp.value, gradient_accumulation_steps=1
            )
            if self.accelerator.num_processes != self.world_size:
                raise RuntimeError(
                    f"WORLD_SIZE is {self.world_size} but accelerate set up {self.accelerator.num_processes} process(es); "
                    "start multi-GPU runs with 'accelerate launch --num_processes N -m trainer train run.json'"
                )
            self.device = self.accelerator.device
            self.rank = self.accelerator.process_index
        else:
            self.device = pick_device(device)
            self.rank = 0
            if self.device.type == "cuda" and self.device.index is not None:
                torch.cuda.set_device(self.device)  # per thread: a run-manager thread owns its GPU
        self.precision = effective_precision(precision, self.device)
        self.compute_dtype = _DTYPES[self.precision]
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == Precision.FP16 else None

    @property
    def is_main(self) -> bool:
        """Only the main process writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == Precision.FP32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP-wrap the trained model when distributed; the model itself otherwise."""
        if self.accelerator is None:
            return model
        return self.accelerator.prepare_model(model)

    def share(self, model: nn.Module) -> nn.Module:
        """Give every process rank 0's weights without wrapping the model in DDP (CUDA-graph steps
        reduce their gradients themselves); the model itself when not distributed."""
        if self.accelerator is None:
            return model
        for tensor in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        if self.accelerator is None:
            return model
        return self.accelerator.unwrap_model(model)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, *, sync: bool) -> Iterator[None]:
        """Skip DDP's gradient all-reduce on accumulation micro-batches (all but the last)."""
        if self.accelerator is None or sync or not hasattr(model, "no_sync"):
            yield
            return
        with model.no_sync():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        """Average gradients DDP does not own (trained text encoders) over the processes."""
        if not self.distributed:
            return
        for t in tensors:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
            t.div_(self.world_size)

    def mean_over_processes(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], device=self.device, dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return float(t.item()) / self.world_size

    def any_over_processes(self, flag: bool) -> bool:
        """True on every process if ``flag`` is True on any (a stop asked on rank 0 stops all)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def clip_gradients(
        self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], *, max_grad_norm: float
    ) -> float | None:
        """Unscale (fp16) and clip; returns the total gradient norm before clipping, or None when
        clipping is off."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if max_grad_norm <= 0:
            return None
        return float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))

    def step(self, optimizer: torch.optim.Optimizer, *, zero_grad: Callable[[], None] | None = None) -> None:
        """Apply the update (the fp16 scaler skips steps with inf gradients) and clear gradients.

        Args:
            zero_grad: clears the gradients instead of ``optimizer.zero_grad(set_to_none=True)``
                (CUDA graphs keep gradients in buffers they write to).
        """
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        if zero_grad is not None:
            zero_grad()
        else:
            optimizer.zero_grad(set_to_none=True)

    def wait_for_everyone(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def memory_reserved(self) -> int:
        """Bytes the CUDA caching allocator holds on this device (0 on the CPU)."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_reserved(self.device))
        return 0

    def memory_allocated(self) -> int:
        """Bytes of live tensors on this device (0 on the CPU)."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return 0

    def memory_cached(self) -> int:
        """Bytes the allocator holds beyond the live tensors: free blocks it keeps for reuse."""
        return max(0, self.memory_reserved() - self.memory_allocated())

    def empty_cache(self) -> None:
        """Give the allocator's unused blocks back to the driver (a no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def peak_memory(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return 0

    def end(self) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()
