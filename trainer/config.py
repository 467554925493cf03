"""Every typed config of the pack: dataset sources, caption policy, and the training run.

Nodes, the CLI and the HTTP routes derive their widgets, flags and validation from these classes
(see :mod:`trainer.options`). Change a default or a limit here and every surface follows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from .options import ConfigError, from_dict, option, to_json

# --------------------------------------------------------------------------------------------
# Choices


class Arch(str, Enum):
    AUTO = "auto"
    SD15 = "sd15"
    SDXL = "sdxl"
    SD3 = "sd3"


class Method(str, Enum):
    LORA = "lora"
    FULL = "full"


class LoraTargets(str, Enum):
    ATTENTION = "attention"
    ATTENTION_FF = "attention+ff"
    ATTENTION_FF_CONV = "attention+ff+conv"


class OptimizerName(str, Enum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw8bit"
    ADAFACTOR = "adafactor"


class ScheduleName(str, Enum):
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"
    LINEAR = "linear"
    COSINE = "cosine"
    COSINE_WITH_RESTARTS = "cosine_with_restarts"
    POLYNOMIAL = "polynomial"


class Precision(str, Enum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class PredictionType(str, Enum):
    AUTO = "auto"
    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"


class CacheMode(str, Enum):
    OFF = "off"
    MEMORY = "memory"
    DISK = "disk"


class CropMode(str, Enum):
    CENTER = "center"
    RANDOM = "random"


class TimestepSampling(str, Enum):
    """Rectified-flow timestep densities, as in diffusers' ``compute_density_for_timestep_sampling``."""

    LOGIT_NORMAL = "logit_normal"
    MODE = "mode"
    UNIFORM = "uniform"


class FlowLossWeighting(str, Enum):
    """As in diffusers' ``compute_loss_weighting_for_sd3`` ("none" is uniform weighting)."""

    NONE = "none"
    SIGMA_SQRT = "sigma_sqrt"
    COSMAP = "cosmap"


class MemoryMode(str, Enum):
    """How a run fits the GPU (see ``trainer/engine/memory.py``)."""

    AUTO = "auto"
    LOWEST = "lowest"
    OFF = "off"


class OnProblem(str, Enum):
    STOP = "stop"
    SKIP = "skip"


# --------------------------------------------------------------------------------------------
# Dataset side


@dataclass
class CaptionPolicy:
    """What happens to a caption each time a sample is drawn (kohya's order of operations).

    "Tokens" here are separator chunks ("a cat, red hat" has two), not CLIP tokens.
    """

    prefix: str = option(
        "", tooltip="Text put before every caption (e.g. a trigger word). Counts toward the kept chunks."
    )
    suffix: str = option("", tooltip="Text put after every caption. Counts as a chunk.", advanced=True)
    shuffle: bool = option(
        False,
        tooltip="Shuffle the caption's chunks every time the image is drawn, so each epoch sees a different order.",
    )
    keep_tokens: int = option(
        0,
        min=0,
        max=64,
        tooltip="How many leading chunks (split on the separator, NOT CLIP tokens) stay in place when shuffling; usually 1 to keep the trigger word first.",
    )
    keep_separator: str = option(
        "",
        tooltip="If set (e.g. '|||'), everything before this marker stays fixed instead of the first N chunks.",
        advanced=True,
    )
    separator: str = option(",", tooltip="The character(s) that split a caption into chunks.")
    split_on_period: bool = option(False, tooltip="Also split chunks on '.' (sentences).", advanced=True)
    join_separator: str = option(
        ", ", tooltip="What goes between chunks when the caption is put back together.", advanced=True
    )
    caption_dropout_rate: float = option(
        0.0,
        min=0.0,
        max=1.0,
        step=0.01,
        tooltip="Probability that a drawn caption is replaced by the empty caption (trains unconditional guidance).",
    )
    caption_dropout_every_n_epochs: int = option(
        0, min=0, max=10_000, tooltip="Drop every caption in every N-th epoch (0 = never).", advanced=True
    )
    tag_dropout_rate: float = option(
        0.0,
        min=0.0,
        max=1.0,
        step=0.01,
        tooltip="Probability that each non-kept chunk is dropped from a drawn caption.",
    )

    def check(self) -> None:
        if not self.separator:
            raise ConfigError("separator", "must not be empty; use ',' for comma-separated tags")


@dataclass
class DatasetSource:
    """One folder of captioned images."""

    folder: str = option(
        "",
        tooltip="Folder of images with same-stem caption files. Sub-folders named like '10_concept' repeat 10 times an epoch.",
    )
    caption_extension: str = option(".txt", tooltip="Extension of the caption files next to the images.")
    recursive: bool = option(
        True, tooltip="Also look in sub-folders (kohya 'N_name' folders are always read)."
    )
    folder_name_as_caption: bool = option(
        False,
        tooltip="For an image without a caption file, use its kohya folder's concept name ('10_k4s4 style' -> 'k4s4 style') as the caption.",
    )
    on_problem: OnProblem = option(
        OnProblem.STOP,
        tooltip="'stop': refuse the dataset and list every bad file. 'skip': leave bad files out and show them in the preview.",
    )
    alpha_background: str = option(
        "#ffffff", tooltip="Colour transparent pixels are composited onto (#rrggbb).", advanced=True
    )

    def check(self) -> None:
        if not self.caption_extension.startswith("."):
            raise ConfigError(
                "caption_extension", f"{self.caption_extension!r} must start with a dot, e.g. '.txt'"
            )
        bg = self.alpha_background
        if not (len(bg) == 7 and bg.startswith("#") and all(c in "0123456789abcdefABCDEF" for c in bg[1:])):
            raise ConfigError("alpha_background", f"{bg!r} is not a colour like '#ffffff'")


@dataclass
class DatasetPart:
    """A source with the caption policy and repeat factor applied to it. Merging keeps parts apart."""

    source: DatasetSource = option(default_factory=DatasetSource, tooltip="Where the images are.")
    policy: CaptionPolicy = option(default_factory=CaptionPolicy, tooltip="How captions are drawn.")
    repeat_factor: int = option(1, min=1, max=10_000, tooltip="Multiplies each folder's own kohya repeats.")


@dataclass
class DatasetSpec:
    """What FT_DATASET carries between nodes and what run.json stores: serialisable, re-scannable."""

    parts: list[DatasetPart] = option(default_factory=list, tooltip="The merged dataset parts.")


# --------------------------------------------------------------------------------------------
# The training run


DEFAULT_RESOLUTION = {Arch.SD15: 512, Arch.SDXL: 1024, Arch.SD3: 1024}


@dataclass
class TrainConfig:
    """One training run: everything needed to reproduce it, stored as ``run.json``'s ``config``."""

    # Identity and where things go.
    run_name: str = option("my-lora", tooltip="Name of the run; its folder is <output>/finetune/<run_name>.")
    output_dir: str = option(
        "output", tooltip="Parent folder; the run lives in <output_dir>/finetune/<run_name>.", hidden=True
    )
    dataset: DatasetSpec = option(
        default_factory=DatasetSpec, tooltip="The dataset (from the dataset nodes).", hidden=True
    )

    # Base model.
    base_model: str = option("", tooltip="A diffusers folder or a single-file .safetensors checkpoint.")
    arch: Arch = option(
        Arch.AUTO, tooltip="Model family; 'auto' detects it from the checkpoint's keys.", advanced=True
    )
    clip_l: str = option(
        "", tooltip="SD3: separate CLIP-L file, if the checkpoint has no text encoders.", advanced=True
    )
    clip_g: str = option(
        "", tooltip="SD3: separate CLIP-G file, if the checkpoint has no text encoders.", advanced=True
    )
    t5xxl: str = option(
        "",
        tooltip="SD3: separate T5-XXL file; leave empty to train without T5 (zeros, as SD3 allows).",
        advanced=True,
    )
    tokenizer_dir: str = option(
        "",
        tooltip="Folder with tokenizer files, when the checkpoint is a single file and no host provides them.",
        hidden=True,
    )
    config_dir: str = option(
        "",
        tooltip="Single-file checkpoints of a custom size: a diffusers-layout folder whose configs match it (default: the shipped configs).",
        hidden=True,
    )
    allow_pickle: bool = option(
        False,
        tooltip="Allow loading pickle .ckpt/.pt files. They can run arbitrary code: convert them to .safetensors instead.",
        advanced=True,
    )

    # Method.
    method: Method = option(
        Method.LORA, tooltip="'lora': train a small adapter. 'full': fine-tune the whole denoiser."
    )
    lora_rank: int = option(16, min=1, max=1024, tooltip="LoRA rank (kohya network_dim).")
    lora_alpha: float = option(
        16.0,
        min=0.0,
        max=4096.0,
        tooltip="LoRA alpha; the update is scaled by alpha/rank (kohya network_alpha).",
    )
    lora_dropout: float = option(
        0.0, min=0.0, max=0.9, step=0.01, tooltip="Dropout inside the LoRA layers.", advanced=True
    )
    lora_targets: LoraTargets = option(
        LoraTargets.ATTENTION,
        tooltip="Which layers get LoRA: attention only; + feed-forward; + convolutions (LoCon-style).",
    )
    train_text_encoder: bool = option(
        False,
        tooltip="Also train the text encoder(s) (LoRA on them for method lora, full weights for method full).",
    )
    text_encoder_lr: float = option(
        0.0,
        min=0.0,
        max=1.0,
        step=1e-7,
        tooltip="Learning rate for the text encoder(s); 0 = same as learning_rate.",
        advanced=True,
    )

    # Data path.
    resolution: int = option(
        0,
        min=0,
        max=4096,
        step=64,
        tooltip="Training resolution (area of the buckets); 0 = the model's native (512 SD1.5, 1024 SDXL/SD3).",
    )
    buckets: bool = option(
        True, tooltip="Aspect-ratio buckets: train each image near its own shape instead of a square crop."
    )
    min_bucket_resolution: int = option(
        256, min=64, max=4096, step=64, tooltip="Smallest bucket side.", advanced=True
    )
    max_bucket_resolution: int = option(
        2048, min=64, max=8192, step=64, tooltip="Largest bucket side.", advanced=True
    )
    bucket_step: int = option(
        64, min=8, max=256, step=8, tooltip="Bucket sides are multiples of this.", advanced=True
    )
    allow_upscale: bool = option(
        False, tooltip="Let small images be upscaled to fill their bucket.", advanced=True
    )
    crop: CropMode = option(CropMode.CENTER, tooltip="How an image is cropped to its bucket.", advanced=True)
    flip: bool = option(
        False, tooltip="Random horizontal flips (off for text, logos and asymmetric subjects)."
    )
    batch_size: int = option(1, min=1, max=256, tooltip="Images per step on each GPU.")
    gradient_accumulation: int = option(
        1, min=1, max=1024, tooltip="Micro-batches summed into one optimizer step.", advanced=True
    )
    epochs: int = option(10, min=1, max=100_000, tooltip="Passes over the dataset (with repeats).")
    max_steps: int = option(
        0, min=0, max=10_000_000, tooltip="Stop after this many optimizer steps (0 = run all epochs)."
    )
    dataloader_workers: int = option(
        2, min=0, max=64, tooltip="Background workers decoding images.", advanced=True
    )

    # Optimiser and schedule.
    optimizer: OptimizerName = option(
        OptimizerName.ADAMW,
        tooltip="AdamW (fused on GPU), AdamW 8-bit (bitsandbytes) or Adafactor (transformers).",
    )
    learning_rate: float = option(
        1e-4,
        min=0.0,
        max=1.0,
        step=1e-7,
        tooltip="Peak learning rate (1e-4 is usual for LoRA, 1e-6 to 2e-5 for full fine-tunes).",
    )
    weight_decay: float = option(1e-2, min=0.0, max=1.0, tooltip="AdamW weight decay.", advanced=True)
    adam_beta1: float = option(0.9, min=0.0, max=0.9999, tooltip="Adam beta1.", advanced=True)
    adam_beta2: float = option(0.999, min=0.0, max=0.99999, tooltip="Adam beta2.", advanced=True)
    adam_epsilon: float = option(1e-8, min=0.0, max=1e-2, tooltip="Adam epsilon.", advanced=True)
    max_grad_norm: float = option(
        1.0, min=0.0, max=1e6, tooltip="Clip gradients to this norm (0 = no clipping).", advanced=True
    )
    lr_scheduler: ScheduleName = option(ScheduleName.COSINE, tooltip="Learning-rate schedule after warm-up.")
    lr_warmup: float = option(
        0.1,
        min=0.0,
        max=10_000_000,
        tooltip="Warm-up: a fraction of the total steps if below 1 (0.1 = 10 %), else a step count.",
    )
    lr_num_cycles: int = option(
        1, min=1, max=1000, tooltip="Restarts for cosine_with_restarts.", advanced=True
    )
    lr_power: float = option(
        1.0, min=0.0, max=10.0, tooltip="Power for the polynomial schedule.", advanced=True
    )

    # Objective.
    prediction_type: PredictionType = option(
        PredictionType.AUTO,
        tooltip="UNet objective; 'auto' reads it from the model (SD3 always uses rectified flow).",
        advanced=True,
    )
    min_snr_gamma: float = option(
        0.0,
        min=0.0,
        max=100.0,
        tooltip="Min-SNR-gamma loss weighting (5 is usual; 0 = off). UNet models only.",
        advanced=True,
    )
    noise_offset: float = option(
        0.0,
        min=0.0,
        max=1.0,
        step=0.01,
        tooltip="Noise offset (0.05-0.1 helps very dark/bright images). UNet models only.",
        advanced=True,
    )
    timestep_sampling: TimestepSampling = option(
        TimestepSampling.LOGIT_NORMAL, tooltip="SD3: how timesteps are drawn.", advanced=True
    )
    logit_mean: float = option(0.0, min=-10.0, max=10.0, tooltip="SD3 logit_normal mean.", advanced=True)
    logit_std: float = option(1.0, min=0.01, max=10.0, tooltip="SD3 logit_normal std.", advanced=True)
    mode_scale: float = option(1.29, min=0.0, max=10.0, tooltip="SD3 'mode' sampling scale.", advanced=True)
    flow_loss_weighting: FlowLossWeighting = option(
        FlowLossWeighting.NONE, tooltip="SD3 loss weighting.", advanced=True
    )
    flow_shift: float = option(
        3.0, min=0.1, max=20.0, tooltip="SD3 timestep shift (3.0 for SD3 Medium).", advanced=True
    )
    precondition_outputs: bool = option(
        True,
        tooltip="SD3: compute the loss on the model's x0 estimate (diffusers' SD3 script default) instead of the flow velocity.",
        advanced=True,
    )
    use_t5: bool = option(
        True, tooltip="SD3: use T5-XXL if available (off = zeros, saves memory).", advanced=True
    )
    t5_max_length: int = option(
        77, min=1, max=256, tooltip="SD3: T5 token length (77 default, up to 256).", advanced=True
    )

    # Precision and memory.
    mixed_precision: Precision = option(
        Precision.BF16, tooltip="Compute precision. bf16 on modern GPUs; fp32 on CPU."
    )
    gradient_checkpointing: bool = option(
        False, tooltip="Recompute activations in the backward pass: much less VRAM, ~30 % slower."
    )
    compile: bool = option(
        True,
        tooltip="torch.compile the repeated transformer and ResNet blocks on CUDA: 1.3-1.4x faster LoRA steps and less VRAM, after a first compile of 20 s (SD3) to 1-2 min (SD1.5/SDXL) that later runs reuse from the cache.",
        advanced=True,
    )
    channels_last: bool = option(
        True,
        tooltip="Run the SDXL UNet in the channels-last (NHWC) layout on CUDA, the layout the GPU's convolutions use: no layout copies around each convolution. Numbers agree to rounding. (SD1.5 stays NCHW.)",
        advanced=True,
    )
    allow_tf32: bool = option(
        True,
        tooltip="Let fp32 matrix products and convolutions use TF32 on Ampere and newer GPUs (much faster fp32, ~1e-3 relative error).",
        advanced=True,
    )
    cudnn_benchmark: bool = option(
        True,
        tooltip="Let cuDNN time its convolution algorithms once per new shape and keep the fastest.",
        advanced=True,
    )
    cache_latents: CacheMode = option(
        CacheMode.MEMORY,
        tooltip="Cache VAE latents (needs no random crop); 'disk' keeps them for later runs.",
    )
    cache_text: CacheMode = option(
        CacheMode.MEMORY, tooltip="Cache text-encoder outputs (off when training a text encoder)."
    )
    caption_variants: int = option(
        8,
        min=1,
        max=256,
        tooltip="With text caching and a caption policy that varies, how many shuffled/dropped variants are pre-encoded per caption.",
        advanced=True,
    )

    # Checkpoints and validation.
    checkpoint_every: int = option(
        0,
        min=0,
        max=10_000_000,
        tooltip="Save a checkpoint every N steps (0 = about one epoch, from the plan).",
    )
    keep_checkpoints: int = option(
        0,
        min=0,
        max=100_000,
        tooltip="Keep only the newest N checkpoints (0 = keep all; the final one is always kept).",
    )
    validation_prompts: list[str] = option(
        default_factory=list,
        tooltip="One prompt per line, rendered every validation_every steps.",
        multiline=True,
    )
    validation_negative_prompt: str = option(
        "", tooltip="Negative prompt for validation renders.", advanced=True
    )
    validation_every: int = option(
        0,
        min=0,
        max=10_000_000,
        tooltip="Render validation images every N steps (0 = a quarter of the checkpoint cadence).",
    )
    validation_at_start: bool = option(
        False, tooltip="Also render before the first step (the base model).", advanced=True
    )
    validation_seed: int = option(
        42, min=0, max=2**63 - 1, tooltip="Seed of the validation renders.", advanced=True
    )
    validation_steps: int = option(
        20, min=1, max=200, tooltip="Sampling steps of the validation renders.", advanced=True
    )
    validation_guidance: float = option(
        7.0, min=0.0, max=50.0, tooltip="CFG scale of the validation renders.", advanced=True
    )
    validation_width: int = option(
        0, min=0, max=4096, step=64, tooltip="Width of validation renders (0 = resolution).", advanced=True
    )
    validation_height: int = option(
        0, min=0, max=4096, step=64, tooltip="Height of validation renders (0 = resolution).", advanced=True
    )

    seed: int = option(
        42,
        min=0,
        max=2**63 - 1,
        tooltip="Seed for data order, noise and initialisation; the same seed reproduces the run.",
    )
    pause_while_host_busy: bool = option(
        True,
        tooltip="Pause between steps while ComfyUI runs or has queued a prompt, and continue when its queue is empty.",
        advanced=True,
    )
    # Options added after the first release go last: ComfyUI saves a node's widget values by
    # position, so an option inserted in the middle would shift the values of saved workflows.
    cuda_graphs: bool = option(
        True,
        tooltip="Replay each step's forward and backward as a CUDA graph (one per image size), so the GPU no longer waits for Python to launch kernels: on top of compile, SDXL LoRA steps 1.3x faster, 1.7x with gradient checkpointing. Not used with fp16, LoRA dropout or a trained text encoder.",
        advanced=True,
    )
    memory_mode: MemoryMode = option(
        MemoryMode.AUTO,
        tooltip="Fit the GPU: 'auto' reads the free VRAM when the run starts and turns on what it needs, in order: gradient checkpointing, 8-bit optimizer state (with bitsandbytes), fp8 base weights (LoRA) or bf16 weights (full), a smaller batch with gradient accumulation (same effective batch). An option you changed from its default is never changed. 'lowest': all of them. 'off': exactly as configured. Text encoders and VAE leave the GPU after caching unless 'off'.",
        advanced=True,
    )

    def check(self) -> None:
        if not self.run_name.strip():
            raise ConfigError("run_name", "must not be empty")
        if self.min_bucket_resolution > self.max_bucket_resolution:
            raise ConfigError(
                "min_bucket_resolution",
                f"{self.min_bucket_resolution} is larger than max_bucket_resolution {self.max_bucket_resolution}",
            )
        if self.lr_warmup >= 1 and not float(self.lr_warmup).is_integer():
            raise ConfigError(
                "lr_warmup", f"{self.lr_warmup} is neither a fraction below 1 nor a whole step count"
            )

    def native_resolution(self, arch: Arch) -> int:
        return self.resolution or DEFAULT_RESOLUTION[arch]

    def warmup_steps(self, total_steps: int) -> int:
        if self.lr_warmup < 1:
            return round(total_steps * self.lr_warmup)
        return int(self.lr_warmup)

    # JSON round trip --------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return from_dict(cls, data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("config", f"{path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(
                "config", f"{path} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}"
            ) from None
        # run.json stores the config under "config"; a bare config file is accepted too.
        if isinstance(data, dict) and "config" in data and isinstance(data["config"], dict):
            data = data["config"]
        elif isinstance(data, dict) and "status" in data:
            # A run.json whose run was killed before it recorded its settings (older versions
            # recorded them only after the model loaded).
            raise ConfigError(
                "config",
                f"{path} is a run.json without its config (the run was killed before it started "
                "training); train again from the config file you started it with",
            )
        return cls.from_dict(data)

    def to_json(self) -> str:
        return to_json(self)
