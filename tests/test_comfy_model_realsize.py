"""*Train LoRA (Model)* through ``/prompt`` on a real-size random SD1.5 in a real ComfyUI server.

Run with ``FINETUNE_REALSIZE=1 COMFYUI_PATH=… <ComfyUI's python> -m pytest -q
tests/test_comfy_model_realsize.py`` (the server holds ≈ 5 GB; the checkpoint is built once with
ComfyUI's own classes, see tests/comfy_models.py). The graph is the stock one: *Load Checkpoint*
→ *Train LoRA (Model)*. While the run trains, a txt2img of the same checkpoint renders exactly
what it rendered before the run; the files load in stock *Load LoRA* with no ``lora key not
loaded`` line and change the render.
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest
from comfy_models import cached_checkpoint
from comfy_server import comfy_fixture, comfyui_path  # noqa: F401  (the `comfy` fixture)
from PIL import Image
from test_comfy_training import _defaults, _get, _wait_for

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(
        not os.environ.get("FINETUNE_REALSIZE"),
        reason="a real-size SD1.5 server needs ~5 GB RAM; set FINETUNE_REALSIZE=1",
    ),
]

RUN = "model-sd15"
STEPS = 4
CKPT = "random-sd15.safetensors"
COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220)}


def _render_prompt(lora: str | None = None) -> dict:
    model = ["1", 0]
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}}
    if lora is not None:
        prompt["2"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "lora_name": lora, "strength_model": 1.0},
        }
        model = ["2", 0]
    prompt.update({
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "red"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": 1,
            "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "check"}},
    })  # fmt: skip
    return prompt


def _image(comfy, history: dict) -> bytes:
    image = history["outputs"]["8"]["images"][0]
    url = f"{comfy.url}/view?filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read()


def test_train_lora_model_on_a_real_size_sd15_through_prompt(comfy):
    (comfy.models_dir / "checkpoints" / CKPT).symlink_to(cached_checkpoint("sd15"))
    data = comfy.input_dir / "colours" / "1_colours"
    data.mkdir(parents=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (64, 64), rgb).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(name, encoding="utf-8")

    before = _image(comfy, comfy.run(_render_prompt(), timeout=600))
    info = comfy.object_info()
    train = _defaults(info["FinetuneTrainLoRAModel"]) | {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "run_name": RUN,
        "max_steps": STEPS, "epochs": 100, "resolution": 64, "min_bucket_resolution": 64,
        "max_bucket_resolution": 128, "lora_rank": 4, "lora_alpha": 4.0, "learning_rate": 1e-3,
        "mixed_precision": "fp32", "checkpoint_every": 2, "validation_prompts": "red", "validation_every": 4,
        "validation_steps": 2, "validation_width": 64, "validation_height": 64,
    }  # fmt: skip
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "FinetuneLoadDataset", "inputs": _defaults(info["FinetuneLoadDataset"]) | {"folder": "colours"}},
        "3": {"class_type": "FinetuneTrainLoRAModel", "inputs": train},
        "4": {"class_type": "FinetuneRunStatus", "inputs": {"run": ["3", 0]}},
    }  # fmt: skip
    queued = comfy.run(prompt, timeout=600)
    assert queued["outputs"]["3"]["text"][0].startswith(f"run '{RUN}': queued")

    # A txt2img of the same checkpoint while the run trains renders the base model exactly.
    _wait_for(lambda: (_get(comfy, f"/finetune/runs/{RUN}")["step"] or 0) >= 1, timeout=900, what="step 1")
    during = _image(comfy, comfy.run(_render_prompt(), timeout=600))
    assert during == before

    done = _wait_for(
        lambda: (
            (d := _get(comfy, f"/finetune/runs/{RUN}"))["state"] not in ("queued", "running", "paused") and d
        ),
        timeout=1800,
        what="the run's end",
    )
    assert (done["state"], done["step"]) == ("finished", STEPS), done["message"]
    model = json.loads((comfy.output_dir / "finetune" / RUN / "run.json").read_text(encoding="utf-8"))[
        "model"
    ]
    assert (model["arch"], model["prediction_type"], model["comfy_model_class"]) == (
        "SD15",
        "epsilon",
        "BaseModel",
    )
    files = [c["file"] for c in _get(comfy, f"/finetune/runs/{RUN}/checkpoints")["checkpoints"]]
    assert files == [f"{RUN}-step00002.safetensors", f"{RUN}-step00004.safetensors"]
    assert [s["step"] for s in _get(comfy, f"/finetune/runs/{RUN}/samples")["samples"]] == [4]

    with_lora = _image(comfy, comfy.run(_render_prompt(files[-1]), timeout=600))
    assert with_lora != before
    assert "lora key not loaded" not in comfy.log_tail(2000)
