"""The training loop: ``train(config) -> RunResult``.

Order of a run: check and ready the run folder (see :mod:`.resume`: a refused resume writes
nothing, stale temporaries go, the config is recorded) -> free host memory -> fit the card
(``memory_mode``: read the free VRAM, choose the memory savers, or refuse a card too small, see
:mod:`.fitting`) -> load the model -> scan the dataset, assign buckets, make the plan -> the inputs
(a file-loaded model fills its caches here, after which its VAE and text encoders leave the GPU,
:mod:`.offload`) -> add LoRA or unfreeze -> write run.json -> (validation at step 0) -> steps, with
checkpoints, resume state, pruning and validation on their cadences -> the final checkpoint.

The loop talks to the model only through :class:`.denoiser.TrainableDenoiser` (prepare,
objective, predict, inputs, save, render): a diffusers model loaded from a file, or a model the host
already holds (ComfyUI's MODEL, whose backend lives in ``nodes/``) train through the same steps.

Between steps the loop checks the user's commands (stop, pause) and, if asked, waits while the
host (ComfyUI) is busy. Every failure ends the run with one clear message (see
:mod:`.failures`); ``train`` never raises for them.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import math
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..checkpoints import CheckpointStore
from ..config import MemoryMode, TrainConfig
from ..models.bundle import ModelBundle
from ..options import to_dict, validate
from ..planning import plan_run, scan_for_run
from ..plot import plot_metrics
from ..runfolder import RunFolder
from .batches import StepBatches, epoch_steps
from .caching import cache_root
from .denoiser import TrainableDenoiser, as_trainable
from .events import Callbacks, Commands, FanOutCallbacks, HostHooks, Progress, RunState
from .failures import NonFiniteLoss, RunRefused, failure_message, is_oom, writing
from .fitting import free_gpu_memory, peek_arch, plan_memory
from .graphs import skips_on_device
from .inputs import Prefetcher
from .memory import MemoryPlan
from .optim import OptimizerSettings, build_optimizer, build_schedule, param_groups
from .resume import check_start, prepare_folder
from .runtime import Runtime
from .saving import CheckpointContext, DatasetSummary
from .setup import load_model
from .state import Position, latest_state, load_state, save_state
from .validation import save_samples

log = logging.getLogger("finetune")

_BUSY_POLL_S = 0.1
_RESERVE_DELTA = 64 * 2**20  # report GPU memory changes of 64 MiB or more to the host


@dataclass
class RunResult:
    """How a run ended.

    Attributes:
        state: FINISHED, STOPPED or FAILED.
        final_checkpoint: the newest checkpoint written (None if none was).
        step: optimizer steps done.
        message: why it ended ("finished", the failure's message...).
        run_dir: the run folder.
    """

    state: RunState
    final_checkpoint: str | None
    step: int
    message: str = ""
    run_dir: str = ""


def train(
    config: TrainConfig,
    *,
    callbacks: Callbacks | None = None,
    commands: Commands | None = None,
    host: HostHooks | None = None,
    resume: bool = False,
    device: str | None = None,
    model_loader: Callable[[TrainConfig], ModelBundle | TrainableDenoiser] | None = None,
) -> RunResult:
    """Train one run to its end (or until stopped) and say how it ended.

    Args:
        config: the run.
        callbacks: receive state changes, progress, samples and checkpoints.
        commands: stop / pause flags, checked between steps.
        host: the host's hooks (free memory, memory reservation, busy flag).
        resume: continue from the run's latest resume state.
        device: "cuda:1", "cpu", ...; default the first GPU, else the CPU.
        model_loader: loads the base model (default: from ``config.base_model``); hosts that
            already hold the model, and tests, pass their own. It returns a ModelBundle (diffusers
            backend) or any :class:`~.denoiser.TrainableDenoiser`.

    Returns:
        A :class:`RunResult`; failures are returned as FAILED with their message, not raised.
    """
    run = _Run(
        config,
        callbacks=callbacks,
        commands=commands or Commands(),
        host=host or HostHooks(),
        resume=resume,
        device=device,
        model_loader=model_loader,
    )
    try:
        return run.run()
    finally:
        del run
        _free_what_the_run_held()


def _free_what_the_run_held() -> None:
    """Free the ended run's model, optimizer and caches now and hand the GPU's cached blocks back.

    The run's objects form reference cycles (callbacks bound to it), which Python frees only when
    its cycle collector next runs: inside ComfyUI a run started right after another could find the
    last one's model still on the GPU (an SDXL UNet: 5 GiB) and pick leaner settings for it.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def library_versions() -> dict[str, str]:
    """Versions that decide whether a run reproduces: python, torch, diffusers, peft, transformers."""
    import diffusers
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
    }


def batch_loss(model: TrainableDenoiser, objective, inputs, *, generator: torch.Generator) -> torch.Tensor:
    """Per-sample losses of one micro-batch (one name for the step's forward pass, whatever the backend)."""
    return model.loss(objective, inputs, generator=generator)


def step_seed(seed: int, *, rank: int, step: int) -> int:
    """The noise seed of one optimizer step on one rank (a hash, so neighbours are unrelated)."""
    digest = hashlib.sha256(f"noise:{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class _Run:
    """One call of :func:`train`; holds what the steps share."""

    def __init__(self, config, *, callbacks, commands, host, resume, device, model_loader):
        self.config: TrainConfig = config
        self.user_config: TrainConfig = config  # what run.json records; self.config is what trains
        self.memory: MemoryPlan | None = None
        self.cb = FanOutCallbacks(callbacks) if callbacks is not None else FanOutCallbacks()
        self.commands: Commands = commands
        self.host: HostHooks = host
        self.resume = resume
        self.device = device
        self.model_loader = model_loader
        self.folder = RunFolder.for_run(config.output_dir, config.run_name)
        self.name = self.folder.name
        self.store = CheckpointStore(self.folder.path, self.name)
        self.step = 0
        self.last_saved = -1
        self.last_checkpoint: str | None = None
        self.resolution = config.resolution or 0
        self.runtime: Runtime | None = None
        self.model: TrainableDenoiser | None = None
        self.reserved_reported: int | None = None
        self.lent = 0  # GPU bytes the run gave back to the host while it waited, to take back
        self.stepped = False  # whether a step ran in this process (its working set is known)
        self.prefetch: Prefetcher | None = None
        self.graphs = None
        self.position = Position(step=0, epoch=1, step_in_epoch=0)

    # -------------------------------------------------------------------------------------------
    # Entry

    def run(self) -> RunResult:
        try:
            return self._run()
        except KeyboardInterrupt:
            self._end(
                RunState.INTERRUPTED,
                f"interrupted at step {self.step}; resume to continue from the last checkpoint",
            )
            raise
        except Exception as e:  # every failure ends the run with a message; nothing escapes
            message = failure_message(
                e,
                step=self.step + 1,
                batch_size=self.config.batch_size,
                resolution=self.resolution,
                output_dir=self.config.output_dir,
            )
            if message.startswith("unexpected error"):
                log.exception("finetune: run %s failed", self.name)
            else:
                log.error("finetune: run %s failed: %s", self.name, message)
            if is_oom(e) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            # A refused start leaves the folder of the run it would have harmed as it was.
            return self._end(RunState.FAILED, message, record=not isinstance(e, RunRefused))
        finally:
            self.host.reserve(0)
            if self.runtime is not None:
                self.runtime.end()
            if self.prefetch is not None:
                self.prefetch.close()
            if self.model is not None:
                self.model.release()

    def _end(self, state: RunState, message: str, *, record: bool = True) -> RunResult:
        if record and (self.runtime is None or self.runtime.is_main):
            try:
                self.folder.set_status(
                    state.value, message, step=self.step, final_checkpoint=self.last_checkpoint
                )
            except OSError as e:  # a full disk must not hide the run's own message
                log.error("finetune: could not record the end of run %s in run.json: %s", self.name, e)
        self.cb.on_state(self.name, state, message)
        return RunResult(
            state=state,
            final_checkpoint=self.last_checkpoint,
            step=self.step,
            message=message,
            run_dir=str(self.folder.path),
        )

    def _status(self, state: RunState, message: str = "", **fields) -> None:
        if self.runtime.is_main:
            self.folder.set_status(state.value, message, step=self.step, **fields)
        self.cb.on_state(self.name, state, message)

    # -------------------------------------------------------------------------------------------
    # Setup

    def _run(self) -> RunResult:
        cfg = self.config
        validate(cfg)
        self.runtime = rt = Runtime(precision=cfg.mixed_precision, device=self.device)
        state_path = latest_state(self.folder.state_dir) if self.resume else None
        check_start(self.folder, self.store, cfg, resume=self.resume, state_path=state_path)
        if self.resume and state_path is None:
            log.warning("finetune: run %s has no resume state yet; starting from step 0", self.name)
        if rt.is_main:
            prepare_folder(self.folder, cfg, state_path=state_path)
        self._status(RunState.RUNNING, "loading the model")

        self.host.free_memory()
        resuming = state_path is not None
        arch = peek_arch(cfg)
        if arch is not None:  # refuse a card too small before loading anything
            cfg = self._fit(arch, resuming=resuming)
        self.model = model = as_trainable((self.model_loader or load_model)(cfg))
        if self.memory is None and model.memory_arch is not None:
            cfg = self._fit(model.memory_arch, resuming=resuming)
        self.resolution = cfg.resolution or model.native_resolution

        dataset = scan_for_run(cfg, self.resolution)
        run_plan = plan_run(cfg, dataset, resolution=self.resolution, num_processes=rt.world_size)
        buckets, plan = run_plan.item_buckets, run_plan.plan
        self.dataset, self.buckets, self.plan = dataset, buckets, plan
        # Inputs before the denoiser reaches the GPU: a model whose caches can be filled up front
        # does so here, and its VAE and text encoders (SD3's T5 alone is 8.9 GiB) then wait on the
        # CPU for validation renders instead of sharing the GPU with the steps.
        self.inputs = model.input_builder(
            cfg,
            dataset=dataset,
            buckets=buckets,
            runtime=rt,
            park_encoders=not self._keeps_encoders(),
            on_state=lambda message: self.cb.on_state(self.name, RunState.RUNNING, message),
            on_move=self._reserve,
        )
        trainables = model.prepare(
            cfg,
            rt,
            cache_dir=cache_root(cfg.output_dir) / "compile",
            memory=self.memory.settings if self.memory is not None else None,
        )
        self.trainables = trainables
        self.graphs = model.graphs
        self._reserve()

        started_at = time.time()
        if rt.is_main:
            previous = self.folder.read()
            started_at = previous.get("started_at", started_at) if resuming else started_at
            fitted = {"memory": self.memory.to_dict()} if self.memory is not None else {}
            self.folder.update(
                config=to_dict(self.user_config),
                **fitted,
                plan=plan.to_dict(),
                versions=library_versions(),
                started_at=started_at,
                model=model.run_info(),
                buckets={f"{w}x{h}": n for (w, h), n in run_plan.bucket_counts.items()},
                device=str(rt.device),
                precision=rt.precision.value,
                speed=model.speed_report(),
                num_processes=rt.world_size,
            )

        groups = param_groups(
            denoiser_params=trainables.denoiser,
            text_params=trainables.text,
            lr=cfg.learning_rate,
            text_lr=cfg.text_encoder_lr,
        )
        settings = OptimizerSettings(
            lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            device_type=rt.device.type,
        )
        self.optimizer = build_optimizer(cfg.optimizer, groups, settings)
        self.scheduler = build_schedule(
            cfg.lr_scheduler,
            self.optimizer,
            warmup_steps=plan.warmup_steps,
            total_steps=plan.total_steps,
            num_cycles=cfg.lr_num_cycles,
            power=cfg.lr_power,
        )
        self.objective = model.objective(cfg)
        # The seed drives LoRA init (in prepare_trainables), data order, noise and dropout.
        torch.manual_seed(cfg.seed + rt.rank)
        random.seed(cfg.seed + rt.rank)
        self.noise = torch.Generator(device="cpu")

        self.prefetch = Prefetcher(self.inputs, workers=cfg.dataloader_workers)
        self.ckpt_ctx = CheckpointContext(
            config=cfg,
            bundle=getattr(model, "bundle", None),
            plan=plan,
            summary=DatasetSummary.of(dataset, buckets),
            started_at=started_at,
            num_processes=rt.world_size,
        )

        position = Position(step=0, epoch=1, step_in_epoch=0)
        if state_path is not None:
            position = load_state(
                state_path,
                params=trainables.named,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                noise_generator=self.noise,
            )
            self.step = self.last_saved = position.step
            self.position = position
            latest = self.store.latest()
            self.last_checkpoint = (
                str(latest.path) if latest is not None and latest.path is not None else None
            )
            log.info(
                "finetune: run %s resumes at step %d (epoch %d)", self.name, position.step, position.epoch
            )
        resumed = f"resumed at step {self.step}" if self.step else ""
        fitted = self.memory.message if self.memory is not None else ""
        self._status(RunState.RUNNING, "; ".join(m for m in (resumed, fitted) if m), total=plan.total_steps)
        if self.step == 0 and cfg.validation_at_start and cfg.validation_prompts:
            self._validate(0)
        return self._loop(position)

    def _fit(self, arch, *, resuming: bool) -> TrainConfig:
        """Choose the memory plan (the recorded one on resume) and return the config to train with."""
        cfg = self.user_config
        recorded = self.folder.read().get("memory") if resuming else None
        if resuming and not recorded:  # a run from before memory_mode: keep its settings exactly
            cfg = dataclasses.replace(cfg, memory_mode=MemoryMode.OFF)
        free = free_gpu_memory(self.runtime.device, self.host)
        self.memory = plan_memory(cfg, arch, free=free, device=self.runtime.device, recorded=recorded)
        log.info("finetune: run %s: %s", self.name, self.memory.message)
        self.config = self.memory.apply(self.user_config)
        return self.config

    def _keeps_encoders(self) -> bool:
        """Whether the VAE and text encoders simply stay on the GPU (memory_mode off, and several
        processes, whose ranks filling one disk cache at once would race on its files)."""
        return self.config.memory_mode == MemoryMode.OFF or self.runtime.distributed

    # -------------------------------------------------------------------------------------------
    # The loop

    def _loop(self, position: Position) -> RunResult:
        cfg, rt, plan = self.config, self.runtime, self.plan
        total = plan.total_steps
        t0, s0 = time.perf_counter(), self.step
        last_time = t0
        for epoch in range(position.epoch, plan.epochs + 1):
            steps = epoch_steps(
                self.dataset,
                self.buckets,
                epoch=epoch,
                seed=cfg.seed,
                batch_size=cfg.batch_size,
                gradient_accumulation=cfg.gradient_accumulation,
                num_processes=rt.world_size,
                rank=rt.rank,
                skip=position.step_in_epoch if epoch == position.epoch else 0,
            )
            for i, batch in enumerate(steps):
                if self.step >= total:
                    break
                if self._wait_between_steps():
                    return self._stop()
                images = self.prefetch.take(batch)
                if i + 1 < len(steps) and self.step + 1 < total:
                    self.prefetch.submit(steps[i + 1])
                loss = self._train_step(batch, images)
                self.step += 1
                self.stepped = True
                self.position = Position(step=self.step, epoch=epoch, step_in_epoch=batch.index + 1)
                now = time.perf_counter()
                self._report(
                    loss,
                    epoch,
                    batch.num_samples * rt.world_size / max(now - last_time, 1e-9),
                    (now - t0) / (self.step - s0),
                )
                last_time = now
                if self.step % plan.checkpoint_every == 0 or self.step == total:
                    self._checkpoint(self._epochs_done())
                if cfg.validation_prompts and self.step % plan.validation_every == 0:
                    self._validate(self.step)
                    last_time = time.perf_counter()
            if self.step >= total:
                break
        if self.last_saved != self.step:
            self._checkpoint(self._epochs_done())
        self._write_loss_plot()
        if self.graphs is not None:
            st = self.graphs.stats
            log.info(
                "finetune: CUDA graphs: %d captured, %d micro-batches replayed, %d eager%s",
                st.captured,
                st.replayed,
                st.eager,
                f" ({st.disabled})" if st.disabled else "",
            )
        return self._end(RunState.FINISHED, f"finished {self.step} steps")

    def _wait_between_steps(self) -> bool:
        """Honour pause and host-busy waits; returns True when the run must stop."""
        rt = self.runtime
        while True:
            if rt.any_over_processes(self.commands.stop_requested):
                return True
            if self.commands.paused:
                self._status(RunState.PAUSED, f"paused at step {self.step}")
                self._lend_memory()
                while not self.commands.wait_while_paused(timeout=1.0):
                    pass
                if not self.commands.stop_requested:
                    self._status(RunState.RUNNING, f"continuing from step {self.step}")
                continue
            if self.config.pause_while_host_busy and self.host.is_busy():
                self.cb.on_state(self.name, RunState.PAUSED, "waiting while ComfyUI runs a prompt")
                self._lend_memory()
                while self.host.is_busy() and not self.commands.stop_requested and not self.commands.paused:
                    time.sleep(_BUSY_POLL_S)
                self.cb.on_state(self.name, RunState.RUNNING, "")
                continue
            if not self._take_back_memory():
                time.sleep(_BUSY_POLL_S)
                continue
            return False

    def _lend_memory(self) -> None:
        """While the run waits, its cached GPU blocks go back to the driver and the host stops
        keeping room for them, so a prompt renders with all the memory the run does not hold or
        cannot release."""
        rt = self.runtime
        working_set = rt.memory_reserved()
        if working_set == 0:  # the CPU
            return
        if not self.stepped and self.memory is not None:
            # Not grown to its working set yet: the plan's estimate stands in for the first step.
            working_set = max(working_set, self.memory.after)
        rt.empty_cache()
        # What empty_cache cannot release stays reserved: the private pools of the run's CUDA graphs
        # (a step's activations between replays) and the free parts of segments live tensors split.
        # The host would count those as free, yet a prompt cannot allocate from them.
        kept = rt.memory_cached()
        self.host.reserve(kept)
        self.reserved_reported = kept
        lent = max(0, working_set - rt.memory_reserved())
        self.lent += lent
        log.info("finetune: run %s lends %.0f MiB of GPU memory while it waits", self.name, lent / 2**20)

    def _take_back_memory(self) -> bool:
        """Before the next step: have the host free what the run lent (unloading the prompts'
        models if it must) and keep it free again, so the step finds its working set. False when
        the host cannot yet (a prompt started meanwhile)."""
        if self.lent == 0:
            return True
        if not self.host.make_room(self.lent, keep=self.model.host_models()):
            return False
        log.info("finetune: run %s took back %.0f MiB of GPU memory", self.name, self.lent / 2**20)
        self.reserved_reported = (self.reserved_reported or 0) + self.lent
        self.host.reserve(self.reserved_reported)
        self.lent = 0
        return True

    def _train_step(self, batch: StepBatches, images: list) -> float:
        """Forward and backward over the step's micro-batches, then one optimizer step.

        Args:
            batch: the step's micro-batches.
            images: their prepared images (from the prefetcher), one list per micro-batch.

        Raises:
            NonFiniteLoss: before the update, so no NaN reaches the weights.
        """
        cfg, rt = self.config, self.runtime
        n = len(batch.micro_batches)
        step_no = self.step + 1
        # Noise is seeded per (seed, rank, step): every rank resumes its own stream exactly.
        self.noise.manual_seed(step_seed(cfg.seed, rank=rt.rank, step=step_no))
        self.model.before_step()
        graphs = self.graphs
        losses = []
        for j, micro in enumerate(batch.micro_batches):
            inputs = self.inputs.build(micro, images[j])
            if graphs is not None:
                # Same draws, in the same order, as batch_loss: the noise stream does not depend
                # on whether the step is a graph.
                noised = self.objective.noised(inputs.latents, generator=self.noise)
                loss = graphs.forward_backward(noised, inputs, divisor=n)
            else:
                with rt.no_sync(self.model.sync_module(), sync=j == n - 1):
                    with rt.autocast():
                        loss = batch_loss(self.model, self.objective, inputs, generator=self.noise).mean()
                    rt.backward(loss / n)
            losses.append(loss.detach() / n)
        if graphs is not None and skips_on_device(self.optimizer):
            return self._update_queued(step_no, torch.stack(losses).sum())
        # One device sync a step: the loss is checked before the update, so a NaN never reaches
        # the weights (only this step's gradients, which are dropped with the run).
        total = float(torch.stack(losses).sum())
        if rt.any_over_processes(not math.isfinite(total)):
            raise NonFiniteLoss(step_no, total, precision=rt.precision.value)
        if graphs is not None:
            graphs.all_reduce_mean(rt.world_size)  # the graphs bypass DDP's own all-reduce
        else:
            rt.all_reduce_mean([p.grad for p in self.trainables.text if p.grad is not None])
        norm = rt.clip_gradients(self.optimizer, self.trainables.all, max_grad_norm=cfg.max_grad_norm)
        if norm is not None and rt.scaler is None and not math.isfinite(norm):
            raise NonFiniteLoss(step_no, norm, precision=rt.precision.value, what="gradient norm")
        rt.step(self.optimizer, zero_grad=graphs.zero_grad if graphs is not None else None)
        self.scheduler.step()
        return rt.mean_over_processes(total)

    def _update_queued(self, step_no: int, total: torch.Tensor) -> float:
        """The update of a graph step, queued before the host waits for the loss.

        Waiting for the loss first (as the eager step does) leaves the GPU idle while Python
        clips and steps over a thousand LoRA tensors. Here the finiteness check is a device flag
        the fused optimizer reads (it skips the update when set), so the host queues clipping
        and the update behind the backward pass and then waits once; a NaN still never reaches
        the weights, and the run ends with the same message.
        """
        cfg, rt, graphs = self.config, self.runtime, self.graphs
        graphs.all_reduce_mean(rt.world_size)
        norm = graphs.clip(cfg.max_grad_norm)
        bad = ~torch.isfinite(total)
        if norm is not None:
            bad |= ~torch.isfinite(norm)
        if rt.distributed:
            bad = bad.float()
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
            bad = bad > 0
        graphs.step(self.optimizer, skip=bad)
        self.scheduler.step()
        loss = float(total)
        if bool(bad):
            if math.isfinite(loss) and norm is not None:
                raise NonFiniteLoss(step_no, float(norm), precision=rt.precision.value, what="gradient norm")
            raise NonFiniteLoss(step_no, loss, precision=rt.precision.value)
        return rt.mean_over_processes(loss)

    def _reserve(self) -> None:
        """Tell the host how much GPU memory to leave free for the run, when it changed noticeably
        (the first steps and validation renders grow the allocator's cache)."""
        # Only the cached blocks: the next step reuses them, yet the host counts them as free. The
        # live tensors (and a ComfyUI MODEL's weights) are already gone from what the host sees as
        # free; reserving them too took them off ComfyUI's budget twice and starved its renders.
        reserved = self.runtime.memory_cached()
        if self.reserved_reported is None or abs(reserved - self.reserved_reported) >= _RESERVE_DELTA:
            self.host.reserve(reserved)
            self.reserved_reported = reserved

    def _report(self, loss: float, epoch: int, samples_per_s: float, seconds_per_step: float) -> None:
        rt = self.runtime
        self._reserve()
        lr = float(self.scheduler.get_last_lr()[0])
        peak = rt.peak_memory()
        eta = (self.plan.total_steps - self.step) * seconds_per_step
        if rt.is_main:
            row = {
                "step": self.step,
                "epoch": epoch,
                "loss": loss,
                "lr": lr,
                "samples_per_s": round(samples_per_s, 4),
                "peak_vram": peak,
                "time": time.time(),
            }
            with writing(self.folder.metrics_path):
                self.folder.append_metrics(row)
        self.cb.on_progress(
            Progress(self.name, self.step, self.plan.total_steps, epoch, loss, lr, samples_per_s, eta, peak)
        )

    # -------------------------------------------------------------------------------------------
    # Checkpoints, validation, stop

    def _checkpoint(self, epochs_done: int) -> None:
        rt = self.runtime
        path = self.store.path_for(self.step)
        if rt.is_main:
            self.model.save_adapter(path, step=self.step, epoch=epochs_done, ctx=self.ckpt_ctx)
            with writing(self.folder.state_dir):
                save_state(
                    self.folder.state_dir,
                    position=self.position,
                    params=self.trainables.named,
                    optimizer=self.optimizer,
                    scheduler=self.scheduler,
                    noise_generator=self.noise,
                )
            self.store.prune(self.config.keep_checkpoints, protect={self.plan.total_steps})
            self.folder.set_status(RunState.RUNNING.value, "", step=self.step, last_checkpoint=str(path))
        rt.wait_for_everyone()
        self.last_saved = self.step
        self.last_checkpoint = str(path)
        self.cb.on_checkpoint(self.name, self.step, str(path))

    def _validate(self, step: int) -> None:
        rt = self.runtime
        if rt.is_main:
            images = self.model.render(
                list(self.config.validation_prompts),
                config=self.config,
                runtime=rt,
                resolution=self.resolution,
            )
            paths = save_samples(self.folder, step, images)
            self.cb.on_sample(self.name, step, paths)
        rt.wait_for_everyone()

    def _epochs_done(self) -> int:
        """Complete epochs at the current position (kohya's ``ss_epoch`` counts finished ones)."""
        p = self.position
        return p.epoch if p.step_in_epoch >= self.plan.steps_per_epoch else p.epoch - 1

    def _stop(self) -> RunResult:
        if self.step > 0 and self.last_saved != self.step:
            self._checkpoint(self._epochs_done())
        self._write_loss_plot()
        why = self.commands.stop_reason or "stopped by the user"
        return self._end(RunState.STOPPED, f"{why} at step {self.step}; resume to continue")

    def _write_loss_plot(self) -> None:
        if self.runtime.is_main:
            with writing(self.folder.path / "loss.png"):
                plot_metrics(
                    self.folder.read_metrics(0), self.folder.path / "loss.png", title=f"{self.name} loss"
                )
