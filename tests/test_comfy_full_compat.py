"""Our full fine-tune files in the REAL ComfyUI: *Load Diffusion Model* detects them and computes
exactly what our diffusers model computes.

For SD1.5, SDXL and SD3 Medium at real size (random weights, built with ComfyUI's own model
classes by ``comfy_models.py``), the denoiser is read into diffusers the way our loader reads
single files, every weight is moved by a seeded random step (a stand-in for training: a real
full fine-tune of a real-size UNet needs its optimizer state too, 40 GB for SDXL), and
``trainer.models.convert.save_diffusion_model`` writes it. ComfyUI's own
``comfy.sd.load_diffusion_model`` (what the *Load Diffusion Model* node calls) must detect the
right model type, and its ``diffusion_model(x, timesteps, context[, y])`` must equal our
``unet(x, t, encoder_hidden_states[, added_cond_kwargs])`` / ``transformer(...)`` on the same fixed
input (64 px -> 8x8 latent), fp32 on the CPU, to 1e-4 of the output's scale.

SD1.5 is saved the way the trainer saves a full fine-tune (fp32) and loaded with ComfyUI's CPU
defaults (fp32). SDXL and SD3 are saved in fp16 and loaded with fp16 weights (what ComfyUI does on
a GPU; on the CPU it casts each layer to fp32 as it runs it), which halves the memory on this
24 GB machine; our model then runs in fp32 on exactly the fp16 weights it saved.

How it runs: see ``test_comfy_lora_compat.py`` (``COMFYUI_PATH`` set or skipped; ComfyUI in a
subprocess of its own python; our model in a spawned child)::

    cd /work/main && COMFYUI_PATH=/work/comfy .venv/bin/python -m pytest -q -x tests/test_comfy_full_compat.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from comfy_models import (
    COMFY_CLASS,
    available_gib,
    cached_checkpoint,
    comfy_python,
    compat_threads,
    in_child,
    run_comfy,
)

pytestmark = pytest.mark.skipif(comfy_python() is None, reason="needs COMFYUI_PATH (a real ComfyUI checkout)")

MAX_RELATIVE_ERROR = 1e-4
# What a saved file holds per arch (see the module docstring).
SAVE_FP16 = {"sd15": False, "sdxl": True, "sd3": True}
TIMESTEP = 500.0
# Free memory (GiB) a run needs at its peak; a shared machine with less skips rather than OOM-kills.
NEEDS_GIB = {"sd15": 8, "sdxl": 13, "sd3": 11}


# --------------------------------------------------------------------------------------------
# Our side (runs in a spawned child)


def _inputs(arch, denoiser, generator) -> tuple[dict, dict]:
    """(ComfyUI's denoiser arguments, diffusers' keyword arguments) for one fixed 8x8-latent input."""
    import torch

    from trainer.config import Arch

    x = torch.randn(1, denoiser.config.in_channels, 8, 8, generator=generator)
    t = torch.tensor([TIMESTEP])
    if arch == Arch.SD3:
        context = torch.randn(1, 77, denoiser.config.joint_attention_dim, generator=generator)
        pooled = torch.randn(1, denoiser.config.pooled_projection_dim, generator=generator)
        comfy = {"x": x, "timesteps": t, "context": context, "y": pooled}
        ours = {
            "hidden_states": x,
            "timestep": t,
            "encoder_hidden_states": context,
            "pooled_projections": pooled,
        }
        return comfy, ours
    context = torch.randn(1, 77, denoiser.config.cross_attention_dim, generator=generator)
    comfy = {"x": x, "timesteps": t, "context": context}
    ours = {"sample": x, "timestep": t, "encoder_hidden_states": context}
    if arch == Arch.SDXL:
        text_embeds = torch.randn(1, 1280, generator=generator)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        ours["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        # ComfyUI's UNet takes the finished vector: pooled embeds, then the size/crop ids embedded
        # with 256 sinusoidal channels each (what diffusers' add_time_proj does inside the UNet).
        with torch.no_grad():
            ids = denoiser.add_time_proj(time_ids.flatten()).reshape(1, -1)
        comfy["y"] = torch.cat([text_embeds, ids], dim=-1)
    return comfy, ours


def _load_denoiser(checkpoint: str, arch: str, dtype):
    """The checkpoint's denoiser in diffusers form, read the way our loader reads single files.

    ``trainer.models.load`` goes through diffusers' ``from_single_file`` with our shipped configs;
    this does the same for the denoiser alone, in ``dtype`` from the start (our loader builds every
    part in fp32 first: 15 GB at the peak for SDXL, more than this shared machine can spare).
    """
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from trainer.config import Arch
    from trainer.models.configs import shipped_config_dir
    from trainer.models.detect import LDM_PREFIX
    from trainer.models.load import WeightFile

    cls, sub = (SD3Transformer2DModel, "transformer") if arch == "sd3" else (UNet2DConditionModel, "unet")
    weights = WeightFile(checkpoint, allow_pickle=False).tensors(LDM_PREFIX)
    model = cls.from_single_file(
        weights,
        config=str(shipped_config_dir(Arch(arch))),
        subfolder=sub,
        local_files_only=True,
        torch_dtype=dtype,
    )
    return model.eval()


def save_and_run_ours(checkpoint: str, workdir: str, arch: str) -> dict:
    """Load the denoiser, move every weight, save it with ``save_diffusion_model`` and run it once.

    Returns:
        ``model`` (the saved file), ``inputs`` (safetensors for ComfyUI), ``ours`` (our output).
    """
    import torch
    from diffusers.utils import logging as diffusers_logging
    from safetensors.torch import save_file

    from trainer.config import Arch
    from trainer.models.convert import save_diffusion_model

    torch.set_num_threads(compat_threads())
    # diffusers warns about casting with .to() on every cast; this child casts on purpose.
    diffusers_logging.set_verbosity_error()
    work = Path(workdir)
    denoiser = _load_denoiser(checkpoint, arch, torch.float16 if SAVE_FP16[arch] else torch.float32)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for param in denoiser.parameters():
            # A step the size a fine-tune takes, relative to each weight's own scale.
            scale = 0.01 * (float(param.float().abs().mean()) or 1.0)
            param.add_((torch.randn(param.shape, generator=generator) * scale).to(param.dtype))
    path = work / f"{arch}-full.safetensors"
    save_diffusion_model(denoiser, Arch(arch), str(path))
    denoiser.float()  # for fp16 files: exactly the weights the file holds, computed in fp32
    comfy_inputs, our_inputs = _inputs(Arch(arch), denoiser, torch.Generator().manual_seed(99))
    with torch.no_grad():
        output = denoiser(**our_inputs, return_dict=False)[0]
    save_file({k: v.contiguous() for k, v in comfy_inputs.items()}, str(work / "inputs.safetensors"))
    save_file({"out": output.float().contiguous()}, str(work / "ours.safetensors"))
    return {
        "model": str(path),
        "inputs": str(work / "inputs.safetensors"),
        "ours": str(work / "ours.safetensors"),
    }


# --------------------------------------------------------------------------------------------
# The test


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd3"])
def test_stock_diffusion_model_loader_gives_our_output(arch, tmp_path):
    from safetensors.torch import load_file

    if available_gib() < NEEDS_GIB[arch]:
        pytest.skip(f"{arch} needs ~{NEEDS_GIB[arch]} GiB of free memory, {available_gib():.1f} available")
    checkpoint = cached_checkpoint(arch)
    ours = in_child(save_and_run_ours, str(checkpoint), str(tmp_path), arch)

    report_path = tmp_path / "report.json"
    theirs_path = tmp_path / "theirs.safetensors"
    args = [
        "--model",
        ours["model"],
        "--inputs",
        ours["inputs"],
        "--out",
        str(theirs_path),
        "--report",
        str(report_path),
    ]
    run_comfy("denoise", *args, *(["--fp16-weights"] if SAVE_FP16[arch] else []))
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["class"] == COMFY_CLASS[arch]
    assert report["compute_dtype"] == "torch.float32"
    assert report["dtype"] == ("torch.float16" if SAVE_FP16[arch] else "torch.float32")

    mine = load_file(ours["ours"])["out"]
    theirs = load_file(str(theirs_path))["out"]
    assert theirs.shape == mine.shape
    scale = float(mine.abs().max())
    diff = float((theirs - mine).abs().max())
    assert scale > 0
    assert diff <= MAX_RELATIVE_ERROR * scale, (diff, scale)
    print(
        f"\n{arch}: ComfyUI detected {report['class']} ({report['model_class']}, {report['dtype']}); "
        f"output max |ComfyUI - ours| = {diff:.3g} (output max {scale:.3g}, relative {diff / scale:.3g})"
    )
