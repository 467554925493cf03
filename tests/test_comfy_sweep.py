"""Checkpoint sweeps in a real ComfyUI (skipped without ``COMFYUI_PATH``).

A real-size random-weight SD1.5 checkpoint and two kohya LoRA files render at 64 px in 1 step:

- the node graph Run Checkpoints -> Checkpoint Sweep -> Labeled Strip -> Save Image;
- ``python -m trainer sweep`` against the same server, with the stock LoraLoader + KSampler.

Both render base, step 1 and step 2 at one seed, so each tile of the node's strip must equal the
client's tile pixel for pixel: the sweep node samples exactly like the stock KSampler and applies
LoRAs exactly like the stock Load LoRA node.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from comfy_models import cached_checkpoint
from comfy_server import ComfyClient, comfy_fixture  # noqa: F401  (the `comfy` fixture)
from PIL import Image, ImageChops
from safetensors.torch import save_file

from trainer.strip import compute_layout
from trainer.sweep_client import add_sweep_arguments, run_sweep

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

SD15_FILE = "sweep-sd15.safetensors"
# At 64 px the mid block sees one latent token, where self-attention ignores to_q/to_k: patch to_v.
TARGET = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v"
LABELS = ["base", "step 1", "step 2"]
SAMPLING = {"seed": 3, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal"}


def _lora(path, seed):
    g = torch.Generator().manual_seed(seed)
    save_file(
        {
            f"{TARGET}.lora_down.weight": torch.randn(4, 1280, generator=g) / 1280**0.5,
            f"{TARGET}.lora_up.weight": torch.randn(1280, 4, generator=g),
            f"{TARGET}.alpha": torch.tensor(4.0),
        },
        path,
        metadata={"ss_network_module": "networks.lora"},
    )


@pytest.fixture(scope="module")
def setup(comfy: ComfyClient):
    checkpoints = comfy.output_dir / "finetune" / "sweeprun" / "checkpoints"
    checkpoints.mkdir(parents=True)
    loras = comfy.models_dir / "loras" / "sweeprun"
    loras.mkdir(parents=True)
    for step in (1, 2):
        _lora(checkpoints / f"sweeprun-step{step:05d}.safetensors", seed=step)
        _lora(loras / f"sweeprun-step{step:05d}.safetensors", seed=step)
    target = comfy.models_dir / "checkpoints" / SD15_FILE
    if not target.exists():
        target.symlink_to(cached_checkpoint("sd15"))
    return comfy


def _tiles(img: Image.Image, layout) -> list[Image.Image]:
    return [img.crop(t.image_box) for t in layout.tiles]


def _node_strip(comfy: ComfyClient) -> Image.Image:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_FILE}},
        "2": {
            "class_type": "FinetuneRunCheckpoints",
            "inputs": {"run": "(none)", "folder": "finetune/sweeprun", "every_k": 1, "step_min": 0, "step_max": 0, "include_base": True},
        },
        "3": {
            "class_type": "FinetuneCheckpointSweep",
            "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "checkpoints": ["2", 0],
                "positive": "a cat", "negative": "", "width": 64, "height": 64, "lora_strength": 1.0, **SAMPLING,
            },
        },
        "4": {
            "class_type": "FinetuneLabeledStrip",
            "inputs": {
                "images": ["3", 0], "labels": ["3", 1], "columns": 0, "label_height": 0, "font_size": 0,
                "background": "#1e1e1e", "text_color": "#ffffff", "title": "", "padding": 8,
            },
        },
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "nodesweep"}},
    }  # fmt: skip
    history = comfy.run(prompt, timeout=600)
    (image,) = history["outputs"]["5"]["images"]
    return Image.open(comfy.output_dir / image["subfolder"] / image["filename"]).convert("RGB")


def _client_strip(comfy: ComfyClient, tmp_path) -> Image.Image:
    workflow = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_FILE}},
        "2": {
            "class_type": "LoraLoader",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "sweeprun/sweeprun-step00001.safetensors", "strength_model": 1.0, "strength_clip": 1.0},
        },
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a cat"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {
            "class_type": "KSampler",
            "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0, **SAMPLING},
        },
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "clientsweep"}},
    }  # fmt: skip
    (tmp_path / "api.json").write_text(json.dumps(workflow))
    parser = argparse.ArgumentParser()
    add_sweep_arguments(parser)
    args = parser.parse_args(
        ["--server", comfy.url, "--workflow", str(tmp_path / "api.json"), "--checkpoints", "sweeprun",
         "--output-dir", str(comfy.output_dir), "--node", "2", "--name-prefix", "sweeprun/", "--include-base",
         "--out", str(tmp_path / "strip.png")]
    )  # fmt: skip
    assert run_sweep(args) == 0
    return Image.open(tmp_path / "strip.png").convert("RGB")


def test_node_sweep_matches_the_stock_nodes_through_the_api_client(setup, tmp_path):
    layout = compute_layout([(64, 64)] * 3, LABELS)
    node_strip = _node_strip(setup)
    client_strip = _client_strip(setup, tmp_path)
    assert node_strip.size == client_strip.size == layout.size
    node_tiles, client_tiles = _tiles(node_strip, layout), _tiles(client_strip, layout)
    # the LoRAs change the render, and differently from each other
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert ImageChops.difference(node_tiles[a], node_tiles[b]).getbbox() is not None, (a, b)
    # base = stock KSampler with LoRA strength 0; steps = stock Load LoRA + KSampler
    for label, mine, stock in zip(LABELS, node_tiles, client_tiles, strict=True):
        diff = ImageChops.difference(mine, stock)
        assert max(hi for _, hi in diff.getextrema()) <= 1, f"{label}: node and stock renders differ"


# --------------------------------------------------------------------------------------------
# The base model is built once for a whole sweep (added by the workflows engineer, issue 6)

COUNT_STEPS = (3, 100, 20)  # written out of order; sorted by name they would be 100, 20, 3
COUNT_PROMPTS = ["a cat", "a red house"]


def _log_count(comfy: ComfyClient, text: str) -> int:
    return comfy.log_path.read_text(encoding="utf-8", errors="replace").count(text)


def _temp_image(comfy: ComfyClient, entry: dict) -> Image.Image:
    return Image.open(comfy.base_dir / "temp" / entry["subfolder"] / entry["filename"]).convert("RGB")


def test_sweep_builds_the_base_model_once_for_every_checkpoint_and_prompt(setup: ComfyClient):
    comfy = setup
    folder = comfy.output_dir / "sweepcount"
    folder.mkdir()
    for step in COUNT_STEPS:  # kohya-style names without zero padding
        _lora(folder / f"sweepcount-step{step}.safetensors", seed=step)
    _lora(folder / "sweepcount.safetensors", seed=99)  # the final file
    # A name no earlier prompt loaded, so this prompt has to load it: exactly once.
    ckpt = "sweepcount-sd15.safetensors"
    (comfy.models_dir / "checkpoints" / ckpt).symlink_to(cached_checkpoint("sd15"))
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {
            "class_type": "FinetuneRunCheckpoints",
            "inputs": {"run": "(none)", "folder": "sweepcount", "every_k": 1, "step_min": 0, "step_max": 0, "include_base": True},
        },
        "3": {
            "class_type": "FinetuneCheckpointSweep",
            "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "checkpoints": ["2", 0],
                "positive": "\n".join(COUNT_PROMPTS), "negative": "", "width": 64, "height": 64, "lora_strength": 1.0, **SAMPLING,
            },
        },
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}},
    }  # fmt: skip
    # ComfyUI logs "model_type EPS" each time it builds a diffusion model (comfy/model_base.py):
    # loading a checkpoint does, patching a LoRA onto a loaded model does not.
    watched = ("model_type ", "lora key not loaded", "finetune: sweep render")
    counts = {text: _log_count(comfy, text) for text in watched}
    outputs = comfy.run(prompt, timeout=900)["outputs"]
    added = {text: _log_count(comfy, text) - before for text, before in counts.items()}
    labels = ["base", "step 3", "step 20", "step 100", "final"]
    assert added == {"model_type ": 1, "lora key not loaded": 0, "finetune: sweep render": len(labels) * 2}
    assert outputs["5"]["text"] == ["\n".join(labels)]
    assert outputs["6"]["text"] == ["\n".join(COUNT_PROMPTS)]
    renders = [_temp_image(comfy, entry) for entry in outputs["4"]["images"]]
    assert len(renders) == len(labels) * len(COUNT_PROMPTS)  # prompt by prompt, checkpoints in order
    assert {r.size for r in renders} == {(64, 64)}
    first_row = renders[: len(labels)]
    for a in range(len(labels)):  # every checkpoint renders differently from every other
        for b in range(a + 1, len(labels)):
            differ = ImageChops.difference(first_row[a], first_row[b]).getbbox() is not None
            assert differ, (labels[a], labels[b])
    assert ImageChops.difference(renders[0], renders[len(labels)]).getbbox() is not None  # the two prompts
