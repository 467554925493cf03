"""The sweep client against a fake ComfyUI: tiles in checkpoint order with the right colours, and
every error path with its message."""

from __future__ import annotations

import argparse
import copy
import json
import socket

import pytest
from fake_comfy_server import FakeComfy, colour_for
from PIL import Image

from trainer.checkpoints import list_checkpoints
from trainer.strip import compute_layout
from trainer.sweep_client import (
    ComfyClient,
    SweepError,
    add_sweep_arguments,
    load_api_workflow,
    run_sweep,
    sweep,
)

WORKFLOW = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "10": {
        "class_type": "LoraLoader",
        "inputs": {
            "lora_name": "old.safetensors",
            "strength_model": 1.0,
            "strength_clip": 1.0,
            "model": ["4", 0],
            "clip": ["4", 1],
        },
    },
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["10", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["10", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 7,
            "steps": 4,
            "cfg": 5.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["10", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "sweep", "images": ["8", 0]}},
}
STEPS = ("run-step00800.safetensors", "run-step01600.safetensors", "run-step02400.safetensors")


@pytest.fixture
def run_dir(tmp_path):
    ckpts = tmp_path / "runs" / "finetune" / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for name in (*STEPS, "run.safetensors", ".run-step03200.safetensors.ab.tmp"):
        (ckpts / name).write_bytes(b"lora")
    (tmp_path / "api.json").write_text(json.dumps(WORKFLOW))
    return tmp_path


@pytest.fixture
def fake():
    with FakeComfy(known_models={"sd15.safetensors", "old.safetensors", *STEPS, "run.safetensors"}) as server:
        yield server


def _args(run_dir, server, *extra):
    parser = argparse.ArgumentParser()
    add_sweep_arguments(parser)
    return parser.parse_args(
        [
            "--server",
            server,
            "--workflow",
            str(run_dir / "api.json"),
            "--checkpoints",
            "run",
            "--output-dir",
            str(run_dir / "runs"),
            "--node",
            "10",
            "--out",
            str(run_dir / "strip.png"),
            *extra,
        ]
    )


def _tile_colours(path, n, labels, row_labels=None):
    img = Image.open(path).convert("RGB")
    layout = compute_layout([(32, 32)] * n, labels, row_labels=row_labels)
    assert img.size == layout.size
    return [
        img.getpixel(((t.image_box[0] + t.image_box[2]) // 2, (t.image_box[1] + t.image_box[3]) // 2))
        for t in layout.tiles
    ]


def test_strip_has_one_tile_per_checkpoint_in_step_order(run_dir, fake):
    assert run_sweep(_args(run_dir, fake.address, "--include-base")) == 0
    labels = ["base", "step 800", "step 1600", "step 2400", "final"]
    expected = [colour_for("old.safetensors", 0.0, "a cat")] + [
        colour_for(name, 1.0, "a cat") for name in (*STEPS, "run.safetensors")
    ]
    assert _tile_colours(run_dir / "strip.png", 5, labels) == expected
    prompts = [e for e in fake.events if e.startswith("prompt:")]
    assert len(prompts) == 5 and len({p.split(":")[1] for p in prompts}) == 1
    # the websocket was open before the first prompt was queued, under the same client id
    assert fake.events[0] == "ws:" + prompts[0].split(":")[1]
    assert [e.split(":")[2] for e in fake.events if e.startswith("view:")] == ["output"] * 5


def test_prompts_make_rows_and_name_prefix_and_every_k(run_dir):
    prefixed = {f"ft/{n}" for n in (*STEPS, "run.safetensors")}
    with FakeComfy(known_models={"sd15.safetensors", *prefixed}) as server:
        code = run_sweep(
            _args(
                run_dir,
                server.address,
                "--name-prefix",
                "ft/",
                "--every-k",
                "2",
                "--step-max",
                "2400",
                "--prompt-node",
                "6",
                "--prompt",
                "a red fox",
                "--prompt",
                "a castle",
            )
        )
    assert code == 0
    labels = ["step 800", "step 2400"]
    got = _tile_colours(run_dir / "strip.png", 4, labels, row_labels=["a red fox", "a castle"])
    assert got == [
        colour_for("ft/run-step00800.safetensors", 1.0, "a red fox"),
        colour_for("ft/run-step02400.safetensors", 1.0, "a red fox"),
        colour_for("ft/run-step00800.safetensors", 1.0, "a castle"),
        colour_for("ft/run-step02400.safetensors", 1.0, "a castle"),
    ]


def test_sweep_returns_images_and_labels_and_leaves_the_workflow_alone(run_dir, fake):
    original = copy.deepcopy(WORKFLOW)
    ckpts = list_checkpoints(run_dir / "runs" / "finetune" / "run" / "checkpoints", step_max=1600)
    with ComfyClient(fake.address, timeout=30) as client:
        result = sweep(client, WORKFLOW, ckpts, node="10")
    assert result.labels == ["step 800", "step 1600"] and result.row_labels == []
    assert [im.getpixel((5, 5)) for im in result.images] == [colour_for(n, 1.0, "a cat") for n in STEPS[:2]]
    assert WORKFLOW == original


def _error(run_dir, server, *extra, capsys):
    code = run_sweep(_args(run_dir, server, *extra))
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("sweep: ")
    return err


def test_unreachable_server_says_how_to_start_it(run_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _error(run_dir, f"127.0.0.1:{port}", capsys=capsys)
    assert f"could not reach ComfyUI at http://127.0.0.1:{port}" in err
    assert f"is it running? start it with python main.py --listen 127.0.0.1 --port {port}" in err


def test_unknown_node_lists_the_nodes(run_dir, fake, capsys):
    err = _error(run_dir, fake.address, "--node", "99", capsys=capsys)
    assert (
        "--node '99' is not in the workflow; its nodes are: 4 (CheckpointLoaderSimple), 10 (LoraLoader), 6 (CLIPTextEncode)"
        in err
    )
    assert fake.events == []  # refused before anything was sent


def test_unknown_input_lists_the_inputs(run_dir, fake, capsys):
    err = _error(run_dir, fake.address, "--input", "unet_name", capsys=capsys)
    assert (
        "node 10 (LoraLoader) has no input 'unet_name'; its inputs are: lora_name, strength_model, strength_clip, model, clip"
        in err
    )
    err = _error(
        run_dir,
        fake.address,
        "--prompt-node",
        "6",
        "--prompt-input",
        "prompt",
        "--prompt",
        "x",
        capsys=capsys,
    )
    assert "node 6 (CLIPTextEncode) has no input 'prompt'; its inputs are: text, clip" in err


def test_ui_format_workflow_says_save_api(run_dir, fake, capsys):
    (run_dir / "api.json").write_text(
        json.dumps({"last_node_id": 9, "nodes": [{"id": 3, "type": "KSampler"}], "links": []})
    )
    err = _error(run_dir, fake.address, capsys=capsys)
    assert (
        "is a UI-format workflow (it has 'nodes' and 'links'); export it in API format with 'Save (API)'"
        in err
    )
    with pytest.raises(SweepError, match="does not exist"):
        load_api_workflow(run_dir / "missing.json")


def test_rejected_prompt_shows_comfy_message_and_node_errors(run_dir, capsys):
    with FakeComfy(known_models={"sd15.safetensors", *STEPS[:1]}) as server:
        err = _error(run_dir, server.address, capsys=capsys)
    assert (
        "ComfyUI rejected step 1600: Prompt outputs failed validation; node 10 (LoraLoader): Value not in list: "
        in err
    )
    assert (
        "lora_name: 'run-step01600.safetensors' not in ['run-step00800.safetensors', 'sd15.safetensors']"
        in err
    )


def test_failed_prompt_shows_the_execution_error(run_dir, capsys):
    with FakeComfy(fail_when="step02400") as server:
        err = _error(run_dir, server.address, capsys=capsys)
        views = [e for e in server.events if e.startswith("view:")]
    assert err.strip() == (
        "sweep: ComfyUI failed on step 2400 in node 3 (KSampler): RuntimeError: Expected all tensors to be on the same device"
    )
    assert len(views) == 2  # steps 800 and 1600 rendered before the failure
    assert not (run_dir / "strip.png").exists()


def test_workflow_without_image_output_is_explained(run_dir, fake, capsys):
    workflow = {k: v for k, v in WORKFLOW.items() if k != "9"}
    (run_dir / "api.json").write_text(json.dumps(workflow))
    err = _error(run_dir, fake.address, capsys=capsys)
    assert (
        "step 800 finished but the workflow produced no images; add a Save Image or Preview Image node" in err
    )


def test_missing_run_and_empty_range_are_explained(run_dir, fake, capsys):
    args = _args(run_dir, fake.address)
    args.checkpoints = "nope"
    assert run_sweep(args) == 1
    assert "--checkpoints 'nope' is neither a folder nor a run under" in capsys.readouterr().err
    err = _error(run_dir, fake.address, "--step-min", "5000", "--step-max", "6000", capsys=capsys)
    assert "no checkpoints to sweep" in err
