"""Training nodes: queue a LoRA or full fine-tune in the background, watch it, stop it.

*Train* nodes build a :class:`trainer.config.TrainConfig` from their widgets (derived from the
config through :mod:`.widgets`, so defaults, limits and tooltips are declared once), hand it to
the pack's run manager and return an ``FT_RUN`` at once: the ComfyUI queue stays free for other
prompts while the run trains. They re-run on every queue, but the manager never starts a second
copy of a run: a run that is queued or running is returned as is, a finished one is reused, and
a stopped or failed one resumes from its last checkpoint. Changing a setting of an existing run
is refused with a message that says to choose another run name. A Train node shows the settings
most runs change; the rest are advanced (folded on the canvas by ``web/compact_nodes.js``), and
the widget order never changes, because saved graphs restore widget values by position.
"""

from __future__ import annotations

import copy
import dataclasses
import time

from comfy_api.latest import io, ui
from PIL import Image, ImageDraw

from ..trainer.config import DatasetSpec, Method, TrainConfig
from ..trainer.options import option_info
from ..trainer.plot import loss_curve_image
from ..trainer.runfolder import RunPathError, sanitize_run_name
from ..trainer.runs import RunHandle, RunInfo, RunNotFound, RunStateError
from . import host
from .images import pil_to_image
from .memory_preview import memory_line
from .types import CATEGORY, FtDataset, FtRun
from .widgets import inputs_for, values_to_config, widget_names

TRAIN_CATEGORY = f"{CATEGORY}/train"
NONE = "(none)"

# Widget order. Saved graphs store widget values by position (the frontend's default restore),
# so this order never changes: the head lists below come first, then every other TrainConfig widget
# in declaration order, then the options added after workflows were shared (_APPENDED), last.
_LORA_HEAD = [
    "run_name", "lora_rank", "lora_alpha", "lora_targets", "learning_rate", "lr_scheduler", "lr_warmup",
    "optimizer", "batch_size", "epochs", "max_steps", "resolution", "mixed_precision",
    "gradient_checkpointing", "checkpoint_every", "validation_prompts", "validation_every", "seed",
]  # fmt: skip
_FULL_HEAD = [
    "run_name", "learning_rate", "lr_scheduler", "lr_warmup", "optimizer", "batch_size", "epochs", "max_steps",
    "resolution", "mixed_precision", "gradient_checkpointing", "train_text_encoder", "checkpoint_every",
    "keep_checkpoints", "validation_prompts", "validation_every", "seed",
]  # fmt: skip
# New options go here (and into the shown sets below if most runs set them), never in the middle.
_APPENDED = ["memory_mode"]
# What a fresh Train node shows: what most runs set. Every other widget is advanced: the pack's
# web extension hides it on the canvas until "Show Advanced" (node menu), and the node's panel lists
# it under advanced inputs. Names TrainConfig does not have (yet) are skipped.
_LORA_SHOWN = {
    "run_name", "lora_rank", "lora_alpha", "learning_rate", "batch_size", "epochs", "max_steps", "resolution",
    "checkpoint_every", "validation_prompts", "validation_every", "memory_mode",
}  # fmt: skip
_FULL_SHOWN = (_LORA_SHOWN - {"lora_rank", "lora_alpha"}) | {"train_text_encoder"}
# Filled by the node itself from its model inputs, never typed.
_NODE_FILLED = {"base_model", "method", "clip_l", "clip_g", "t5xxl"}
_LORA_ONLY = {"lora_rank", "lora_alpha", "lora_dropout", "lora_targets"}
_TOOLTIPS = {f.name: option_info(f).tooltip for f in dataclasses.fields(TrainConfig)}


def _option_order(head: list[str], *, exclude: set[str], appended: list[str] = _APPENDED) -> list[str]:
    """The TrainConfig widgets of a Train node in their stored order (see ``_LORA_HEAD``).

    Args:
        appended: options added after the node first shipped, last in the order they came.
    """
    known = [n for n in widget_names(TrainConfig) if n not in exclude and n not in _NODE_FILLED]
    appended = [n for n in appended if n in known]
    rest = [n for n in known if n not in head and n not in appended]
    return [*head, *rest, *appended]


def _option_inputs(
    head: list[str],
    shown: set[str],
    *,
    exclude: set[str],
    overrides: dict[str, dict],
    appended: list[str] = _APPENDED,
) -> list[io.Input]:
    """The TrainConfig widgets of a Train node, in stored order; those not in ``shown`` advanced."""
    names = _option_order(head, exclude=exclude, appended=appended)
    merged = {n: dict(overrides.get(n, {})) for n in names}
    for name in names:
        merged[name]["advanced"] = name not in shown or None
    return inputs_for(TrainConfig, names, overrides=merged)


def _model_inputs(*, full: bool) -> list[io.Input]:
    """Combos of ComfyUI's model lists (read each time the schema is built, so new files show up)."""
    checkpoints = host.get_filename_list("checkpoints")
    encoders = [NONE, *host.get_filename_list("text_encoders")]
    inputs = [
        io.Combo.Input(
            "ckpt_name", options=[*checkpoints, NONE], default=checkpoints[0] if checkpoints else NONE,
            tooltip="The base model to train, from ComfyUI's checkpoints folders (SD1.5, SDXL or SD3 single files).",
        ),
        io.Combo.Input(
            "diffusers_model", options=[NONE, *host.diffusers_model_names()], default=NONE, advanced=True,
            tooltip="Train a diffusers model folder (ComfyUI's models/diffusers) instead of ckpt_name.",
        ),
    ]  # fmt: skip
    if full:
        inputs.append(
            io.Combo.Input(
                "unet_name", options=[NONE, *host.get_filename_list("diffusion_models")], default=NONE,
                tooltip="Train this diffusion-model file (ComfyUI's diffusion_models; e.g. an SD3 file without "
                "text encoders: pick clip_l, clip_g and t5xxl too) instead of ckpt_name.",
            )
        )  # fmt: skip
    for name in ("clip_l", "clip_g", "t5xxl"):
        tooltip = f"{_TOOLTIPS[name]} From ComfyUI's clip folders."
        inputs.append(io.Combo.Input(name, options=encoders, default=NONE, advanced=True, tooltip=tooltip))
    return inputs


def _base_model(node: str, ckpt_name: str, diffusers_model: str, unet_name: str = NONE) -> str:
    """The full path of the chosen base model; a diffusers folder or diffusion model beats ckpt_name.

    Raises:
        ValueError: no model chosen, or the chosen one is gone (naming the node, input and value).
    """
    try:
        if unet_name != NONE:
            return str(host.get_full_path("diffusion_models", unet_name))
        if diffusers_model != NONE:
            return str(host.resolve_diffusers_model(diffusers_model))
        if ckpt_name == NONE:
            raise ValueError(
                "ckpt_name is (none): choose a checkpoint to train, or a diffusers_model / unet_name"
            )
        return str(host.get_full_path("checkpoints", ckpt_name))
    except (FileNotFoundError, host.UnsafePathError, ValueError) as e:
        raise ValueError(f"{node}: {e}") from None


def build_config(
    *,
    node: str,
    method: Method,
    dataset: DatasetSpec,
    base_model: str,
    encoders: dict[str, str],
    values: dict,
) -> TrainConfig:
    """A validated TrainConfig from a Train node's widgets, with ComfyUI's folders filled in.

    Raises:
        ValueError: a widget value the config refuses, naming the node and the widget.
    """
    if not isinstance(dataset, DatasetSpec) or not dataset.parts:
        raise ValueError(f"{node}: the dataset is empty; connect a Load Dataset node to 'dataset'")
    filled = {
        **values,
        "method": method.value,
        "base_model": base_model,
        "output_dir": str(host.output_directory()),
        "tokenizer_dir": str(host.comfy_tokenizer_dir()),
        "dataset": copy.deepcopy(dataset),  # ComfyUI shares cached outputs between nodes
    }
    for name, choice in encoders.items():
        filled[name] = "" if choice == NONE else str(host.get_full_path("text_encoders", choice))
    return values_to_config(TrainConfig, filled, node=node)


def submit(config: TrainConfig) -> RunHandle:
    """Queue ``config`` on the pack's run manager (or get the run already under that name)."""
    from .extension import running_service

    try:
        return running_service().manager.submit(config)
    except RunStateError as e:
        raise ValueError(str(e)) from None


def _handle_text(handle: RunHandle, method: Method) -> str:
    loader = "Load LoRA" if method == Method.LORA else "Load Diffusion Model"
    lines = [f"run '{handle.name}': {handle.note}"]
    if handle.already_running:
        lines.append("The run was not started a second time; this node returns the running one.")
    lines += [
        f"folder: {handle.folder}",
        f"checkpoints appear in {loader} as {handle.name}-stepNNNNN.safetensors",
    ]
    return "\n".join(lines)


class _TrainNode(io.ComfyNode):
    """What the Train nodes share: the run-name check, re-running on every queue, submitting."""

    METHOD = Method.LORA
    DISPLAY = ""

    @classmethod
    def validate_inputs(cls, run_name: str) -> bool | str:
        try:
            sanitize_run_name(run_name)
        except RunPathError as e:
            return f"{e} (the run name becomes the folder <output>/finetune/<run_name>)"
        return True

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> int:
        # Re-run on every queue: the manager decides whether anything new starts.
        return time.time_ns()

    @classmethod
    def _queue(
        cls, dataset: DatasetSpec, base_model: str, encoders: dict[str, str], values: dict
    ) -> io.NodeOutput:
        config = build_config(
            node=cls.DISPLAY,
            method=cls.METHOD,
            dataset=dataset,
            base_model=base_model,
            encoders=encoders,
            values=values,
        )
        handle = submit(config)
        # A run that already started says what it chose (and keeps it on resume); a new one, what
        # it would choose on the GPU as it is now.
        recorded = handle.run_folder.read().get("memory", {}).get("message")
        memory = f"{recorded} (chosen when the run started)" if recorded else memory_line(config)
        text = f"{_handle_text(handle, cls.METHOD)}\n{memory}"
        return io.NodeOutput(handle, text, ui={"text": (text,)})


def _train_outputs() -> list[io.Output]:
    return [
        FtRun.Output(
            "run", tooltip="The run (name and folder), for Run Status, Stop Run and checkpoint sweeps."
        ),
        io.String.Output(
            "message",
            tooltip="What happened: queued, already running, resumed or already finished; and what memory_mode "
            "would choose on this GPU now (the run chooses again when it starts and records it in run.json).",
        ),
    ]


class TrainLoRA(_TrainNode):
    """Queue a LoRA training run in the background and return its handle at once."""

    METHOD = Method.LORA
    DISPLAY = "Train LoRA"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FinetuneTrainLoRA",
            display_name=cls.DISPLAY,
            category=TRAIN_CATEGORY,
            description="Train a LoRA (kohya-format file, loads in Load LoRA) on a dataset in the background. "
            "Returns at once; the queue stays free. Queuing again never starts a second copy of the run.",
            inputs=[
                FtDataset.Input(
                    "dataset", tooltip="The training images and captions (from Load Dataset and friends)."
                ),
                *_model_inputs(full=False),
                *_option_inputs(_LORA_HEAD, _LORA_SHOWN, exclude=set(), overrides={}),
            ],
            outputs=_train_outputs(),
        )

    @classmethod
    def execute(
        cls,
        dataset: DatasetSpec,
        ckpt_name: str,
        diffusers_model: str,
        clip_l: str,
        clip_g: str,
        t5xxl: str,
        **values,
    ) -> io.NodeOutput:
        base = _base_model(cls.DISPLAY, ckpt_name, diffusers_model)
        return cls._queue(dataset, base, {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5xxl}, values)


class TrainFull(_TrainNode):
    """Queue a full fine-tune in the background and return its handle at once."""

    METHOD = Method.FULL
    DISPLAY = "Train Full Fine-tune"

    @classmethod
    def define_schema(cls) -> io.Schema:
        overrides = {
            "run_name": {"default": "my-finetune"},
            "learning_rate": {"default": 1e-5},
            "gradient_checkpointing": {"default": True},
        }
        return io.Schema(
            node_id="FinetuneTrainFull",
            display_name=cls.DISPLAY,
            category=TRAIN_CATEGORY,
            description="Fine-tune the whole denoiser (files load in Load Diffusion Model) in the background. "
            "Returns at once; the queue stays free. Queuing again never starts a second copy of the run.",
            inputs=[
                FtDataset.Input(
                    "dataset", tooltip="The training images and captions (from Load Dataset and friends)."
                ),
                *_model_inputs(full=True),
                *_option_inputs(_FULL_HEAD, _FULL_SHOWN, exclude=_LORA_ONLY, overrides=overrides),
            ],
            outputs=_train_outputs(),
        )

    @classmethod
    def execute(
        cls,
        dataset: DatasetSpec,
        ckpt_name: str,
        diffusers_model: str,
        unet_name: str,
        clip_l: str,
        clip_g: str,
        t5xxl: str,
        **values,
    ) -> io.NodeOutput:
        base = _base_model(cls.DISPLAY, ckpt_name, diffusers_model, unet_name)
        return cls._queue(dataset, base, {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5xxl}, values)


# --------------------------------------------------------------------------------------------
# Watching and stopping


def _manager():
    from .extension import running_service

    return running_service().manager


def _placeholder(text: str, size: tuple[int, int] = (256, 64)) -> Image.Image:
    img = Image.new("RGB", size, (240, 240, 240))
    ImageDraw.Draw(img).text((8, size[1] // 2 - 6), text, fill=(90, 90, 90))
    return img


def format_duration(seconds: float | None) -> str:
    """'1h 02m', '3m 20s', '45s'; '?' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def status_text(info: RunInfo) -> str:
    """The Run Status node's text: state, step/total, loss, learning rate, speed, ETA, message."""
    head = f"run '{info.name}': {info.state}"
    if info.total:
        head += f", step {info.step}/{info.total} ({100 * info.step // info.total} %)"
    elif info.step:
        head += f", step {info.step}"
    lines = [head]
    if info.loss is not None:
        detail = f"loss {info.loss:.4g}"
        if info.lr is not None:
            detail += f", lr {info.lr:.2e}"
        if info.samples_per_s:
            detail += f", {info.samples_per_s:.3g} samples/s"
        if info.state in ("running", "paused"):
            detail += f", ETA {format_duration(info.eta_s)}"
        lines.append(detail)
    if info.message:
        lines.append(info.message)
    return "\n".join(lines)


class RunStatus(io.ComfyNode):
    """Show a run's state, progress, loss curve and newest validation image."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FinetuneRunStatus",
            display_name="Run Status",
            category=TRAIN_CATEGORY,
            description="A run's state, step, loss and ETA, its loss curve and its newest validation image, as of "
            "when the node runs (queue again to refresh; the Finetune panel updates live).",
            is_output_node=True,
            inputs=[FtRun.Input("run", tooltip="The run, from a Train node.")],
            outputs=[
                io.String.Output(
                    "status", tooltip="State, step/total, loss, learning rate, speed and ETA as text."
                ),
                io.Image.Output(
                    "loss_curve", tooltip="The loss per step (grey) and its moving average (blue)."
                ),
                io.Image.Output(
                    "latest_sample",
                    tooltip="The newest validation render (a grey placeholder before the first).",
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> int:
        return time.time_ns()  # the run changes while the graph does not

    @classmethod
    def execute(cls, run: RunHandle) -> io.NodeOutput:
        manager = _manager()
        try:
            info = manager.get(run.name)
        except RunNotFound as e:
            raise ValueError(str(e)) from None
        rows = [r for r in manager.metrics(run.name) if "loss" in r]
        chart = loss_curve_image(
            [int(r["step"]) for r in rows],
            [float(r["loss"]) for r in rows],
            width=512,
            height=256,
            title=f"loss: {run.name}",
        )
        sample_path = run.run_folder.samples_dir / info.latest_sample if info.latest_sample else None
        if sample_path is not None and sample_path.is_file():
            with Image.open(sample_path) as opened:
                sample = opened.convert("RGB")
        else:
            sample = _placeholder("no validation image yet")
        text = status_text(info)
        chart_t, sample_t = pil_to_image(chart), pil_to_image(sample)
        images = (
            ui.PreviewImage(chart_t, cls=cls).as_dict()["images"]
            + ui.PreviewImage(sample_t, cls=cls).as_dict()["images"]
        )
        return io.NodeOutput(text, chart_t, sample_t, ui={"images": images, "text": (text,)})


class StopRun(io.ComfyNode):
    """Stop a run after its current step; its checkpoints are kept and it can be resumed."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FinetuneStopRun",
            display_name="Stop Run",
            category=TRAIN_CATEGORY,
            description="Stop a queued or running run after its current step. Checkpoints already saved are kept; "
            "queuing its Train node again resumes it from the last one.",
            is_output_node=True,
            inputs=[FtRun.Input("run", tooltip="The run to stop, from a Train node.")],
            outputs=[io.String.Output("message", tooltip="What happened to the run.")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> int:
        return time.time_ns()

    @classmethod
    def execute(cls, run: RunHandle) -> io.NodeOutput:
        try:
            info = _manager().stop(run.name)
            text = f"run '{run.name}': {info.state}. {info.message}"
        except RunStateError as e:
            text = f"nothing to stop: {e}"
        except RunNotFound as e:
            raise ValueError(str(e)) from None
        return io.NodeOutput(text, ui={"text": (text,)})


TRAIN_NODES = [TrainLoRA, TrainFull, RunStatus, StopRun]
