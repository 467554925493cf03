"""Training from the graph inside a real ComfyUI: the Train node returns at once, the run trains
in the background while other prompts run, its LoRA files appear in the stock Load LoRA
drop-down, and the /finetune/ routes and websocket events carry its progress.

Run: ``COMFYUI_PATH=/path/to/ComfyUI <its python> -m pytest -q tests/test_comfy_training.py``.
Skipped without ``COMFYUI_PATH``.

The base model is a tiny SD1.5 saved as a diffusers folder in ComfyUI's ``models/diffusers``
(picked with the node's ``diffusers_model`` input): a tiny single file would need configs of its
own size, which a TrainConfig cannot name (real single files use the shipped SD configs). A tiny
single file is still dropped into ``checkpoints`` to check the node's ``ckpt_name`` list.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
import uuid

import pytest
from comfy_server import (  # noqa: F401  (the `comfy` fixture)
    ComfyClient,
    comfy_fixture,
    comfyui_path,
    start_server,
    stop_server,
)
from PIL import Image

from trainer.config import Arch
from trainer.models.tiny import save_tiny_checkpoint, tiny_bundle

pytestmark = pytest.mark.comfyui

RUN = "comfy-lora"
STEPS = 12


class EventLog:
    """Collects the websocket messages of every ``finetune.*`` event in a background thread."""

    def __init__(self, url: str):
        import websocket  # websocket-client

        self.messages: list[dict] = []
        self._ws = websocket.create_connection(
            f"{url.replace('http', 'ws', 1)}/ws?clientId={uuid.uuid4().hex}", timeout=1
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        import websocket

        while not self._stop.is_set():
            try:
                raw = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketConnectionClosedException, OSError):
                return
            if isinstance(raw, str):
                message = json.loads(raw)
                if message.get("type", "").startswith("finetune."):
                    self.messages.append(message)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._ws.close()

    def of(self, kind: str, run: str = RUN) -> list[dict]:
        return [m["data"] for m in self.messages if m["type"] == kind and m["data"].get("run") == run]


def _options(spec: list) -> list:
    """The choices of a combo input as /object_info writes it (V1 list or V3 "COMBO")."""
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def _defaults(entry: dict) -> dict:
    """Every widget input of a node at its default (combos: default or first option)."""
    out = {}
    for section in ("required", "optional"):
        for name, spec in entry["input"].get(section, {}).items():
            extra = spec[1] if len(spec) > 1 else {}
            if isinstance(spec[0], list) or spec[0] == "COMBO":
                out[name] = extra.get("default", _options(spec)[0])
            elif "default" in extra:
                out[name] = extra["default"]
    return out


def _get(comfy: ComfyClient, path: str):
    with urllib.request.urlopen(comfy.url + path, timeout=30) as resp:
        body = resp.read()
        return json.loads(body) if resp.headers.get_content_type() == "application/json" else body


def _wait_for(predicate, *, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s")


@pytest.fixture(scope="module")
def models(comfy: ComfyClient):
    return _install_models(comfy)


def _install_models(comfy: ComfyClient) -> ComfyClient:
    """A tiny SD1.5 in the server's model folders and a two-image dataset in its input folder."""
    bundle = tiny_bundle(Arch.SD15, seed=0)
    save_tiny_checkpoint(bundle, comfy.base_dir / "models" / "diffusers" / "tiny-sd15", single_file=False)
    save_tiny_checkpoint(bundle, comfy.models_dir / "checkpoints" / "tiny-sd15.safetensors", single_file=True)
    data = comfy.input_dir / "train_set" / "1_things"
    data.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate([(220, 30, 30), (30, 60, 220)]):
        Image.new("RGB", (64, 64), colour).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a cat, colour {i}", encoding="utf-8")
    return comfy


def _training_prompt(comfy: ComfyClient, **overrides) -> dict:
    info = comfy.object_info()
    load = _defaults(info["FinetuneLoadDataset"]) | {"folder": "train_set"}
    train = _defaults(info["FinetuneTrainLoRA"]) | {
        "dataset": ["1", 0],
        "ckpt_name": "(none)",
        "diffusers_model": "tiny-sd15",
        "run_name": RUN,
        "max_steps": STEPS,
        "epochs": 100,
        "resolution": 64,
        "min_bucket_resolution": 64,
        "max_bucket_resolution": 128,
        "lora_rank": 4,
        "lora_alpha": 4.0,
        "learning_rate": 1e-3,
        "mixed_precision": "fp32",
        "compile": False,
        "checkpoint_every": 4,
        "validation_prompts": "a cat",
        "validation_every": 6,
        "validation_steps": 2,
        "validation_width": 64,
        "validation_height": 64,
    }
    train.update(overrides)
    return {
        "1": {"class_type": "FinetuneLoadDataset", "inputs": load},
        "2": {"class_type": "FinetuneTrainLoRA", "inputs": train},
        "3": {"class_type": "FinetuneRunStatus", "inputs": {"run": ["2", 0]}},
    }


def test_train_nodes_are_listed_with_comfyui_model_lists(models: ComfyClient):
    info = models.object_info()
    for node_id in ("FinetuneTrainLoRA", "FinetuneTrainFull", "FinetuneRunStatus", "FinetuneStopRun"):
        assert info[node_id]["category"] == "finetune/train"
    lora = info["FinetuneTrainLoRA"]
    assert "tiny-sd15.safetensors" in _options(lora["input"]["required"]["ckpt_name"])
    assert _options(lora["input"]["required"]["diffusers_model"]) == ["(none)", "tiny-sd15"]
    assert lora["output"] == ["FT_RUN", "STRING"]
    assert info["FinetuneRunStatus"]["output"] == ["STRING", "IMAGE", "IMAGE"]
    assert info["FinetuneRunStatus"]["output_node"] is True
    full = info["FinetuneTrainFull"]["input"]
    assert "lora_rank" not in full["required"] and "unet_name" in full["required"]
    assert full["required"]["learning_rate"][1]["default"] == 1e-5


def test_training_runs_in_the_background_and_its_lora_reaches_the_loader(models: ComfyClient):
    comfy = models
    events = EventLog(comfy.url)
    try:
        prompt = _training_prompt(comfy)
        first = comfy.run(prompt, timeout=120)
        # The prompt is done while the run is not: the status node saw it queued or running.
        status_text = first["outputs"]["3"]["text"][0]
        assert status_text.startswith(f"run '{RUN}': queued") or status_text.startswith(
            f"run '{RUN}': running"
        )
        assert len(first["outputs"]["3"]["images"]) == 2  # loss curve + sample placeholder
        assert _get(comfy, f"/finetune/runs/{RUN}")["state"] in ("queued", "running")

        paused = comfy.post_json(f"/finetune/runs/{RUN}/pause", {})
        assert paused["state"] == "paused"
        # Another prompt during the run completes; the Train node hands back the same run.
        second = comfy.run(prompt, timeout=120)
        assert second["status"]["status_str"] == "success"
        assert second["outputs"]["2"]["text"][0].startswith(f"run '{RUN}': already paused; not started twice")
        detail = _get(comfy, f"/finetune/runs/{RUN}")
        assert detail["state"] == "paused"
        assert comfy.post_json(f"/finetune/runs/{RUN}/resume", {})["state"] == "running"

        done = _wait_for(
            lambda: (
                (d := _get(comfy, f"/finetune/runs/{RUN}"))["state"] not in ("queued", "running", "paused")
                and d
            ),
            timeout=300,
            what="the run's end",
        )
        assert (done["state"], done["step"], done["total"]) == ("finished", STEPS, STEPS), done["message"]
        assert done["config"]["base_model"].endswith("tiny-sd15")
        assert done["plan"]["total_steps"] == STEPS

        checkpoints = _get(comfy, f"/finetune/runs/{RUN}/checkpoints")["checkpoints"]
        files = [c["file"] for c in checkpoints]
        assert files[:3] == [
            f"{RUN}-step00004.safetensors",
            f"{RUN}-step00008.safetensors",
            f"{RUN}-step00012.safetensors",
        ]
        lora_names = _options(comfy.object_info("LoraLoader")["input"]["required"]["lora_name"])
        assert set(files) <= set(lora_names)

        rows = _get(comfy, f"/finetune/runs/{RUN}/metrics?since=0")["rows"]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        assert [r["step"] for r in _get(comfy, f"/finetune/runs/{RUN}/metrics?since=10")["rows"]] == [11, 12]
        samples = _get(comfy, f"/finetune/runs/{RUN}/samples")["samples"]
        assert [s["step"] for s in samples] == [6, 12]
        assert _get(comfy, samples[-1]["url"])[:8] == b"\x89PNG\r\n\x1a\n"
        assert _get(comfy, "/api" + samples[-1]["url"])[:8] == b"\x89PNG\r\n\x1a\n"
        assert RUN in [r["name"] for r in _get(comfy, "/finetune/runs")["runs"]]

        _wait_for(
            lambda: events.of("finetune.state") and events.of("finetune.state")[-1]["state"] == "finished",
            timeout=10,
            what="the last websocket state",
        )
    finally:
        events.close()
    states = [e["state"] for e in events.of("finetune.state")]
    assert states[0] == "queued" and states[-1] == "finished"
    assert "paused" in states
    assert [e["step"] for e in events.of("finetune.checkpoint")][:3] == [4, 8, 12]
    assert events.of("finetune.checkpoint")[0]["file"] == f"{RUN}-step00004.safetensors"
    assert [e["step"] for e in events.of("finetune.sample")] == [6, 12]
    assert events.of("finetune.sample")[0]["urls"] == [f"/finetune/runs/{RUN}/samples/step00006-0.png"]
    progress = events.of("finetune.progress")
    assert progress[-1]["step"] == STEPS and progress[-1]["total"] == STEPS
    assert set(progress[-1]) == {"run", "step", "total", "loss", "lr", "samples_per_s", "eta_s", "epoch"}
    assert [p["step"] for p in progress] == sorted(p["step"] for p in progress)

    # Queued again once finished: the same run is reused, nothing retrains.
    again = comfy.run(_training_prompt(comfy), timeout=120)
    assert again["outputs"]["3"]["text"][0].startswith(f"run '{RUN}': finished, step {STEPS}/{STEPS}")


# A test-only custom node: a "render" that works until the test says so (a file appears), then
# runs out of GPU memory.
OOM_NODE = """
import os
import time

import torch


class FinetuneTestOutOfMemory:
    CATEGORY = "testing"
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"until": ("STRING", {"default": ""})}}

    def run(self, until):
        deadline = time.monotonic() + 300
        while not os.path.exists(until) and time.monotonic() < deadline:
            time.sleep(0.05)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


NODE_CLASS_MAPPINGS = {"FinetuneTestOutOfMemory": FinetuneTestOutOfMemory}
"""


def test_a_prompt_that_runs_out_of_memory_during_a_run_fails_alone(tmp_path):
    """A render that runs out of memory while a run trains: ComfyUI reports that prompt's error
    (and unloads its models, as it does on any OOM); the run paused for it, goes on and finishes,
    and the server takes the next prompt."""
    (tmp_path / "custom_nodes").mkdir()
    (tmp_path / "custom_nodes" / "finetune_test_oom.py").write_text(OOM_NODE, encoding="utf-8")
    proc, comfy = start_server(comfyui_path(), tmp_path)
    events = EventLog(comfy.url)
    try:
        _install_models(comfy)
        steps = 40
        prompt = _training_prompt(
            comfy, run_name="oom", max_steps=steps, checkpoint_every=steps, validation_every=0,
            validation_prompts="",
        )  # fmt: skip
        comfy.run(prompt, timeout=120)
        _wait_for(lambda: (_get(comfy, "/finetune/runs/oom")["step"] or 0) >= 2, timeout=300, what="step 2")
        go = tmp_path / "run-out-of-memory-now"
        failing = comfy.queue({"1": {"class_type": "FinetuneTestOutOfMemory", "inputs": {"until": str(go)}}})
        at_failure = _wait_for(
            lambda: (d := _get(comfy, "/finetune/runs/oom"))["state"] == "paused" and d,
            timeout=300,
            what="the run's pause for the prompt",
        )
        go.touch()
        failed = _wait_for(lambda: comfy.history(failing), timeout=120, what="the prompt's end")
        done = _wait_for(
            lambda: (
                (d := _get(comfy, "/finetune/runs/oom"))["state"] not in ("queued", "running", "paused") and d
            ),
            timeout=600,
            what="the run's end",
        )
        again = comfy.run(prompt, timeout=120)
    finally:
        events.close()
        stop_server(proc)
    assert failed["status"]["status_str"] == "error"
    (error,) = [data for kind, data in failed["status"]["messages"] if kind == "execution_error"]
    assert error["exception_type"] == "torch.OutOfMemoryError"
    assert at_failure["step"] < steps and at_failure["message"] == "waiting while ComfyUI runs a prompt"
    assert (done["state"], done["step"]) == ("finished", steps), done["message"]
    states = [e["state"] for e in events.of("finetune.state", run="oom")]
    assert "paused" in states and states[-1] == "finished"
    assert again["status"]["status_str"] == "success"
    assert again["outputs"]["3"]["text"][0].startswith(f"run 'oom': finished, step {steps}/{steps}")
    log = comfy.log_tail(400)
    assert "Got an OOM, unloading all loaded models." in log
    lines = [line.lower() for line in log.splitlines()]
    assert [line for line in lines if "finetune:" in line and ("error" in line or "fail" in line)] == []


def test_quitting_comfyui_saves_the_running_run_at_its_current_step(tmp_path):
    """Ctrl-C in ComfyUI's terminal: the run stops after its step and saves it (LoRA file and
    resume state), so nothing trained since the last checkpoint is lost."""
    proc, comfy = start_server(comfyui_path(), tmp_path)
    try:
        _install_models(comfy)
        never = 100_000  # no cadence checkpoint or sample: only the shutdown saves
        prompt = _training_prompt(
            comfy,
            run_name="quit",
            max_steps=never,
            epochs=1000,
            checkpoint_every=never,
            validation_every=never,
        )
        comfy.run(prompt, timeout=120)
        _wait_for(lambda: (_get(comfy, "/finetune/runs/quit")["step"] or 0) >= 3, timeout=300, what="step 3")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, comfy.log_tail()
    finally:
        stop_server(proc)
    folder = comfy.output_dir / "finetune" / "quit"
    status = json.loads((folder / "run.json").read_text(encoding="utf-8"))["status"]
    step = status["step"]
    assert step >= 3
    assert (status["state"], status["message"]) == (
        "stopped",
        f"ComfyUI shut down at step {step}; resume to continue",
    )
    assert sorted(p.name for p in (folder / "checkpoints").glob("*.safetensors")) == [
        f"quit-step{step:05d}.safetensors"
    ]
    assert [p.name for p in (folder / "state").iterdir()] == [f"step-{step:05d}"]
    log = comfy.log_tail(200)
    assert "quit: stopping after the current step and saving" in log
    assert "listener failed" not in log and "Traceback" not in log, log
