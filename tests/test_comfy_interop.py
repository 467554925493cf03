"""Every kind of file the pack writes, loaded by the REAL ComfyUI (and diffusers, for comparison).

The files and measures are those of ``interop_files.py`` (tiny models, two-step training runs,
rank 8 / alpha 4); ComfyUI's side runs in ComfyUI's own python through ``comfy_interop.py``
(its *Load Checkpoint*, *Load LoRA* and *Load Diffusion Model* code). Per file kind:

- LoRA: ComfyUI applies every module of the file, logs no "lora key not loaded", every patched
  weight moves by exactly Σ (alpha/rank)·up·down of the file (SD3's q/k/v land in thirds of the
  fused qkv), the denoiser's output changes, and that output equals diffusers' transformer/UNet
  with the pipeline's ``load_lora_weights`` on the same fixed input (latent, timestep,
  conditioning) to float tolerance — for SD3 this is the check that both consumers keep the trained
  alpha/rank.
- Full fine-tune: *Load Diffusion Model* detects the right model, consumes every tensor, and its
  denoiser's output equals ours on the same input.

The real-size versions of these checks (random-weight SD1.5/SDXL/SD3 Medium) are
``test_comfy_lora_compat.py`` and ``test_comfy_full_compat.py``; they need 7-16 GB each.

    COMFYUI_PATH=/work/comfy COMFYUI_PYTHON=/work/comfy-venv/bin/python \\
        .venv/bin/python -m pytest -q -s tests/test_comfy_interop.py
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from comfy_models import comfy_python
from interop_files import (
    KINDS,
    comfy_inputs,
    comfy_options,
    diffusers_lora_output,
    fixed_inputs,
    full_model_output,
    interop_bundle,
    legacy_sd3_file,
    run_denoiser,
    table,
    write_base_checkpoint,
    write_file,
)

pytestmark = pytest.mark.skipif(comfy_python() is None, reason="needs COMFYUI_PATH (a real ComfyUI checkout)")

COMFY_CLASS = {"sd15": "TinySD15", "sdxl": "TinySDXL", "sd3": "SD3"}
# ComfyUI computes W + ΔW in fp32 (weights < 1): rounding only.
MAX_DELTA_ERROR = 1e-6
# ComfyUI's and diffusers' denoisers are different code (attention kernels, fused qkv): agreement
# to this fraction of the output's scale, as in test_comfy_full_compat.
MAX_RELATIVE_OUTPUT_ERROR = 1e-4

_ROWS: dict[str, dict] = {}


def _run_comfy_interop(*args: str) -> None:
    root, python = comfy_python()
    env = {**os.environ, "COMFYUI_PATH": root, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = Path(__file__).with_name("comfy_interop.py")
    proc = subprocess.run(
        [python, str(script), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"comfy_interop {args[0]} failed:\n{(proc.stdout + proc.stderr)[-6000:]}")


def _relative(a, b) -> float:
    scale = float(b.abs().max())
    assert scale > 0
    return float((a - b).abs().max()) / scale


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name.replace(" ", "-"))
def test_comfyui_loads_the_file_exactly(kind, tmp_path):
    from safetensors.torch import load_file, save_file

    ours = write_file(kind, tmp_path)
    assert ours["state"] == "finished", ours["message"]
    bundle = interop_bundle(kind.arch)
    inputs = tmp_path / "inputs.safetensors"
    save_file({k: v.contiguous() for k, v in comfy_inputs(bundle).items()}, str(inputs))
    report_path = tmp_path / "comfy.json"
    options = tmp_path / "options.json"
    options.write_text(json.dumps(comfy_options(bundle)), encoding="utf-8")

    if kind.method == "lora":
        checkpoint = write_base_checkpoint(kind.arch, tmp_path / "base.safetensors")
        _run_comfy_interop(
            "lora",
            "--checkpoint",
            checkpoint,
            "--lora",
            ours["path"],
            "--options",
            str(options),
            "--inputs",
            str(inputs),
            "--out",
            str(report_path),
        )
        report = json.loads(report_path.read_text(encoding="utf-8"))
        assert report["class"] == COMFY_CLASS[kind.arch]
        assert report["not_loaded"] == [] and report["not_applied"] == []
        assert report["applied"] == report["modules"] > 0
        assert (report["patches"]["clip"] > 0) == kind.text_encoders
        assert report["max_delta_error"] <= MAX_DELTA_ERROR
        assert report["largest_delta"] > 1e-3
        ignored = len(report["not_loaded"]) + len(report["not_applied"])
        # The same file in diffusers gives the same denoiser (the trained alpha/rank kept by both).
        theirs = load_file(report["output"])["out"]
        agreement = _relative(theirs, diffusers_lora_output(kind, ours["path"]))
    else:
        _run_comfy_interop(
            "full",
            "--model",
            ours["path"],
            "--options",
            str(options),
            "--inputs",
            str(inputs),
            "--out",
            str(report_path),
        )
        report = json.loads(report_path.read_text(encoding="utf-8"))
        assert report["class"] == COMFY_CLASS[kind.arch]
        assert report["ignored"] == []
        assert report["applied"] == report["file_tensors"] == report["model_tensors"]
        assert report["max_weight_error"] == 0.0
        theirs = load_file(report["output"])["out"]
        agreement = _relative(theirs, full_model_output(kind, ours["trained"]))
        ignored = len(report["ignored"])
        base = run_denoiser(bundle.denoiser, fixed_inputs(bundle))
        report.update(
            modules=report["file_tensors"],
            max_delta_error=report["max_weight_error"],
            output_change=float((theirs - base).abs().max()),
        )
    assert agreement <= MAX_RELATIVE_OUTPUT_ERROR, agreement
    _ROWS[kind.name] = {
        "kind": kind.name,
        "consumer": "ComfyUI",
        "modules": report["modules"],
        "applied": report["applied"],
        "ignored": ignored,
        "max_delta_error": report["max_delta_error"],
        "output_change": report["output_change"],
        "agreement": agreement,
    }


def test_print_the_table():
    """Prints the file kind x ComfyUI table (run with -s); every kind above was measured."""
    assert sorted(_ROWS) == sorted(k.name for k in KINDS)
    rows = [_ROWS[k.name] for k in KINDS]
    print("\n" + table(rows))
    print("relative |ComfyUI − diffusers/ours| denoiser output on one fixed input:")
    for row in rows:
        print(f"  {row['kind']:32} {row['agreement']:.2e}")


def test_sd3_files_of_earlier_versions_still_load_in_comfyui(tmp_path):
    """``transformer.*.alpha`` + ``lora_te1_``/``lora_te2_``: every module applied, the same model."""
    from safetensors.torch import load_file, save_file

    kind = next(k for k in KINDS if k.arch == "sd3" and k.method == "lora" and k.text_encoders)
    ours = write_file(kind, tmp_path)
    assert ours["state"] == "finished", ours["message"]
    bundle = interop_bundle(kind.arch)
    inputs = tmp_path / "inputs.safetensors"
    save_file({k: v.contiguous() for k, v in comfy_inputs(bundle).items()}, str(inputs))
    options = tmp_path / "options.json"
    options.write_text(json.dumps(comfy_options(bundle)), encoding="utf-8")
    checkpoint = write_base_checkpoint(kind.arch, tmp_path / "base.safetensors")
    outputs, reports = {}, {}
    for name, lora in (
        ("new", ours["path"]),
        ("old", legacy_sd3_file(ours["path"], tmp_path / "old.safetensors")),
    ):
        report_path = tmp_path / f"{name}.json"
        args = [
            "--checkpoint",
            checkpoint,
            "--lora",
            lora,
            "--options",
            str(options),
            "--inputs",
            str(inputs),
        ]
        _run_comfy_interop("lora", *args, "--out", str(report_path))
        report = json.loads(report_path.read_text(encoding="utf-8"))
        assert report["not_loaded"] == [] and report["not_applied"] == []
        assert report["applied"] == report["modules"]
        assert report["max_delta_error"] <= MAX_DELTA_ERROR
        outputs[name] = load_file(report["output"])["out"]
        reports[name] = report
    # 21 transformer modules and 2 CLIPs x 3 layers x 6 projections, in both layouts.
    assert reports["old"]["modules"] == reports["new"]["modules"] == 21 + 36
    assert reports["old"]["patches"] == reports["new"]["patches"] == {"model": 21, "clip": 36}
    assert _relative(outputs["old"], outputs["new"]) <= 1e-6
