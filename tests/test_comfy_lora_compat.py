"""Our LoRA files in the REAL ComfyUI: every module loads and changes its weight by (alpha/rank)·up·down.

For SD1.5, SDXL and SD3 Medium at real size (random weights, built with ComfyUI's own model
classes by ``comfy_models.py``), a LoRA is trained for 2 steps at 64 px on the CPU by our trainer
(``trainer.engine.loop.train``, rank 4, alpha 2, ``attention+ff+conv`` targets, text encoders too)
and its final checkpoint is given to ComfyUI's own ``comfy.sd.load_lora_for_models`` — what the
stock *Load LoRA* node calls. The test asserts, per arch:

- ComfyUI detects the checkpoint as the right model and logs no ``lora key not loaded``;
- ComfyUI registers exactly one patch per LoRA module of our file (SD3 files hold alpha/rank in
  lora_up, so ComfyUI's scale there is 1);
- each module changes the ComfyUI weight that our own diffusers -> original key tables say it
  belongs to (for SD3: a third of the fused qkv) by exactly (alpha/rank)·up·down, computed from the
  file's tensors; and every module whose update is non-zero changes its weight. Two steps leave
  lora_up at zero only on layers whose output never reaches the loss (see ``_dead_layer``).

How it runs: ``COMFYUI_PATH`` (and optionally ``COMFYUI_PYTHON``, see ``comfy_models.py``) must be
set, else the module is skipped. The test process itself runs under any python with the pack's
dependencies; the ComfyUI steps run as subprocesses of ComfyUI's python, and our training runs in a
spawned child, so a real-size model's memory is returned before the next step loads another one.
Training fp32 on the CPU needs ~15 GB free for SDXL (an arch is skipped, with the reason, when
that much is not available). Slow: minutes per arch (``FINETUNE_COMPAT_THREADS``, default 1, sets
the CPU threads). Checkpoints are cached under ``/tmp/finetune-comfy-models`` between runs::

    cd /work/main && COMFYUI_PATH=/work/comfy .venv/bin/python -m pytest -q -x tests/test_comfy_lora_compat.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from comfy_models import (
    CLIP_SLOTS,
    COMFY_CLASS,
    available_gib,
    cached_checkpoint,
    comfy_python,
    compat_threads,
    in_child,
    run_comfy,
)

pytestmark = pytest.mark.skipif(comfy_python() is None, reason="needs COMFYUI_PATH (a real ComfyUI checkout)")

RANK = 4
ALPHA = 2.0
STEPS = 2
# |ΔW - (alpha/rank)·up·down| may differ from 0 only by fp32 rounding of W + ΔW (weights are < 1).
MAX_ERROR = 1e-6
# SDXL and SD3 are checked with fp16 weights in ComfyUI (fp32 copies of them would not fit beside
# everything else on a 24 GB machine); see comfy_models.check_lora.
FP16_WEIGHTS = {"sd15": False, "sdxl": True, "sd3": True}
# Free memory (GiB) a run needs at its peak (training in fp32 on the CPU); a shared machine with
# less skips rather than OOM-kills.
NEEDS_GIB = {"sd15": 7, "sdxl": 16, "sd3": 14}


# --------------------------------------------------------------------------------------------
# Our side (runs in a spawned child)


def _denoiser_targets(denoiser, arch: str) -> dict[str, tuple[str, tuple[int, int]]]:
    """diffusers module name -> (ComfyUI weight key, rows of it), from OUR diffusers -> original tables.

    Each weight is replaced by a column of its index, so after conversion the rows of every
    original weight say which diffusers weights they came from (SD3 fuses q, k and v).
    """
    import torch

    from trainer.config import Arch
    from trainer.models.convert import sd3_transformer_to_original, unet_to_original

    shapes = {
        k.replace(".base_layer.", "."): v.shape for k, v in denoiser.state_dict().items() if ".lora_" not in k
    }
    names = list(shapes)
    tags = {
        k: torch.full((shape[0],), float(i), dtype=torch.float64)
        for i, (k, shape) in enumerate(shapes.items())
    }
    if Arch(arch) == Arch.SD3:
        converted = sd3_transformer_to_original(tags)
    else:
        converted = unet_to_original(tags, layers_per_block=denoiser.config.layers_per_block)
    out: dict[str, tuple[str, tuple[int, int]]] = {}
    for key, column in converted.items():
        values = column.tolist()
        start = 0
        for row in range(1, len(values) + 1):
            if row == len(values) or values[row] != values[start]:
                name = names[int(values[start])]
                if name.endswith(".weight"):
                    out[name[: -len(".weight")]] = (f"diffusion_model.{key}", (start, row))
                start = row
    return out


def _expectations(bundle) -> list[dict]:
    """One entry per LoRA module of the model: its file keys and the ComfyUI weight it must change."""
    import torch

    from trainer.lora.io import part_state_dict
    from trainer.lora.keys import file_layout, folds_scale, split_key, to_file_keys

    arch = bundle.arch.value
    entries = []
    for layout in file_layout(bundle.arch):
        module = bundle.denoiser if layout.part == "denoiser" else bundle.text_encoders[layout.index]
        if module is None:
            continue
        modules = sorted({split_key(k)[0] for k in part_state_dict(module, part=layout.part)})
        if not modules:
            continue
        if layout.part == "denoiser":
            targets = _denoiser_targets(module, arch)
        else:
            # ComfyUI's CLIP models keep the transformers names under "<slot>.transformer.".
            slot = CLIP_SLOTS[arch][layout.index]
            targets = {m: (f"{slot}.transformer.{m}.weight", None) for m in modules}
        one = torch.zeros(1)
        for m in modules:
            down, up, alpha = to_file_keys(
                {f"{m}.lora_A.weight": one, f"{m}.lora_B.weight": one, f"{m}.alpha": one}, layout
            )
            # SD3 files carry alpha/rank inside lora_up and no .alpha key.
            alpha = None if folds_scale(bundle.arch) else alpha
            target, rows = targets[m]
            entries.append(
                {
                    "module": f"{layout.label}:{m}",
                    "down": down,
                    "up": up,
                    "alpha": alpha,
                    "target": target,
                    "rows": rows,
                }
            )
    return entries


def train_lora_and_expectations(checkpoint: str, workdir: str, comfy_root: str) -> dict:
    """Train a LoRA for a few steps on the real-size checkpoint; write the expectations file.

    Returns:
        ``lora`` (the final checkpoint), ``expect`` (JSON path), ``state``/``message`` of the run,
        ``file_keys`` (all keys of the LoRA file), ``zero_up`` (modules whose lora_up is all zeros).
    """
    import torch
    from safetensors.torch import load_file
    from train_helpers import make_images, tiny_config

    from trainer.engine.events import RunState
    from trainer.engine.loop import train
    from trainer.models.load import load_base_model

    torch.set_num_threads(compat_threads())
    work = Path(workdir)
    data = make_images(work / "data", [(64, 64)], repeats=STEPS, caption="k4s4 style, a red disc")
    bundle = load_base_model(checkpoint, tokenizer_dir=str(Path(comfy_root, "comfy", "sd1_tokenizer")))
    config = tiny_config(
        work,
        data,
        run_name="compat",
        lora_rank=RANK,
        lora_alpha=ALPHA,
        lora_targets="attention+ff+conv",
        train_text_encoder=True,
        max_steps=STEPS,
        epochs=1,
        dataloader_workers=0,
    )
    result = train(config, model_loader=lambda c: bundle, device="cpu")
    if result.state != RunState.FINISHED or not result.final_checkpoint:
        return {"state": result.state.value, "message": result.message}
    entries = _expectations(bundle)
    expect = work / "expect.json"
    expect.write_text(json.dumps({"modules": entries}), encoding="utf-8")
    tensors = load_file(result.final_checkpoint)
    zero_up = sorted(e["module"] for e in entries if not tensors[e["up"]].any())
    return {
        "state": result.state.value,
        "message": result.message,
        "lora": result.final_checkpoint,
        "expect": str(expect),
        "file_keys": sorted(tensors),
        "zero_up": zero_up,
    }


# --------------------------------------------------------------------------------------------
# The test


def _dead_layer(arch: str, module: str) -> bool:
    """Layers whose output never reaches the loss, so their LoRA gets no gradient (lora_up stays 0).

    SDXL conditions on CLIP-L's penultimate layer only (its pooled output is unused), so CLIP-L's
    last layer is dead. SD3 Medium's last block discards the text stream's attention output
    (``context_pre_only``), so that stream's query projection is dead.
    """
    if arch == "sdxl":
        return module.startswith("text_encoder[0]:text_model.encoder.layers.11.")
    if arch == "sd3":
        return module == "denoiser:transformer_blocks.23.attn.add_q_proj"
    return False


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd3"])
def test_stock_lora_loader_applies_every_module_exactly(arch, tmp_path):
    if available_gib() < NEEDS_GIB[arch]:
        pytest.skip(f"{arch} needs ~{NEEDS_GIB[arch]} GiB of free memory, {available_gib():.1f} available")
    checkpoint = cached_checkpoint(arch)
    comfy_root = comfy_python()[0]
    ours = in_child(train_lora_and_expectations, str(checkpoint), str(tmp_path), comfy_root)
    assert ours["state"] == "finished", ours["message"]

    expect = json.loads(Path(ours["expect"]).read_text(encoding="utf-8"))["modules"]
    listed = {k for e in expect for k in (e["down"], e["up"], e["alpha"]) if k is not None}
    assert sorted(listed) == ours["file_keys"]  # every key of the file is one of a module's three

    report_path = tmp_path / "report.json"
    args = [
        "--checkpoint",
        str(checkpoint),
        "--lora",
        ours["lora"],
        "--expect",
        ours["expect"],
        "--out",
        str(report_path),
    ]
    run_comfy("lora", *args, *(["--fp16-weights"] if FP16_WEIGHTS[arch] else []))
    report = json.loads(report_path.read_text(encoding="utf-8"))

    assert report["class"] == COMFY_CLASS[arch]
    assert report["not_loaded"] == []
    assert report["lora_keys"] == len(ours["file_keys"])
    n_modules = len(expect)
    assert sum(report["applied"].values()) == n_modules
    text_modules = sum(1 for e in expect if not e["target"].startswith("diffusion_model."))
    assert report["applied"] == {"model": n_modules - text_modules, "clip": text_modules}
    assert text_modules > 0

    modules = report["modules"]
    assert len(modules) == n_modules
    assert [m for m in modules if not m["patched"]] == []
    # SD3: ComfyUI applies scale 1 to a lora_up that holds alpha/rank already (no .alpha in the file).
    assert all(m["scale"] == (1.0 if arch == "sd3" else ALPHA / RANK) for m in modules)
    worst = max(modules, key=lambda m: m["error"])
    assert worst["error"] <= MAX_ERROR, worst
    zero_up = set(ours["zero_up"])
    by_module = {e["down"]: e["module"] for e in expect}
    unchanged = [by_module[m["down"]] for m in modules if not m["changed"]]
    assert sorted(unchanged) == sorted(zero_up)
    assert [m for m in zero_up if not _dead_layer(arch, m)] == []
    print(
        f"\n{arch}: {n_modules} LoRA modules in the file ({text_modules} text encoder), "
        f"{sum(report['applied'].values())} applied by ComfyUI {report['applied']}, "
        f"max |ΔW - (α/r)·up·down| = {worst['error']:.3g}, "
        f"largest expected change {max(m['expected_max'] for m in modules):.3g}, "
        f"{len(zero_up)} with no update (dead layers); ComfyUI weights {report['weight_dtype']}"
    )
