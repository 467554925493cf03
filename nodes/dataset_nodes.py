"""Dataset nodes: load a captioned folder, set its caption policy and repeats, merge, preview, plan, save.

Every node passes ``FT_DATASET``, whose value is a :class:`trainer.config.DatasetSpec`. Nodes return
new specs and never change the one they received (ComfyUI caches and shares node outputs). The
widgets come from the trainer's configs through :mod:`.widgets`, so limits and tooltips are
declared once, in ``trainer/config.py``.

Folder rule (LoadDataset): a relative folder is looked up in ComfyUI's input directory, then in its
``datasets`` folders; an absolute folder is accepted only inside one of those. To train on a folder
elsewhere, add its parent to ``extra_model_paths.yaml`` under ``datasets:``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os

from comfy_api.latest import io, ui

from ..trainer.config import Arch, CaptionPolicy, DatasetPart, DatasetSource, DatasetSpec, TrainConfig
from ..trainer.data.materialize import save_dataset
from ..trainer.data.preview import dataset_summary, preview_samples, problems_report
from ..trainer.data.scan import ScannedDataset, scan_dataset
from ..trainer.plan import StepPlan
from ..trainer.planning import plan_run, scan_for_run
from ..trainer.strip import labeled_strip
from . import host
from .images import pil_to_image
from .memory_preview import memory_line
from .types import CATEGORY, FtDataset
from .widgets import inputs_for, values_to_config

DATASET_CATEGORY = f"{CATEGORY}/dataset"

_SOURCE_FIELDS = [
    "folder",
    "caption_extension",
    "recursive",
    "folder_name_as_caption",
    "on_problem",
    "alpha_background",
]
_SHUFFLE_FIELDS = [
    "shuffle",
    "keep_tokens",
    "keep_separator",
    "separator",
    "split_on_period",
    "join_separator",
    "prefix",
    "suffix",
]
_DROPOUT_FIELDS = ["caption_dropout_rate", "caption_dropout_every_n_epochs", "tag_dropout_rate"]
_PLAN_FIELDS = ["batch_size", "gradient_accumulation", "epochs", "max_steps", "resolution", "buckets"]
# No model is connected here, so the resolution must be given (0 = "the model's" means nothing yet).
_PLAN_OVERRIDES = {
    "resolution": {
        "default": 1024,
        "min": 64,
        "tooltip": "Training resolution, as on the train node (512 for SD1.5, 1024 for SDXL and SD3): "
        "images are sorted into aspect buckets around it, exactly as the trainer will.",
    }
}
_CADENCE_FIELDS = ["checkpoint_every", "validation_every", "lr_warmup"]
# The size rule of the scan (images far below the smallest bucket are left out unless upscaling is
# allowed), as on the Train node. Optional and last: prompts and workflows saved before still load.
_SIZE_FIELDS = ["min_bucket_resolution", "max_bucket_resolution", "allow_upscale"]
_SIZE_OVERRIDES = {name: {"optional": True} for name in _SIZE_FIELDS}
# What memory_mode needs to know besides the plan (the model is not connected here).
_MEMORY_FIELDS = ["arch", "method", "lora_rank", "memory_mode"]
_MEMORY_OVERRIDES = {
    "arch": {
        "default": "sdxl",
        "advanced": False,
        "tooltip": "The model family the run will train ('auto': no memory estimate here), for the memory line.",
    },
    "method": {"advanced": True},
    "lora_rank": {"advanced": True},
    "memory_mode": {"advanced": False},
}
_MAX_EXTRA_MERGE_INPUTS = 4


def _dataset_input() -> io.Input:
    return FtDataset.Input("dataset", tooltip="The dataset (from Load Dataset or another dataset node).")


def _dataset_output(tooltip: str) -> io.Output:
    return FtDataset.Output("dataset", display_name="dataset", tooltip=tooltip)


def _num_processes_input() -> io.Input:
    return io.Int.Input(
        "num_processes", default=1, min=1, max=64, advanced=True,
        tooltip="GPUs training in parallel (data-parallel); each takes its own batch, so steps per epoch shrink.",
    )  # fmt: skip


def _with_policies(spec: DatasetSpec, values: dict, *, node: str) -> DatasetSpec:
    """A copy of ``spec`` whose every part has ``values`` set on its caption policy."""
    parts = []
    for part in copy.deepcopy(spec.parts):
        policy = values_to_config(CaptionPolicy, values, node=node, base=part.policy)
        parts.append(dataclasses.replace(part, policy=policy))
    return DatasetSpec(parts=parts)


def _scan_and_plan(
    dataset: DatasetSpec, values: dict, *, node: str, num_processes: int = 1
) -> tuple[ScannedDataset, StepPlan]:
    """The dataset as the trainer will scan it (with its size rule) and the plan it will follow,
    under the training widgets ``values``."""
    config = dataclasses.replace(values_to_config(TrainConfig, values, node=node), dataset=dataset)
    scanned = scan_for_run(config, config.resolution)
    return scanned, plan_run(config, scanned, resolution=config.resolution, num_processes=num_processes).plan


def dataset_report(scanned: ScannedDataset) -> str:
    """What a scan found: images and samples per concept, then the files left out (or none)."""
    return f"{dataset_summary(scanned)}\n{problems_report(scanned)}"


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """A hash of every file's relative path, size and modification time under ``folder``.

    Sub-folders are always walked (a superset of what any scan reads), symlinked folders once.
    """
    digest = hashlib.sha256()
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:  # a dangling link: still part of the listing
                st = None
            rel = os.path.relpath(path, folder)
            digest.update(f"{rel}\0{st.st_size if st else -1}\0{st.st_mtime_ns if st else -1}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Nodes


class LoadDataset(io.ComfyNode):
    """Scan a folder of captioned images (kohya layout) into a dataset, listing every bad file."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        folder_tip = (
            "Folder of images with same-stem caption files, relative to ComfyUI's input folder (or a 'datasets' "
            "folder from extra_model_paths.yaml); an absolute path must lie inside one of those. Sub-folders "
            "named like '10_concept' repeat 10 times an epoch."
        )
        return io.Schema(
            node_id="FinetuneLoadDataset",
            display_name="Load Dataset",
            category=DATASET_CATEGORY,
            description="Scan a folder of images and captions (kohya 'N_concept' sub-folders honoured) into a dataset. "
            "Problems (unreadable images, missing or empty captions) are listed at once.",
            inputs=inputs_for(DatasetSource, _SOURCE_FIELDS, overrides={"folder": {"tooltip": folder_tip}}),
            outputs=[
                _dataset_output("The scanned dataset, to caption-policy, repeat, preview or train."),
                io.String.Output(
                    "summary", tooltip="Images and samples per concept, and any files left out."
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, folder: str | None = None) -> bool | str:
        if folder is None:  # linked from another node: checked when the node runs
            return True
        if not folder.strip():
            return "folder is empty: type the name of a folder inside ComfyUI's input folder"
        try:
            host.resolve_dataset_folder(folder)
        except host.UnsafePathError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, folder: str, **kwargs) -> str:
        # Re-run when files are added, removed or edited, even though the widgets did not change.
        try:
            return folder_fingerprint(host.resolve_dataset_folder(folder))
        except host.UnsafePathError as e:
            return f"error: {e}"

    @classmethod
    def execute(cls, folder: str, **values) -> io.NodeOutput:
        resolved = host.resolve_dataset_folder(folder)
        source = values_to_config(DatasetSource, {**values, "folder": str(resolved)}, node="Load Dataset")
        spec = DatasetSpec(parts=[DatasetPart(source=source)])
        summary = dataset_report(scan_dataset(spec))
        return io.NodeOutput(spec, summary, ui={"text": (summary,)})


class CaptionShuffle(io.ComfyNode):
    """Shuffle caption chunks every draw, keeping the first N (the trigger word) in place."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FinetuneCaptionShuffle",
            display_name="Caption Shuffle",
            category=DATASET_CATEGORY,
            description="Shuffle each caption's comma-separated chunks every time the image is drawn (kohya "
            "shuffle_caption + keep_tokens), with an optional prefix/trigger word and suffix. Applies to every part.",
            inputs=[
                _dataset_input(),
                *inputs_for(CaptionPolicy, _SHUFFLE_FIELDS, overrides={"shuffle": {"default": True}}),
            ],
            outputs=[_dataset_output("The dataset with this caption policy on every part.")],
        )

    @classmethod
    def execute(cls, dataset: DatasetSpec, **values) -> io.NodeOutput:
        return io.NodeOutput(_with_policies(dataset, values, node="Caption Shuffle"))


class CaptionDropout(io.ComfyNode):
    """Drop whole captions or single chunks at a rate, so the model also learns unconditioned."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FinetuneCaptionDropout",
            display_name="Caption Dropout",
            category=DATASET_CATEGORY,
            description="Replace drawn captions by the empty caption at a rate or every N-th epoch, and drop single "
            "chunks (tags) at a rate. Kept chunks are never dropped. Applies to every part.",
            inputs=[_dataset_input(), *inputs_for(CaptionPolicy, _DROPOUT_FIELDS)],
            outputs=[_dataset_output("The dataset with these dropout settings on every part.")],
        )

    @classmethod
    def execute(cls, dataset: DatasetSpec, **values) -> io.NodeOutput:
        return io.NodeOutput(_with_policies(dataset, values, node="Caption Dropout"))


class DatasetRepeat(io.ComfyNode):
    """Multiply how often every image is drawn per epoch (on top of kohya folder repeats)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        tip = "Multiplies every image's repeats per epoch (on top of its folder's kohya count and earlier Repeat nodes)."
        return io.Schema(
            node_id="FinetuneDatasetRepeat",
            display_name="Dataset Repeat",
            category=DATASET_CATEGORY,
            description="Repeat every image of the dataset N times per epoch, e.g. to balance a small dataset against "
            "a large one before merging them.",
            inputs=[
                _dataset_input(),
                *inputs_for(DatasetPart, ["repeat_factor"], overrides={"repeat_factor": {"tooltip": tip}}),
            ],
            outputs=[_dataset_output("The dataset with its repeats multiplied.")],
        )

    @classmethod
    def execute(cls, dataset: DatasetSpec, repeat_factor: int) -> io.NodeOutput:
        parts = []
        for part in copy.deepcopy(dataset.parts):
            combined = part.repeat_factor * repeat_factor
            parts.append(
                values_to_config(DatasetPart, {"repeat_factor": combined}, node="Dataset Repeat", base=part)
            )
        return io.NodeOutput(DatasetSpec(parts=parts))


class MergeDatasets(io.ComfyNode):
    """Combine datasets; each keeps its own folder settings, caption policy and repeats."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        extra = [
            FtDataset.Input(f"dataset_{i}", optional=True, tooltip="Another dataset to add (optional).")
            for i in range(3, 3 + _MAX_EXTRA_MERGE_INPUTS)
        ]
        return io.Schema(
            node_id="FinetuneMergeDatasets",
            display_name="Merge Datasets",
            category=DATASET_CATEGORY,
            description="Merge two or more datasets into one. Each part keeps its own caption policy and repeats, so "
            "a style set and a regularisation set can be drawn differently.",
            inputs=[
                FtDataset.Input("dataset_1", tooltip="The first dataset."),
                FtDataset.Input("dataset_2", tooltip="The second dataset."),
                *extra,
            ],
            outputs=[_dataset_output("All parts of the inputs, in input order.")],
        )

    @classmethod
    def execute(
        cls, dataset_1: DatasetSpec, dataset_2: DatasetSpec, **more: DatasetSpec | None
    ) -> io.NodeOutput:
        extras = [
            more[f"dataset_{i}"]
            for i in range(3, 3 + _MAX_EXTRA_MERGE_INPUTS)
            if more.get(f"dataset_{i}") is not None
        ]
        parts = [copy.deepcopy(part) for spec in (dataset_1, dataset_2, *extras) for part in spec.parts]
        return io.NodeOutput(DatasetSpec(parts=parts))


class DatasetPreview(io.ComfyNode):
    """Show samples as the trainer will draw them (captions after the policy), the plan and the problems."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FinetuneDatasetPreview",
            display_name="Dataset Preview",
            category=DATASET_CATEGORY,
            description="Draw a few samples of an epoch exactly as training will (shuffled, dropped, prefixed "
            "captions) in a labeled grid, with the step plan and the files left out.",
            is_output_node=True,
            inputs=[
                _dataset_input(),
                io.Int.Input(
                    "epoch",
                    default=1,
                    min=1,
                    max=100_000,
                    tooltip="Which epoch to draw (from 1); each epoch shuffles differently.",
                ),
                *inputs_for(
                    TrainConfig,
                    ["seed"],
                    overrides={"seed": {"tooltip": "The run's seed: the same seed draws the same captions."}},
                ),
                io.Int.Input("count", default=8, min=1, max=64, tooltip="How many samples to show."),
                io.Int.Input("columns", default=4, min=1, max=16, tooltip="Tiles per row of the grid."),
                io.Int.Input(
                    "tile_size",
                    default=256,
                    min=32,
                    max=2048,
                    step=32,
                    advanced=True,
                    tooltip="Longest side of each tile in pixels (images are shrunk to it, never enlarged).",
                ),  # fmt: skip
                *inputs_for(TrainConfig, _PLAN_FIELDS, overrides=_PLAN_OVERRIDES),
                *inputs_for(TrainConfig, _SIZE_FIELDS, overrides=_SIZE_OVERRIDES),
            ],
            outputs=[
                io.Image.Output("grid", tooltip="The drawn samples with their captions, as one image."),
                io.String.Output("report", tooltip="The step plan and the files left out of the dataset."),
            ],
        )

    @classmethod
    def execute(
        cls,
        dataset: DatasetSpec,
        epoch: int,
        seed: int,
        count: int,
        columns: int,
        tile_size: int,
        **plan_values,
    ) -> io.NodeOutput:
        scanned, plan = _scan_and_plan(dataset, plan_values, node="Dataset Preview")
        samples = preview_samples(scanned, epoch=epoch, seed=seed, count=count)
        tiles = []
        for image, _ in samples:
            tile = image.copy()
            tile.thumbnail((tile_size, tile_size))
            tiles.append(tile)
        labels = [caption or "(caption dropped)" for _, caption in samples]
        grid = pil_to_image(labeled_strip(tiles, labels, columns=min(columns, len(tiles))))
        report = f"{plan.describe()}\n\n{dataset_report(scanned)}"
        return io.NodeOutput(grid, report, ui={**ui.PreviewImage(grid, cls=cls).as_dict(), "text": (report,)})


class StepPlanNode(io.ComfyNode):
    """Work out steps per epoch, total steps and the checkpoint/validation/warm-up cadence."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FinetuneStepPlan",
            display_name="Step Plan",
            category=DATASET_CATEGORY,
            description="steps per epoch = ceil(images x repeats / (batch x GPUs) / accumulation); total = steps per "
            "epoch x epochs (or max_steps), counted per aspect bucket as the trainer does (a batch never mixes "
            "buckets). Cadences left at 0 default from the plan. The last line says what memory_mode would "
            "choose on this GPU now.",
            inputs=[
                _dataset_input(),
                *inputs_for(TrainConfig, [*_PLAN_FIELDS, *_CADENCE_FIELDS], overrides=_PLAN_OVERRIDES),
                _num_processes_input(),
                *inputs_for(TrainConfig, _MEMORY_FIELDS, overrides=_MEMORY_OVERRIDES),
                *inputs_for(TrainConfig, _SIZE_FIELDS, overrides=_SIZE_OVERRIDES),
            ],
            outputs=[
                io.String.Output(
                    "summary",
                    tooltip="The plan in one paragraph, then what memory_mode would choose on this GPU now.",
                ),
                io.Int.Output("steps_per_epoch", tooltip="Optimizer steps per epoch."),
                io.Int.Output("total_steps", tooltip="Optimizer steps of the whole run."),
                io.Int.Output(
                    "checkpoint_every", tooltip="Steps between checkpoints (given, or about one epoch)."
                ),
                io.Int.Output(
                    "validation_every",
                    tooltip="Steps between validation renders (given, or a quarter of the checkpoint cadence).",
                ),
                io.Int.Output("warmup_steps", tooltip="Learning-rate warm-up in steps."),
            ],
        )

    @classmethod
    def execute(cls, dataset: DatasetSpec, num_processes: int, **values) -> io.NodeOutput:
        _, plan = _scan_and_plan(dataset, values, node="Step Plan", num_processes=num_processes)
        config = values_to_config(TrainConfig, values, node="Step Plan")
        auto = config.arch == Arch.AUTO
        memory = "memory: choose arch to see what memory_mode picks" if auto else memory_line(config)
        summary = f"{plan.describe()}\n{memory}"
        return io.NodeOutput(
            summary, plan.steps_per_epoch, plan.total_steps, plan.checkpoint_every, plan.validation_every,
            plan.warmup_steps, ui={"text": (summary,)},
        )  # fmt: skip


class SaveDataset(io.ComfyNode):
    """Materialise the caption policy: write every image `repeats` times, each with its own drawn caption."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FinetuneSaveDataset",
            display_name="Save Dataset",
            category=DATASET_CATEGORY,
            description="Write the dataset to a folder in ComfyUI's output: each image once per repeat as "
            "'1_<concept>/<name>_<k>.<ext>' (k from 1) with its own independently drawn caption file, to feed "
            "another trainer. Repeats are baked in, hence the '1_' folders.",
            is_output_node=True,
            inputs=[
                _dataset_input(),
                io.String.Input(
                    "folder",
                    default="finetune/datasets/my-dataset",
                    tooltip="Folder to write, relative to ComfyUI's output folder ('..' and absolute paths are refused).",
                ),  # fmt: skip
                *inputs_for(
                    TrainConfig,
                    ["seed"],
                    overrides={
                        "seed": {
                            "tooltip": "Seed of the caption draws; the same seed writes the same captions."
                        }
                    },
                ),
                io.Boolean.Input(
                    "overwrite",
                    default=False,
                    tooltip="Replace the folder's files if it is not empty (off: refuse).",
                ),
            ],
            outputs=[io.String.Output("report", tooltip="What was written, and where.")],
        )

    @classmethod
    def validate_inputs(cls, folder: str | None = None) -> bool | str:
        if folder is None:  # linked from another node: checked when the node runs
            return True
        try:
            host.resolve_output_subfolder(folder, field="folder")
        except host.UnsafePathError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, dataset: DatasetSpec, folder: str, seed: int, overwrite: bool) -> io.NodeOutput:
        out_dir = host.resolve_output_subfolder(folder, field="folder")
        report = save_dataset(scan_dataset(dataset), out_dir, seed=seed, overwrite=overwrite)
        text = report.describe()
        return io.NodeOutput(text, ui={"text": (text,)})


DATASET_NODES: list[type[io.ComfyNode]] = [
    LoadDataset,
    CaptionShuffle,
    CaptionDropout,
    DatasetRepeat,
    MergeDatasets,
    DatasetPreview,
    StepPlanNode,
    SaveDataset,
]
