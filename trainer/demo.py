"""The demo: train a tiny SD1.5 LoRA on the bundled images on the CPU, then draw its loss curve and
a labelled strip of one prompt rendered with the base model and every checkpoint.

It runs the real paths end to end: the tiny model is saved as a single-file checkpoint and loaded
back by the trainer's loader, the LoRA files are kohya-format and loaded again for the strip.
About a minute on two CPU cores. ``python -m trainer demo --out DIR``.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .config import Arch, CaptionPolicy, DatasetPart, DatasetSource, DatasetSpec, TrainConfig
from .engine.events import Callbacks, RunState

log = logging.getLogger("finetune")

DEMO_DATASET = Path(__file__).resolve().parent / "assets" / "demo_dataset"
DEMO_RUN = "demo"
DEMO_PROMPT = "sks shape, red circle, white background"
DEMO_SEED = 1234


@dataclass
class DemoResult:
    """What the demo made.

    Attributes:
        ok: the run finished and both pictures were written.
        run_dir: the run folder (run.json, metrics.jsonl, samples/, checkpoints/).
        checkpoints: the LoRA files, oldest first.
        loss_png, sweep_png: the pictures.
        message: the run's closing message.
    """

    ok: bool
    run_dir: Path
    checkpoints: list[Path] = field(default_factory=list)
    loss_png: Path | None = None
    sweep_png: Path | None = None
    message: str = ""

    def describe(self) -> str:
        lines = [f"demo {'finished' if self.ok else 'failed'}: {self.message}", f"run folder: {self.run_dir}"]
        lines += [f"checkpoint: {p}" for p in self.checkpoints]
        if self.loss_png:
            lines.append(f"loss curve: {self.loss_png}")
        if self.sweep_png:
            lines.append(f"checkpoint strip: {self.sweep_png}")
        return "\n".join(lines)


def demo_config(
    *,
    out_dir: Path,
    base_model: Path,
    config_dir: Path,
    tokenizer_dir: Path,
    steps: int,
    checkpoint_every: int,
    resolution: int,
) -> TrainConfig:
    """The demo's run: caption shuffle keeping the trigger chunk, a LoRA on attention, FF and convs."""
    samples_per_epoch = 40  # 8 images x 5 repeats (the "5_shapes" folder)
    return TrainConfig(
        run_name=DEMO_RUN,
        output_dir=str(out_dir),
        base_model=str(base_model),
        tokenizer_dir=str(tokenizer_dir),
        config_dir=str(config_dir),
        arch=Arch.SD15,
        dataset=DatasetSpec(
            parts=[
                DatasetPart(
                    source=DatasetSource(folder=str(DEMO_DATASET)),
                    policy=CaptionPolicy(shuffle=True, keep_tokens=1),
                )
            ]
        ),
        resolution=resolution,
        min_bucket_resolution=64,
        max_bucket_resolution=max(64, resolution),
        lora_rank=8,
        lora_alpha=8.0,
        lora_targets="attention+ff+conv",
        learning_rate=5e-3,
        lr_scheduler="cosine",
        lr_warmup=0.1,
        epochs=max(1, math.ceil(steps / samples_per_epoch)),
        max_steps=steps,
        checkpoint_every=checkpoint_every,
        validation_every=checkpoint_every,
        validation_prompts=[DEMO_PROMPT],
        validation_seed=DEMO_SEED,
        validation_steps=8,
        validation_guidance=4.0,
        mixed_precision="fp32",
        compile=False,
        seed=42,
        pause_while_host_busy=False,
    )


def _render_sweep(config: TrainConfig, checkpoints: list, out: Path) -> Path:
    """Render the demo prompt with the base model and each checkpoint; lay them out with labels."""
    from .lora import load_lora
    from .models.load import load_base_model
    from .models.pipelines import make_pipeline, render
    from .strip import labeled_strip

    bundle = load_base_model(
        config.base_model, arch=config.arch, tokenizer_dir=config.tokenizer_dir, config_dir=config.config_dir
    )
    pipe = make_pipeline(bundle)

    def one() -> object:
        return render(
            pipe,
            DEMO_PROMPT,
            seed=DEMO_SEED,
            steps=config.validation_steps,
            guidance=config.validation_guidance,
            width=config.resolution,
            height=config.resolution,
        )

    images, labels = [one()], ["base"]
    for info in checkpoints:
        load_lora(info.path, bundle.denoiser, bundle.text_encoders, bundle.arch)
        images.append(one())
        labels.append(info.label)
    strip = labeled_strip(images, labels, title=DEMO_PROMPT)
    strip.save(out, format="PNG")
    return out


def run_demo(
    *,
    out_dir: str | Path = "finetune-demo",
    steps: int = 40,
    checkpoint_every: int = 10,
    resolution: int = 64,
    callbacks: Callbacks | None = None,
) -> DemoResult:
    """Build the tiny model, train the demo LoRA, and draw ``loss.png`` and ``sweep.png``.

    Args:
        out_dir: everything goes here: ``model/`` (the tiny checkpoint and its configs),
            ``finetune/demo/`` (the run; a previous demo run there is replaced), ``loss.png``,
            ``sweep.png``.
        steps: optimizer steps (40 by default; tests use fewer).
        checkpoint_every: checkpoint and validation cadence.
        resolution: training and render size in pixels.
        callbacks: progress listener (the CLI's progress bar).

    Returns:
        A :class:`DemoResult`.
    """
    from .checkpoints import CheckpointStore
    from .engine.loop import train
    from .models.tiny import TINY_TOKENIZER_DIR, save_tiny_checkpoint, tiny_bundle
    from .plot import plot_metrics
    from .runfolder import RunFolder

    if steps < 1:
        raise ValueError(f"steps must be 1 or more (got {steps})")
    out = Path(out_dir)
    model_dir = out / "model"
    base_model = model_dir / "tiny-sd15.safetensors"
    # The real architecture at a tiny size: the single file is what a user would download; its
    # sizes are not the shipped SD1.5 configs', so a diffusers copy next to it provides them.
    config_dir = model_dir / "tiny-sd15-diffusers"
    bundle = tiny_bundle(Arch.SD15, seed=0)
    save_tiny_checkpoint(bundle, base_model, single_file=True)
    save_tiny_checkpoint(bundle, config_dir, single_file=False)

    config = demo_config(
        out_dir=out,
        base_model=base_model,
        config_dir=config_dir,
        tokenizer_dir=TINY_TOKENIZER_DIR,
        steps=steps,
        checkpoint_every=checkpoint_every,
        resolution=resolution,
    )
    folder = RunFolder.for_run(out, DEMO_RUN)
    if folder.path.is_dir():
        shutil.rmtree(folder.path)  # the demo's own earlier run: start over
    result = train(config, callbacks=callbacks, device="cpu")
    store = CheckpointStore(folder.path, folder.name)
    checkpoints = store.list()
    demo = DemoResult(
        ok=False,
        run_dir=folder.path,
        checkpoints=[c.path for c in checkpoints if c.path],
        message=result.message,
    )
    if result.state != RunState.FINISHED:
        return demo
    demo.loss_png = plot_metrics(
        folder.read_metrics(0), out / "loss.png", title="demo LoRA loss (EMA in blue)"
    )
    demo.sweep_png = _render_sweep(config, checkpoints, out / "sweep.png")
    demo.ok = True
    return demo
