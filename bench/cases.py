"""The benchmark's cases (issue 7's table) and the speed variants of our trainer it can compare."""

from __future__ import annotations

from dataclasses import dataclass, replace

from trainer.engine.speed import COMPILE_REGIONS, TRANSFORMER_REGIONS, SpeedSettings


@dataclass(frozen=True)
class BenchCase:
    """One configuration, run by the reference loop and by our trainer.

    Attributes:
        name: short id used on the command line ("sdxl-lora-b4").
        arch: sd15 | sdxl | sd3.
        method: lora | full.
        batch: samples per step.
        resolution: pixels per side (latents are 1/8).
        gradient_checkpointing: recompute activations in backward.
    """

    name: str
    arch: str
    method: str
    batch: int
    resolution: int
    gradient_checkpointing: bool = False


CASES: dict[str, BenchCase] = {
    c.name: c
    for c in [
        BenchCase("sdxl-lora-b4", "sdxl", "lora", 4, 1024),
        BenchCase("sdxl-lora-b4-gc", "sdxl", "lora", 4, 1024, gradient_checkpointing=True),
        BenchCase("sd15-lora-b16", "sd15", "lora", 16, 512),
        BenchCase("sd3-lora-b4", "sd3", "lora", 4, 1024),
        BenchCase("sd15-full-b4", "sd15", "full", 4, 512),
        BenchCase("sdxl-full-b1", "sdxl", "full", 1, 1024),
        # Issues 3 and 4 quote batch 1 as well.
        BenchCase("sd15-lora-b1", "sd15", "lora", 1, 512),
        BenchCase("sd15-lora-b4", "sd15", "lora", 4, 512),
        BenchCase("sdxl-lora-b1", "sdxl", "lora", 1, 1024),
        BenchCase("sd3-lora-b1", "sd3", "lora", 1, 1024),
    ]
}

#: The issue's table, in order.
TABLE = ["sdxl-lora-b4", "sdxl-lora-b4-gc", "sd15-lora-b16", "sd3-lora-b4", "sd15-full-b4", "sdxl-full-b1"]

#: Tiny stand-ins for ``--smoke`` on the CPU (tiny models of the same classes, 64 px).
SMOKE_CASES: dict[str, BenchCase] = {
    name: replace(case, resolution=64, batch=min(case.batch, 2)) for name, case in CASES.items()
}

_OFF = SpeedSettings(
    compile=False,
    methods=(),
    group_lora_projections=False,
    split_geglu=False,
    channels_last=False,
    tf32=False,
    cudnn_benchmark=False,
    fallback_to_eager=False,
    cuda_graphs=False,
)
_ON = SpeedSettings(fallback_to_eager=False)

#: Larger regions: a whole Transformer2DModel (norm, projections and all its blocks) per call,
#: and the samplers too.
COARSE_REGIONS = (
    "Transformer2DModel",
    "JointTransformerBlock",
    "ResnetBlock2D",
    "Downsample2D",
    "Upsample2D",
)

#: Our trainer with speed.py's parts switched on one after another. "default" is what a run gets
#: (the TrainConfig defaults), except that a failing compile fails the row instead of falling back.
VARIANTS: dict[str, SpeedSettings] = {
    "eager": _OFF,
    "eager+graphs": replace(_OFF, cuda_graphs=True),
    "blocks": replace(_OFF, compile=True, regions=TRANSFORMER_REGIONS),
    "regions": replace(_OFF, compile=True, regions=COMPILE_REGIONS),
    "default": _ON,
    "default-graphs": replace(_ON, cuda_graphs=False),
    "default-cl": replace(_ON, channels_last=False),
    "default-gn": replace(_ON, channels_last_group_norm=False),
    "default-glue": replace(_ON, methods=()),
    "default+mk": replace(_ON, compile_options=(("triton.multi_kernel", 1),)),
    "default-static": replace(_ON, dynamic=False),
    "coarse": replace(_ON, regions=COARSE_REGIONS),
    "default+cudnn-attn": replace(_ON, attention_backends=("CUDNN_ATTENTION",)),
    "default+cudagraphs": replace(_ON, mode="reduce-overhead"),
    "default-grouped": replace(_ON, group_lora_projections=False),
    "default-geglu": replace(_ON, split_geglu=False),
    "default+cdt": replace(_ON, compile_options=(("coordinate_descent_tuning", True),)),
}
