"""Checkpoint nodes: list a run's checkpoints, render a prompt with each, lay the renders out.

- *Run Checkpoints* lists the checkpoints of a run (or of any folder) as ``FT_CHECKPOINTS``: a
  list of :class:`trainer.checkpoints.CheckpointInfo`, ordered base, steps, final. It re-runs
  when a checkpoint is added to the folder.
- *Checkpoint Sweep* renders every prompt (one per line) with every checkpoint at one seed. LoRA
  checkpoints are patched onto the MODEL/CLIP already loaded (the base model is never reloaded);
  full checkpoints are loaded one at a time as diffusion models. The "base" entry renders the
  MODEL as given. Cancel works between renders.
- *Labeled Strip* puts images side by side with a label over each (a grid with row labels when
  there are several prompts).

All ComfyUI calls go through :mod:`.host`; the layout and the checkpoint store live in
``trainer/`` (:mod:`trainer.strip`, :mod:`trainer.checkpoints`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from comfy_api.latest import io, ui

from ..trainer.checkpoints import CheckpointInfo, checkpoint_method, fingerprint, list_checkpoints
from ..trainer.runfolder import RUNS_SUBDIR, RunPathError, list_runs, resolve_inside
from ..trainer.runs import RunHandle
from ..trainer.strip import labeled_strip
from . import host
from .images import image_to_pils, pil_to_image
from .types import CATEGORY, FtCheckpoints, FtRun

log = logging.getLogger("finetune")

CHECKPOINTS_CATEGORY = f"{CATEGORY}/checkpoints"
NONE = "(none)"
#: ComfyUI model folders a typed checkpoint folder may be in (besides the output folder).
_MODEL_FOLDERS = ("loras", "diffusion_models", "checkpoints")


# --------------------------------------------------------------------------------------------
# Helpers (no ComfyUI state)


def run_names() -> list[str]:
    """Runs under ``<output>/finetune/`` (folders with a run.json), sorted; [] outside ComfyUI."""
    try:
        output = host.output_directory()
    except ImportError:  # define_schema called without ComfyUI's folder_paths (schema tests)
        return []
    return [run.name for run in list_runs(output)]


def split_lines(text: str) -> list[str]:
    """One entry per non-empty line, stripped (prompts, labels)."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def checkpoint_folder(run: str, folder: str, train_run: RunHandle | None = None) -> Path:
    """Where the checkpoints are: the connected run, the chosen run, or a typed folder.

    A typed folder is relative to ComfyUI's output folder or one of its ``loras``,
    ``diffusion_models`` or ``checkpoints`` folders (absolute paths only inside those); a run
    folder stands for its ``checkpoints/``.

    Raises:
        ValueError: nothing chosen, an unknown run, or an unsafe or missing folder, naming it.
    """
    if train_run is not None:
        return Path(train_run.checkpoints_dir)
    if run and run != NONE:
        runs_root = host.output_directory() / RUNS_SUBDIR
        try:
            run_dir = resolve_inside(runs_root, run)
        except RunPathError as exc:
            raise ValueError(f"run: {exc}") from None
        if not run_dir.is_dir():
            raise ValueError(
                f"run: no run {run!r} in {runs_root}; pick one from the list (refresh the page for new runs)"
            )
        return run_dir / "checkpoints"
    if folder.strip():
        roots = [
            host.output_directory(),
            *(p for name in _MODEL_FOLDERS for p in host.folder_paths_for(name)),
        ]
        try:
            found = host.find_folder_in_roots(folder, roots, field="folder")
        except host.UnsafePathError as exc:
            raise ValueError(str(exc)) from None
        return found / "checkpoints" if (found / "checkpoints").is_dir() else found
    raise ValueError("choose a run, connect a Train node's run, or type a folder of checkpoints")


def models_for(checkpoint: CheckpointInfo, model, clip, *, lora_strength: float):
    """The (MODEL, CLIP) to render ``checkpoint`` with.

    The base entry is the inputs themselves; a LoRA file is patched onto clones of them; a full
    checkpoint is loaded as a diffusion model (its text encoders are not read; CLIP stays).

    Raises:
        ValueError: a folder checkpoint (diffusers layout), or a file that cannot be inspected.
    """
    if checkpoint.is_base or checkpoint.path is None:
        return model, clip
    path = checkpoint.path
    if path.is_dir():
        raise ValueError(
            f"{checkpoint.label} ({path.name}) is a folder; the sweep loads single-file checkpoints (.safetensors)"
        )
    if not path.is_file():
        raise ValueError(
            f"{checkpoint.label}: {path} is gone (pruned since it was listed?); queue again to re-list"
        )
    if checkpoint_method(path) == "lora":
        return host.apply_lora_file(
            model, clip, path, strength_model=lora_strength, strength_clip=lora_strength
        )
    return host.load_diffusion_model_file(path), clip


# --------------------------------------------------------------------------------------------
# Nodes


class RunCheckpoints(io.ComfyNode):
    """List a run's checkpoints (every k-th, a step range, the base model first if asked)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FinetuneRunCheckpoints",
            display_name="Run Checkpoints",
            category=CHECKPOINTS_CATEGORY,
            description="The checkpoints of a training run, ordered by step with the final one last, for a "
            "Checkpoint Sweep. Re-runs by itself when a new checkpoint appears.",
            inputs=[
                io.Combo.Input(
                    "run", options=[NONE, *run_names()], default=NONE,
                    tooltip="A run under ComfyUI's output/finetune folder (refresh the page to see new runs).",
                ),
                io.String.Input(
                    "folder", default="",
                    tooltip="Used when run is (none): a folder of checkpoints, relative to ComfyUI's output folder or "
                    "its loras / diffusion_models / checkpoints folders. Names from other trainers (kohya, diffusers) "
                    "are understood.",
                ),
                io.Int.Input("every_k", default=1, min=1, max=10_000, tooltip="Keep every k-th checkpoint, counted back from the newest (always kept)."),
                io.Int.Input("step_min", default=0, min=0, max=100_000_000, tooltip="Leave out checkpoints before this step (0 = from the first)."),
                io.Int.Input(
                    "step_max", default=0, min=0, max=100_000_000,
                    tooltip="Leave out checkpoints after this step, and the final one (0 = up to the last).",
                ),
                io.Boolean.Input("include_base", default=True, tooltip="Put the base model (no LoRA) first, labelled 'base'."),
                FtRun.Input("train_run", optional=True, tooltip="Optional: the run from a Train node; overrides run and folder."),
            ],
            outputs=[
                FtCheckpoints.Output("checkpoints", tooltip="The selected checkpoints, in order."),
                io.String.Output("labels", tooltip="Their labels, one per line ('base', 'step 800', …, 'final')."),
            ],
        )  # fmt: skip

    @classmethod
    def fingerprint_inputs(
        cls, run: str = NONE, folder: str = "", train_run: RunHandle | None = None, **kwargs
    ) -> str:
        try:
            return fingerprint(checkpoint_folder(run, folder, train_run))
        except ValueError as exc:
            return f"error: {exc}"  # execute raises the same error with its message

    @classmethod
    def execute(
        cls,
        run: str,
        folder: str,
        every_k: int,
        step_min: int,
        step_max: int,
        include_base: bool,
        train_run: RunHandle | None = None,
    ) -> io.NodeOutput:
        where = checkpoint_folder(run, folder, train_run)
        if not where.is_dir():
            raise ValueError(
                f"the run has no checkpoints folder yet ({where}); wait for its first checkpoint"
            )
        found = list_checkpoints(
            where,
            every_k=every_k,
            step_min=step_min or None,
            step_max=step_max or None,
            include_base=include_base,
        )
        if not any(not c.is_base for c in found):
            raise ValueError(
                f"no checkpoints in {where} within steps {step_min or 'first'}..{step_max or 'last'}"
            )
        labels = "\n".join(c.label for c in found)
        return io.NodeOutput(found, labels, ui={"text": (labels,)})


class CheckpointSweep(io.ComfyNode):
    """Render every prompt with every checkpoint at one seed; one row per prompt."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        try:
            samplers, schedulers = host.sampler_names(), host.scheduler_names()
        except ImportError:  # schema tests without ComfyUI's comfy package
            samplers, schedulers = ["euler"], ["normal"]
        return io.Schema(
            node_id="FinetuneCheckpointSweep",
            display_name="Checkpoint Sweep",
            category=CHECKPOINTS_CATEGORY,
            description="Render the same prompts and seed with each checkpoint. LoRA checkpoints are applied to the "
            "MODEL and CLIP given here (load the base model once); full fine-tunes are loaded one by one. Feed "
            "the outputs to Labeled Strip.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the LoRA checkpoints were trained on."),
                io.Clip.Input("clip", tooltip="The base model's text encoder(s)."),
                io.Vae.Input("vae", tooltip="The VAE that decodes the renders."),
                FtCheckpoints.Input("checkpoints", tooltip="From Run Checkpoints."),
                io.String.Input("positive", multiline=True, default="", tooltip="The prompt; several lines = several prompts, one row each."),
                io.String.Input("negative", multiline=True, default="", tooltip="The negative prompt, shared by every render."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=io.ControlAfterGenerate.fixed, tooltip="One seed for every render, so only the checkpoint changes (fixed, so queuing again renders the same images)."),
                io.Int.Input("steps", default=20, min=1, max=10_000, tooltip="Sampling steps per render."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=samplers, default="euler" if "euler" in samplers else samplers[0], tooltip="The sampling algorithm (as in KSampler)."),
                io.Combo.Input("scheduler", options=schedulers, default="normal" if "normal" in schedulers else schedulers[0], tooltip="The noise schedule (as in KSampler)."),
                io.Int.Input("width", default=512, min=64, max=8192, step=8, tooltip="Render width in pixels."),
                io.Int.Input("height", default=512, min=64, max=8192, step=8, tooltip="Render height in pixels."),
                io.Float.Input("lora_strength", default=1.0, min=-10.0, max=10.0, step=0.05, tooltip="Strength of LoRA checkpoints on both the model and the text encoder."),
            ],
            outputs=[
                io.Image.Output("images", tooltip="The renders, prompt by prompt, checkpoints in order within each."),
                io.String.Output("labels", tooltip="One label per checkpoint, one per line."),
                io.String.Output("row_labels", tooltip="The prompts, one per line (one row each)."),
            ],
        )  # fmt: skip

    @classmethod
    def execute(
        cls,
        model,
        clip,
        vae,
        checkpoints: list[CheckpointInfo],
        positive: str,
        negative: str,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        width: int,
        height: int,
        lora_strength: float,
    ) -> io.NodeOutput:
        if not checkpoints:
            raise ValueError("checkpoints is empty; widen the step range of Run Checkpoints")
        prompts = split_lines(positive) or [""]
        total = len(checkpoints) * len(prompts)
        bar = host.progress_bar(total)
        grid: dict[tuple[int, int], torch.Tensor] = {}
        # The base CLIP's encodings, shared by every checkpoint that leaves the text encoders as
        # they are (full checkpoints, LoRAs of the denoiser alone: T5-XXL once, not per checkpoint).
        base_conds: dict[str, object] = {}

        def encode(ckpt_clip, text: str):
            if not host.same_text_encoders(clip, ckpt_clip):
                return host.encode_text(ckpt_clip, text)
            if text not in base_conds:
                base_conds[text] = host.encode_text(clip, text)
            return base_conds[text]

        # Checkpoint by checkpoint, so each LoRA is applied (or full model loaded) once.
        for col, ckpt in enumerate(checkpoints):
            host.throw_if_interrupted()
            ckpt_model, ckpt_clip = models_for(ckpt, model, clip, lora_strength=lora_strength)
            negative_cond = encode(ckpt_clip, negative)
            for row, prompt in enumerate(prompts):
                host.throw_if_interrupted()
                log.info("finetune: sweep render %d/%d: %s", len(grid) + 1, total, ckpt.label)
                grid[(row, col)] = host.sample_image(
                    ckpt_model, vae, encode(ckpt_clip, prompt), negative_cond,
                    seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                    width=width, height=height,
                ).cpu()  # fmt: skip
                bar.update(1)
            del ckpt_model, ckpt_clip  # a loaded full checkpoint is freed before the next one
        images = torch.cat([grid[(r, c)] for r in range(len(prompts)) for c in range(len(checkpoints))])
        labels = "\n".join(c.label for c in checkpoints)
        return io.NodeOutput(images, labels, "\n".join(p or "(empty prompt)" for p in prompts))


class LabeledStrip(io.ComfyNode):
    """Lay images side by side with a label over each (a grid with row labels)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FinetuneLabeledStrip",
            display_name="Labeled Strip",
            category=CHECKPOINTS_CATEGORY,
            description="Images side by side with a label above each, as one image. With row labels, one row per "
            "label (e.g. one per prompt of a Checkpoint Sweep). Long labels wrap and shrink to fit their tile.",
            is_output_node=True,
            inputs=[
                io.Image.Input("images", tooltip="The images, row by row."),
                io.String.Input("labels", multiline=True, default="", tooltip="One label per line: one per image, or one per column of a grid; empty for none."),
                io.String.Input("row_labels", multiline=True, default="", optional=True, tooltip="One per line; their count is the number of rows. Empty: a single row (or use columns)."),
                io.Int.Input("columns", default=0, min=0, max=256, tooltip="Tiles per row (0 = all in one row, or images / rows with row labels)."),
                io.Int.Input("label_height", default=0, min=0, max=1024, advanced=True, tooltip="Height of each label band in pixels (0 = fits the longest label, up to 3 lines)."),
                io.Int.Input("font_size", default=0, min=0, max=512, advanced=True, tooltip="Label size in pixels (0 = 4 % of the tile width, at least 10)."),
                io.String.Input("background", default="#1e1e1e", advanced=True, tooltip="Background colour ('#rrggbb' or a name), also around smaller images."),
                io.String.Input("text_color", default="#ffffff", advanced=True, tooltip="Colour of all text ('#rrggbb' or a name)."),
                io.String.Input("title", default="", tooltip="Optional title across the top."),
                io.Int.Input("padding", default=8, min=0, max=256, advanced=True, tooltip="Pixels around and between tiles."),
            ],
            outputs=[io.Image.Output("image", tooltip="The strip or grid as one image.")],
        )  # fmt: skip

    @classmethod
    def execute(
        cls,
        images: torch.Tensor,
        labels: str,
        columns: int,
        label_height: int,
        font_size: int,
        background: str,
        text_color: str,
        title: str,
        padding: int,
        row_labels: str = "",
    ) -> io.NodeOutput:
        strip = labeled_strip(
            image_to_pils(images),
            split_lines(labels),
            row_labels=split_lines(row_labels) or None,
            columns=columns,
            label_height=label_height,
            font_size=font_size,
            background=background,
            text_color=text_color,
            title=title,
            padding=padding,
        )
        out = pil_to_image(strip)
        return io.NodeOutput(out, ui=ui.PreviewImage(out, cls=cls))


CHECKPOINT_NODES = [RunCheckpoints, CheckpointSweep, LabeledStrip]
