"""Writing checkpoints that stock ComfyUI loads: kohya-format LoRA files with ``ss_*`` metadata,
or the full denoiser for *Load Diffusion Model* (plus trained text encoders next to it)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import Method, TrainConfig
from ..data.scan import ScannedDataset
from ..lora import kohya_metadata, lora_state_dict, save_lora
from ..models.bundle import ModelBundle
from ..plan import StepPlan
from .failures import writing

log = logging.getLogger("finetune")

TEXT_ENCODER_DIR = "text_encoders"
FULL_SAVE_DTYPE = torch.float16


@dataclass(frozen=True)
class DatasetSummary:
    """What kohya's metadata says about the dataset: per-folder repeats/counts and tag frequency."""

    dataset_dirs: dict[str, dict[str, int]]
    tag_frequency: dict[str, dict[str, int]]
    num_train_images: int
    bucket_info: dict

    @classmethod
    def of(cls, dataset: ScannedDataset, buckets: list[tuple[int, int]]) -> DatasetSummary:
        dirs: dict[str, dict[str, int]] = {}
        tags: dict[str, Counter] = {}
        for i, item in enumerate(dataset.items):
            folder = Path(item.image_path).parent.name
            entry = dirs.setdefault(folder, {"n_repeats": item.repeats, "img_count": 0})
            entry["img_count"] += 1
            sep = dataset.policy(i).separator
            tags.setdefault(folder, Counter()).update(t.strip() for t in item.caption.split(sep) if t.strip())
        counts: Counter = Counter()
        for item, bucket in zip(dataset.items, buckets, strict=True):
            counts[bucket] += item.repeats
        info = {
            "buckets": {
                str(i): {"resolution": list(b), "count": n} for i, (b, n) in enumerate(sorted(counts.items()))
            }
        }
        return cls(
            dataset_dirs=dirs,
            tag_frequency={k: dict(v) for k, v in tags.items()},
            num_train_images=dataset.samples_per_epoch,
            bucket_info=info,
        )


@dataclass
class CheckpointContext:
    """What every checkpoint's metadata needs, fixed for the run."""

    config: TrainConfig
    bundle: ModelBundle | None  # None: a model the host holds (no file of ours to describe)
    plan: StepPlan
    summary: DatasetSummary
    started_at: float
    num_processes: int = 1

    def lora_metadata(
        self,
        path: Path,
        *,
        arch: str,
        base_model_name: str,
        base_model_hash: str = "",
        step: int,
        epoch: int,
        prediction_type: str | None,
        resolution: int | None = None,
    ) -> dict[str, str]:
        """kohya's ``ss_*`` / ``modelspec.*`` metadata of the LoRA checkpoint at ``path``."""
        summary, plan = self.summary, self.plan
        return kohya_metadata(
            config=self.config,
            arch=arch,
            base_model_name=base_model_name,
            base_model_hash=base_model_hash,
            step=step,
            epoch=epoch,
            total_steps=plan.total_steps,
            num_train_images=summary.num_train_images,
            dataset_dirs=summary.dataset_dirs,
            tag_frequency=summary.tag_frequency,
            training_started_at=self.started_at,
            bucket_info=summary.bucket_info,
            num_epochs=plan.epochs,
            num_batches_per_epoch=plan.steps_per_epoch,
            num_processes=self.num_processes,
            prediction_type=prediction_type,
            resolution=resolution,
            saved_at=time.time(),
            output_name=path.stem,
            trigger_phrase=_trigger(self.config),
        )


def _base_name(source: str) -> str:
    return Path(source).name if source else "in-memory model"


def save_checkpoint(
    path: Path,
    *,
    denoiser: nn.Module,
    text_slots: list[int],
    step: int,
    epoch: int,
    ctx: CheckpointContext,
) -> Path:
    """Write the checkpoint of ``step`` to ``path`` (atomically; a failed write names the file).

    Args:
        path: from ``CheckpointStore.path_for(step)``.
        denoiser: the unwrapped denoiser (LoRA layers in it for a LoRA run).
        text_slots: the trained text-encoder slots.
        step: optimizer steps done.
        epoch: epochs done (kohya counts an epoch when it is complete).
        ctx: run-wide facts for the metadata.

    Raises:
        WriteFailure: the file could not be written (disk full...).
    """
    config, bundle = ctx.config, ctx.bundle
    if config.method == Method.LORA:
        encoders = [te if i in text_slots else None for i, te in enumerate(bundle.text_encoders)]
        tensors = lora_state_dict(
            denoiser, encoders, bundle.arch, alpha=config.lora_alpha, dtype=torch.float16
        )
        meta = ctx.lora_metadata(
            path,
            arch=bundle.arch,
            base_model_name=_base_name(bundle.source),
            base_model_hash=bundle.source_hash,
            step=step,
            epoch=epoch,
            prediction_type=bundle.prediction_type if bundle.prediction_type != "flow" else None,
        )
        with writing(path):
            save_lora(path, tensors, meta)
        return path
    from ..models.convert import denoiser_to_original
    from ..models.files import save_safetensors_atomic

    meta = {
        "format": "pt",
        "modelspec.title": path.stem,
        "finetune.step": str(step),
        "finetune.epoch": str(epoch),
        "finetune.base_model": _base_name(bundle.source),
        "finetune.base_model_hash": bundle.source_hash,
        "finetune.prediction_type": bundle.prediction_type,
    }
    # fp16 on disk, like every distributed checkpoint: half the size of the fp32 master weights
    # (the resume state keeps those), and ComfyUI casts to its own compute dtype anyway.
    tensors = {
        k: v.detach().to("cpu", FULL_SAVE_DTYPE).contiguous()
        for k, v in denoiser_to_original(denoiser, bundle.arch).items()
    }
    with writing(path):
        save_safetensors_atomic(tensors, str(path), metadata=meta)
    for slot in text_slots:
        te_path = path.parent / TEXT_ENCODER_DIR / f"{path.stem}-te{slot + 1}.safetensors"
        te_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = te_path.with_name(f".{te_path.name}.tmp")
        with writing(te_path):
            state = {
                k: v.detach().to("cpu", FULL_SAVE_DTYPE).contiguous()
                for k, v in bundle.text_encoders[slot].state_dict().items()
            }
            save_file(state, str(tmp), metadata={"finetune.step": str(step)})
            tmp.replace(te_path)
    return path


def _trigger(config: TrainConfig) -> str:
    parts = config.dataset.parts
    return parts[0].policy.prefix.strip() if parts else ""
