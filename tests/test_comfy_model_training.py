"""Training LoRA on a MODEL ComfyUI holds (nodes/comfy_denoiser.py), inside real ComfyUI on the CPU.

Run: ``COMFYUI_PATH=/path/to/ComfyUI <its python> -m pytest -q tests/test_comfy_model_training.py``.
Skipped without ``COMFYUI_PATH``.

Each family is a tiny random-weight model built with ComfyUI's own classes (tests/comfy_tiny.py):
SD1.5 and SDXL (epsilon; SDXL with its size conditioning), Flux (flow, Flux shift), SD3.5 (flow, MMDiT with RMS q/k norms and a second
self-attention) and Lumina 2 (flow, NextDiT). For each: the run finishes through the trainer's loop;
on flat-colour images with colour captions the loss falls clearly; the LoRA files load in ComfyUI's
own LoRA loader with zero unloaded keys and change the render; a render of the base model during
the run (at a checkpoint, from the training thread, which makes ComfyUI swap the training clone out)
equals the render before the run, and the run goes on after it (the clone is loaded again).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.comfyui

if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set", allow_module_level=True)

import comfy_tiny  # noqa: E402
from comfy_server import import_pack  # noqa: E402
from log_capture import captured_logs  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from train_helpers import tiny_config  # noqa: E402

from trainer.engine.events import Callbacks, RunState  # noqa: E402
from trainer.engine.loop import train  # noqa: E402

comfy = comfy_tiny.import_comfy()
backend = import_pack("nodes.comfy_denoiser")
host = import_pack("nodes.host")

STEPS = 60
FAMILIES = ["SD15", "SDXL", "Flux", "SD3", "Lumina2"]
# What the files must say about the architecture (kohya's ss_base_model_version, modelspec).
ARCHITECTURE = {
    "SD15": ("sd_v1", "stable-diffusion-v1/lora"),
    "SDXL": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    "Flux": ("flux1", "flux-1-dev/lora"),
    "SD3": ("sd3", "stable-diffusion-3/lora"),
    "Lumina2": ("lumina2", "lumina-2/lora"),
}
# One trained layer's file key per family: diffusers names for UNets (kohya/A1111), ComfyUI's own
# (BFL / SAI) module paths for the transformers, as kohya's Flux and SD3 trainers write them.
SAMPLE_KEY = {
    "SD15": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "SDXL": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "Flux": "lora_unet_double_blocks_0_img_attn_qkv",
    "SD3": "lora_unet_joint_blocks_0_x_block_attn2_qkv",
    "Lumina2": "lora_unet_layers_0_attention_qkv",
}


def render(model, vae, clip, prompt: str = "red") -> torch.Tensor:
    positive = host.encode_text(clip, prompt)
    negative = host.encode_text(clip, "")
    flow = backend.prediction_of(model) == "flow"
    with torch.inference_mode():
        return host.sample_image(
            model, vae, positive, negative, seed=3, steps=3, cfg=1.0, sampler_name="euler",
            scheduler="simple" if flow else "normal", width=64, height=64,
        ).clone()  # fmt: skip


def load_lora(model, path: Path):
    """Stock Load LoRA (model only), returning the patched MODEL and ComfyUI's log lines."""
    with captured_logs() as messages:
        patched, _ = host.apply_lora_file(model, None, path, strength_model=1.0, strength_clip=0.0)
    return patched, messages


class BaseRenderAtCheckpoint(Callbacks):
    """Renders the base MODEL from the training thread at the first checkpoint (mid-run)."""

    def __init__(self, model, vae, clip):
        self.model, self.vae, self.clip = model, vae, clip
        self.image: torch.Tensor | None = None
        self.steps: list[int] = []

    def on_checkpoint(self, run, step, path):
        self.steps.append(step)
        if self.image is None:
            self.image = render(self.model, self.vae, self.clip)


def _poison_freed_memory(sizes: list[int]) -> None:
    """Leaves NaN in freed blocks of these sizes, as earlier tests of a long session leave garbage."""
    torch.empty(16 << 20, dtype=torch.uint8)  # freed at once: glibc then serves big blocks from its heap
    for size in sizes:
        torch.full((size,), float("nan"))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tiny_model_is_the_same_whatever_memory_it_is_built_in(family):
    # SD3's pos_embed is a buffer ComfyUI allocates with torch.empty; left unfilled, it held NaN after
    # the rest of the suite had run and the SD3 run's loss was NaN at its first step.
    first = comfy_tiny.tiny_model(family).model.diffusion_model.state_dict()
    _poison_freed_memory(sorted({v.numel() for v in first.values()}, reverse=True))
    again = comfy_tiny.tiny_model(family).model.diffusion_model.state_dict()
    assert list(again) == list(first)
    assert [k for k, v in again.items() if v.is_floating_point() and not v.isfinite().all()] == []
    assert [k for k in first if not torch.equal(again[k], first[k])] == []


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return comfy_tiny.colour_dataset(tmp_path_factory.mktemp("colours"))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lora_trained_on_the_model_loads_in_stock_comfyui(tmp_path, data, family):
    model = comfy_tiny.tiny_model(family)
    vae = comfy_tiny.tiny_vae(comfy_tiny.LATENT_CHANNELS[family])
    clip = comfy_tiny.WordClip()
    before = render(model, vae, clip)

    config = tiny_config(
        tmp_path, data, run_name=family.lower(), max_steps=STEPS, epochs=100, batch_size=2,
        learning_rate=1e-2, checkpoint_every=STEPS // 2, lora_targets="attention+ff",
        validation_prompts="red", validation_every=STEPS, validation_steps=3, validation_guidance=1.0,
        validation_seed=3, validation_width=64, validation_height=64,
    )  # fmt: skip
    denoisers = []

    def loader(_config):
        denoisers.append(backend.ComfyDenoiser(model, clip, vae))
        return denoisers[-1]

    watcher = BaseRenderAtCheckpoint(model, vae, clip)
    result = train(config, callbacks=watcher, model_loader=loader, device="cpu")
    assert result.state == RunState.FINISHED, result.message
    assert result.step == STEPS and watcher.steps == [STEPS // 2, STEPS]

    # The base model renders exactly as before while the run holds its LoRA, and after it.
    assert torch.equal(watcher.image, before)
    assert torch.equal(render(model, vae, clip), before)
    # Rendering the base made ComfyUI swap the training clone out; the run loaded it back.
    assert denoisers[0].reloads >= 2

    run = json.loads((Path(result.run_dir) / "run.json").read_text())
    assert run["model"]["arch"] == family
    assert run["model"]["prediction_type"] == ("epsilon" if family in ("SD15", "SDXL") else "flow")

    losses = [
        r["loss"] for r in map(json.loads, (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines())
    ]
    assert len(losses) == STEPS
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    print(f"{family}: mean loss of the first 15 steps {first:.4f}, of the last 15 {last:.4f}")
    assert last < 0.8 * first, (first, last)

    path = Path(result.final_checkpoint)
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert stems == set(denoisers[0].keys.values())
    assert {f"{s}.{part}" for s in stems for part in ("lora_down.weight", "lora_up.weight", "alpha")} == keys
    assert all(s.startswith("lora_unet_") for s in stems)
    assert SAMPLE_KEY[family] in stems
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == ARCHITECTURE[family]
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"

    patched, log = load_lora(model, path)
    assert [m for m in log if "lora key not loaded" in m] == []
    assert len(patched.patches) == len(stems)  # every layer patched
    with_lora = render(patched, vae, clip)
    assert (with_lora - before).abs().max() > 1e-3
    # The run's validation render (its own adapters, through ComfyUI's sampler) is what stock Load
    # LoRA renders with the file, but for fp16 storage of the file and 8-bit PNG rounding.
    sample = Path(result.run_dir) / "samples" / f"step{STEPS:05d}-0.png"
    pixels = torch.from_numpy(np.array(Image.open(sample).convert("RGB"))).float() / 255
    assert (pixels - with_lora[0]).abs().max() < 0.02


# The blocks gradient checkpointing must recompute, by ComfyUI class: all of them, nothing else.
BLOCK_CLASSES = {
    "SD15": {"ResBlock", "SpatialTransformer", "Downsample", "Upsample"},
    "Flux": {"DoubleStreamBlock", "SingleStreamBlock"},
    "SD3": {"JointBlock"},
    "Lumina2": {"JointTransformerBlock"},
}


def _train_and_measure(tmp_path, data, family: str, *, checkpointing: bool):
    """Three steps with LoRA dropout on; returns the final LoRA's tensors, the blocks the run
    recomputed and the bytes autograd kept for backward outside recomputed blocks."""
    model = comfy_tiny.tiny_model(family)
    vae, clip = comfy_tiny.tiny_vae(comfy_tiny.LATENT_CHANNELS[family]), comfy_tiny.WordClip()
    config = tiny_config(
        tmp_path, data, run_name=f"{family.lower()}-gc{int(checkpointing)}", max_steps=3, epochs=100,
        batch_size=2, learning_rate=1e-2, lora_targets="attention+ff", lora_dropout=0.1,
        gradient_checkpointing=checkpointing,
    )  # fmt: skip
    denoisers = []

    def loader(_config):
        denoisers.append(backend.ComfyDenoiser(model, clip, vae))
        return denoisers[-1]

    kept = [0]

    def pack(t):
        kept[0] += t.numel() * t.element_size()
        return t

    # Non-reentrant checkpointing keeps its blocks' tensors through hooks of its own, inside these.
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = train(config, model_loader=loader, device="cpu")
    assert result.state == RunState.FINISHED, result.message
    with safe_open(result.final_checkpoint, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads((Path(result.run_dir) / "run.json").read_text())["model"]
    assert info["checkpointed_blocks"] == len(denoisers[0].checkpointed)
    rows = (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(r)["loss"] for r in rows]
    return tensors, denoisers[0].checkpointed, kept[0], losses


@pytest.mark.parametrize("family", ["SD15", "Flux", "SD3", "Lumina2"])
def test_gradient_checkpointing_recomputes_every_block_and_trains_the_same_lora(tmp_path, data, family):
    plain, none, plain_bytes, plain_losses = _train_and_measure(tmp_path, data, family, checkpointing=False)
    again, blocks, kept_bytes, losses = _train_and_measure(tmp_path, data, family, checkpointing=True)
    expected = [
        name
        for name, m in comfy_tiny.tiny_model(family).model.diffusion_model.named_modules()
        if type(m).__name__ in BLOCK_CLASSES[family]
    ]
    assert none == [] and sorted(blocks) == sorted(expected) and len(blocks) >= 2
    print(
        f"{family}: autograd kept {plain_bytes / 2**20:.1f} MiB plain, {kept_bytes / 2**20:.1f} MiB checkpointed"
    )
    assert kept_bytes < 0.5 * plain_bytes
    # The recomputation replays the dropout draws and ComfyUI's kernels: the same losses, bit for
    # bit, and the same LoRA but for the rounding of gradients summed in another order (SD1.5's
    # convolutions; the transformers agree bit for bit).
    assert losses == plain_losses
    assert plain.keys() == again.keys()
    gap = max((plain[k].float() - again[k].float()).abs().max().item() for k in plain)
    scale = max(plain[k].float().abs().max().item() for k in plain if k.endswith(".weight"))
    print(f"{family}: largest difference of a LoRA weight, checkpointed vs plain: {gap:.2e} (of {scale:.2e})")
    assert gap <= 1e-2 * scale
    assert any(not torch.equal(plain[k], torch.zeros_like(plain[k])) for k in plain if "lora_up" in k)


def test_a_lora_of_the_denoiser_leaves_the_clip_encoding_as_it_was(tmp_path):
    """What lets the Checkpoint Sweep encode each prompt once: stock Load LoRA clones the CLIP for
    any LoRA, and ``host.same_text_encoders`` tells a clone without text-encoder patches (our
    MODEL-path files) from one a kohya ``lora_te_…`` key patched."""
    from safetensors.torch import save_file

    model = comfy_tiny.tiny_model("SD15")
    clip = comfy.sd.CLIP(
        comfy.supported_models.SD15(dict(comfy_tiny.CONFIGS["SD15"])).clip_target(state_dict={})
    )
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    files = {"denoiser-only": {}, "with-te": {
        f"{te}.lora_down.weight": torch.zeros(4, 768), f"{te}.lora_up.weight": torch.zeros(768, 4),
        f"{te}.alpha": torch.tensor(4.0),
    }}  # fmt: skip
    clips = {}
    for name, tensors in files.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        _, clips[name] = host.apply_lora_file(
            model, clip, tmp_path / f"{name}.safetensors", strength_model=1.0, strength_clip=1.0
        )
    assert clips["denoiser-only"] is not clip  # Load LoRA cloned it all the same
    assert host.same_text_encoders(clip, clip) and host.same_text_encoders(clip, clips["denoiser-only"])
    assert not host.same_text_encoders(clip, clips["with-te"])
    assert not host.same_text_encoders(clip, None)


def test_a_family_this_path_cannot_train_is_refused_naming_it(tmp_path, data):
    model = comfy_tiny.tiny_model("AuraFlow")
    config = tiny_config(tmp_path, data)
    with pytest.raises(ValueError) as info:
        backend.check_trainable(model, config)
    assert str(info.value).startswith(
        "Train LoRA (Model): ComfyUI detected this model as AuraFlow (AuraFlow), a family this node cannot train yet"
    )


def test_options_this_path_does_not_offer_are_refused_at_queue_time(tmp_path, data):
    model = comfy_tiny.tiny_model("SD15")
    with pytest.raises(ValueError, match="'attention\\+ff\\+conv' is not available for a ComfyUI MODEL"):
        backend.check_trainable(model, tiny_config(tmp_path, data, lora_targets="attention+ff+conv"))
    with pytest.raises(ValueError, match="train_text_encoder is not available on a ComfyUI MODEL"):
        backend.check_trainable(model, tiny_config(tmp_path, data, train_text_encoder=True))
    assert backend.check_trainable(model, tiny_config(tmp_path, data)) == "SD15"


def test_keys_comfyui_would_not_apply_are_refused(tmp_path):
    lora = import_pack("nodes.comfy_lora")
    model = comfy_tiny.tiny_model("Flux")
    with pytest.raises(lora.LoraKeyError, match="would not apply 1 of 2 keys for this Flux model"):
        lora.verify_keys(
            model.model,
            {"double_blocks.0.img_attn.qkv": "lora_unet_double_blocks_0_img_attn_qkv",
             "double_blocks.0.img_attn.proj": "lora_unet_double_blocks_0_img_attn_nope"},
            "Flux",
        )  # fmt: skip


def test_a_stopped_run_resumes_exactly(tmp_path, data):
    """Stop at step 10 and resume: the step-20 LoRA equals an uninterrupted run's."""
    from trainer.engine.events import Commands

    model = comfy_tiny.tiny_model("SD15")
    vae, clip = comfy_tiny.tiny_vae(4), comfy_tiny.WordClip()

    def loader(_config):
        return backend.ComfyDenoiser(model, clip, vae)

    straight = tiny_config(
        tmp_path, data, run_name="straight", max_steps=20, epochs=100, batch_size=2, checkpoint_every=5
    )
    assert train(straight, model_loader=loader, device="cpu").state == RunState.FINISHED

    commands = Commands()

    class StopAt10(Callbacks):
        def on_progress(self, progress):
            if progress.step == 10:
                commands.stop()

    split = tiny_config(
        tmp_path, data, run_name="split", max_steps=20, epochs=100, batch_size=2, checkpoint_every=5
    )
    first = train(split, callbacks=StopAt10(), commands=commands, model_loader=loader, device="cpu")
    assert (first.state, first.step) == (RunState.STOPPED, 10)
    second = train(split, model_loader=loader, device="cpu", resume=True)
    assert (second.state, second.step) == (RunState.FINISHED, 20)

    def tensors(path):
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    a, b = tensors(straight_final := first_path(straight)), tensors(first_path(split))
    assert a.keys() == b.keys() and straight_final.endswith("straight-step00020.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def first_path(config) -> str:
    return str(
        Path(config.output_dir)
        / "finetune"
        / config.run_name
        / "checkpoints"
        / f"{config.run_name}-step00020.safetensors"
    )


# ------------------------------------------------------------------------------------------------
# Parity: the same SD1.5 through both backends


class BundleVae:
    """ComfyUI's VAE interface (``encode`` of ``[B, H, W, 3]`` pixels in 0..1) over a diffusers
    bundle's VAE, so both backends train on the same latents (the posterior mean)."""

    def __init__(self, bundle):
        self.bundle = bundle

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.movedim(-1, 1) * 2.0 - 1.0
        return self.bundle.vae.encode(pixels).latent_dist.mean


class BundleClip:
    """ComfyUI's CLIP interface over a diffusers bundle's text encoder (the last hidden state, as
    the diffusers backend encodes SD1.5 prompts)."""

    def __init__(self, bundle):
        self.bundle = bundle

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens(self, text, return_pooled=False, return_dict=False):
        from trainer.models.text import encode_prompts

        return {"cond": encode_prompts(self.bundle, [text], device="cpu").prompt_embeds}


def test_both_backends_train_the_same_sd15_to_the_same_loss(tmp_path, data):
    """The tiny SD1.5 of trainer.models.tiny, as a diffusers bundle and as ComfyUI's UNet with the
    same weights: 200 steps of the same data and settings give mean losses within 5 %."""
    from trainer.config import Arch
    from trainer.models.convert import bundle_to_original
    from trainer.models.tiny import tiny_bundle

    bundle = tiny_bundle(Arch.SD15, seed=0)
    prefix = "model.diffusion_model."
    weights = {k[len(prefix) :]: v for k, v in bundle_to_original(bundle).items() if k.startswith(prefix)}
    model = comfy_tiny.tiny_model("SD15", state_dict=weights)

    steps = 200
    settings = dict(max_steps=steps, epochs=1000, batch_size=2, learning_rate=1e-3, checkpoint_every=steps)
    diffusers_run = train(
        tiny_config(tmp_path, data, run_name="diffusers", **settings),
        model_loader=lambda c: bundle,
        device="cpu",
    )
    comfy_run = train(
        tiny_config(tmp_path, data, run_name="comfy", **settings),
        model_loader=lambda c: backend.ComfyDenoiser(model, BundleClip(bundle), BundleVae(bundle)),
        device="cpu",
    )
    means = []
    for result in (diffusers_run, comfy_run):
        assert result.state == RunState.FINISHED, result.message
        rows = (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(r)["loss"] for r in rows]
        assert len(losses) == steps
        means.append(sum(losses) / steps)
    print(f"mean loss over {steps} steps: diffusers {means[0]:.5f}, ComfyUI MODEL {means[1]:.5f}")
    assert abs(means[1] - means[0]) / means[0] < 0.05, means


def test_the_node_refuses_an_untrainable_family_before_queuing(data):
    """Train LoRA (Model) raises at queue time (in execute, before the run manager is asked)."""
    from train_helpers import spec_for

    nodes = import_pack("nodes.model_train_nodes")
    model = comfy_tiny.tiny_model("AuraFlow")
    with pytest.raises(ValueError, match="^Train LoRA \\(Model\\): ComfyUI detected this model as AuraFlow"):
        nodes.TrainLoRAModel.execute(
            model, comfy_tiny.WordClip(), comfy_tiny.tiny_vae(4), spec_for(data), run_name="aura"
        )
    with pytest.raises(ValueError, match="connect the CLIP and the VAE"):
        nodes.TrainLoRAModel.execute(model, None, None, spec_for(data), run_name="aura")


def test_a_sampling_without_a_training_objective_is_refused(tmp_path, data):
    """An SD1.5 switched to EDM sampling (as ComfyUI's ModelSamplingContinuousEDM node does)."""
    import comfy.model_sampling as ms

    class EDMSampling(ms.ModelSamplingContinuousEDM, ms.EDM):
        pass

    model = comfy_tiny.tiny_model("SD15")
    patched = model.clone()
    patched.add_object_patch("model_sampling", EDMSampling(model.model.model_config))
    with pytest.raises(ValueError) as info:
        backend.check_trainable(patched, tiny_config(tmp_path, data))
    assert str(info.value) == (
        "Train LoRA (Model): this SD15 model samples with ModelSamplingContinuousEDM + EDM, which has no "
        "training objective here; remove the ModelSampling node that set it (epsilon, v and flow models train)"
    )
