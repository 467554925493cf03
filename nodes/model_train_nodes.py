"""*Train LoRA (Model)*: queue a background LoRA run on the MODEL ComfyUI already loaded.

Unlike *Train LoRA* (which loads its own diffusers copy of a file), this node trains adapters on
the weights ComfyUI holds, through :mod:`.comfy_denoiser`, so every family this path supports
trains (SD1.5, SDXL, SD3/3.5, Flux, Lumina 2) without a second copy of the weights. The run is the
same as any other: queued on the pack's run manager, with schedules, checkpoints, resume, pause
while ComfyUI is busy, progress events and the run folder layout. A family this path cannot train
is refused here, at queue time, naming what ComfyUI detected.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.config import DatasetSpec, Method
from ..trainer.runs import RunStateError
from .train_nodes import (
    _LORA_SHOWN,
    TRAIN_CATEGORY,
    _handle_text,
    _option_inputs,
    _train_outputs,
    _TrainNode,
    build_config,
)
from .types import FtDataset

DISPLAY = "Train LoRA (Model)"
# Options that only mean something when the trainer loads a file with diffusers (or that this path
# does not offer yet; ComfyUI places the MODEL's weights itself, so memory_mode plans nothing
# here): not shown, left at their defaults.
_FILE_ONLY = {
    "arch", "allow_pickle", "train_text_encoder", "text_encoder_lr", "prediction_type", "flow_shift", "use_t5",
    "t5_max_length", "compile", "channels_last", "cuda_graphs", "allow_tf32", "cudnn_benchmark",
    "cache_latents", "cache_text", "memory_mode",
}  # fmt: skip
_COMMON = [
    "run_name", "lora_rank", "lora_alpha", "lora_targets", "learning_rate", "lr_scheduler", "lr_warmup",
    "optimizer", "batch_size", "epochs", "max_steps", "resolution", "mixed_precision", "checkpoint_every",
    "validation_prompts", "validation_every", "seed",
]  # fmt: skip
# Added after the node first shipped: last, so saved workflows keep their widget values in place.
_APPENDED = ["gradient_checkpointing"]
# The models this path exists for (Flux, SD3.5, Lumina...) need it to train at 1024 on the cards
# people own; ComfyUI's own training node turns it on by default too.
_OVERRIDES = {"gradient_checkpointing": {"default": True}}


class TrainLoRAModel(_TrainNode):
    """Queue a LoRA run on the connected MODEL (with its CLIP and VAE) and return its handle at once."""

    METHOD = Method.LORA
    DISPLAY = DISPLAY

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FinetuneTrainLoRAModel",
            display_name=DISPLAY,
            category=TRAIN_CATEGORY,
            description="Train a LoRA on the MODEL ComfyUI loaded (no second copy of the weights) in the "
            "background: any family this node supports (SD1.5, SDXL, SD3/3.5, Flux, Lumina 2). The objective "
            "(epsilon, v or flow and its shift) comes from the model; files load in Load LoRA. Returns at once.",
            inputs=[
                io.Model.Input(
                    "model", tooltip="The model to train, from a checkpoint or diffusion-model loader."
                ),
                io.Clip.Input(
                    "clip", tooltip="The text encoder(s) that encode the captions and validation prompts."
                ),
                io.Vae.Input("vae", tooltip="The VAE that encodes the training images into latents."),
                FtDataset.Input(
                    "dataset", tooltip="The training images and captions (from Load Dataset and friends)."
                ),
                *_option_inputs(
                    _COMMON, _LORA_SHOWN, exclude=_FILE_ONLY, overrides=_OVERRIDES, appended=_APPENDED
                ),
            ],
            outputs=_train_outputs(),
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset: DatasetSpec, **values) -> io.NodeOutput:
        from .comfy_denoiser import ComfyDenoiser, check_trainable
        from .extension import running_service

        if clip is None or vae is None:
            raise ValueError(f"{DISPLAY}: connect the CLIP and the VAE of the model's loader")
        config = build_config(
            node=DISPLAY, method=Method.LORA, dataset=dataset, base_model="", encoders={}, values=values
        )
        check_trainable(model, config)  # raises with the family ComfyUI detected

        def loader(_config):
            return ComfyDenoiser(model, clip, vae)

        try:
            handle = running_service().manager.submit(config, model_loader=loader)
        except RunStateError as e:
            raise ValueError(str(e)) from None
        text = _handle_text(handle, Method.LORA)
        return io.NodeOutput(handle, text, ui={"text": (text,)})


MODEL_TRAIN_NODES = [TrainLoRAModel]
