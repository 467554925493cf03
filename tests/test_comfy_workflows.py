"""Every API-format workflow in ``workflows/`` queued through ``/prompt`` of a real ComfyUI.

Run: ``COMFYUI_PATH=/path/to/ComfyUI <its python> -m pytest -q tests/test_comfy_workflows.py``.
Skipped without ``COMFYUI_PATH``.

The workflows run as shipped, file names included: the real-size random-weight SD1.5 checkpoint
(``tests/comfy_models.py``, cached under /tmp) is linked into the server's checkpoints folder under
the name the workflows use, and the dataset they load is written to the input folder. Only the
training nodes get small settings (2 steps at 64 px, fp32, no validation renders): the SD1.5 LoRA
trains the real-size model; SDXL and SD3 Medium real-size training does not fit this CPU machine,
so those two train tiny diffusers models of the same architecture (``diffusers_model``) through
the shipped graphs. The Flux workflow loads reduced-depth random Flux.1-dev files (real widths, one
double and one single block, the whole T5-XXL: ``tests/comfy_flux.py``) under the shipped names,
through its stock loaders; it needs ≈ 10 GB more in the server, so it runs only with
``FINETUNE_REALSIZE=1``. Training runs in the background: a train workflow "completes" when its prompt
is done and its run reaches ``finished``. The sweep and A/B workflows then load the SD1.5 LoRA
files that the SD1.5 training wrote.
"""

from __future__ import annotations

import copy
import json
import os
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
import workflow_sync as ws
import workflow_tools as wt
from comfy_flux import FILES as FLUX_FILES
from comfy_models import cached_checkpoint, cached_flux
from comfy_server import ComfyClient, comfy_fixture  # noqa: F401  (the `comfy` fixture)
from PIL import Image, ImageChops
from safetensors import safe_open

from trainer.config import Arch
from trainer.models.tiny import save_tiny_checkpoint, tiny_bundle
from trainer.strip import compute_layout

pytestmark = pytest.mark.comfyui

SD15_FILE = "v1-5-pruned-emaonly.safetensors"  # the name the shipped workflows load
DATASET = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}
TINY_TRAINING = {
    "max_steps": 2, "epochs": 1, "batch_size": 1, "resolution": 64, "min_bucket_resolution": 64,
    "max_bucket_resolution": 128, "mixed_precision": "fp32", "compile": False, "gradient_checkpointing": False,
    "dataloader_workers": 0, "checkpoint_every": 1, "validation_prompts": "", "validation_every": 0,
}  # fmt: skip
TINY_MODELS = {"train_lora_sdxl": "tiny-sdxl", "train_full_sd3_medium": "tiny-sd3"}
TRAIN_NODES = ("FinetuneTrainLoRA", "FinetuneTrainFull", "FinetuneTrainLoRAModel")
needs_realsize = pytest.mark.skipif(
    not os.environ.get("FINETUNE_REALSIZE"),
    reason="Flux's T5-XXL needs ~10 GB more in the server; set FINETUNE_REALSIZE=1",
)


def api(name: str) -> dict:
    return ws.read_json(ws.WORKFLOWS_DIR / f"{name}.api.json")


def node_id(prompt: dict, class_type: str) -> str:
    (found,) = [k for k, n in prompt.items() if n["class_type"] == class_type]
    return found


def get(comfy: ComfyClient, path: str):
    with urllib.request.urlopen(comfy.url + path, timeout=30) as resp:
        return json.loads(resp.read())


def wait_for_run_end(comfy: ComfyClient, run: str, *, timeout: float) -> dict:
    """The run's detail once it is no longer queued, running or paused."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        detail = get(comfy, f"/finetune/runs/{run}")
        if detail["state"] not in ("queued", "running", "paused"):
            return detail
        time.sleep(1)
    raise AssertionError(f"run {run!r} did not end within {timeout:.0f} s: {detail}")


@pytest.fixture(scope="module")
def host(comfy: ComfyClient) -> Iterator[ComfyClient]:
    """The server with the shipped workflows' dataset and models in place; its models are
    unloaded afterwards (the server lives on until the session ends, beside other modules' servers)."""
    folder = comfy.input_dir / "my-dataset"
    folder.mkdir(parents=True, exist_ok=True)
    for stem, colour in DATASET.items():
        Image.new("RGB", (64, 64), colour).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(f"k4s4 style, {stem}, square, flat colour", encoding="utf-8")
    (comfy.models_dir / "checkpoints" / SD15_FILE).symlink_to(cached_checkpoint("sd15"))
    for arch, name in ((Arch.SDXL, "tiny-sdxl"), (Arch.SD3, "tiny-sd3")):
        save_tiny_checkpoint(
            tiny_bundle(arch, seed=0), comfy.base_dir / "models" / "diffusers" / name, single_file=False
        )
    yield comfy
    comfy.post_json("/free", {"unload_models": True, "free_memory": True})


def training_prompt(name: str) -> dict:
    """The shipped train workflow with tiny settings on its Train node."""
    prompt = copy.deepcopy(api(name))
    for node in prompt.values():
        if node["class_type"] in TRAIN_NODES:
            # Train LoRA (Model) has no compile or bucket-size inputs: only the inputs a node has.
            node["inputs"].update({k: v for k, v in TINY_TRAINING.items() if k in node["inputs"]})
            if name in TINY_MODELS:
                node["inputs"].update(ckpt_name="(none)", diffusers_model=TINY_MODELS[name])
    return prompt


@pytest.fixture(scope="module")
def train(host: ComfyClient) -> Callable[[str], dict]:
    """``train(name)`` queues a train workflow once per module and waits for its run to end;
    returns its prompt, history, run name and final run detail."""
    done: dict[str, dict] = {}

    def run_once(name: str) -> dict:
        if name == "train_lora_flux":
            link_flux_files(host)
        if name not in done:
            prompt = training_prompt(name)
            history = host.run(prompt, timeout=300)
            train_node = next(n for n in prompt.values() if n["class_type"] in TRAIN_NODES)
            run = train_node["inputs"]["run_name"]
            detail = wait_for_run_end(host, run, timeout=1200)
            done[name] = {"prompt": prompt, "history": history, "run": run, "detail": detail}
        return done[name]

    return run_once


@pytest.mark.parametrize("name", ws.workflow_names())
def test_workflow_validates_against_the_live_object_info(comfy: ComfyClient, name: str):
    # Catches a stale snapshot (tests/data) as well as a stale workflow; model files are not checked.
    assert wt.validate_api(api(name), wt.load_defs(comfy.object_info())) == [], (
        "re-record the snapshot and run: python tests/workflow_sync.py sync --complete"
    )


def test_dataset_prepare_writes_ten_shuffled_copies_and_plans_the_tutorials_run(host: ComfyClient):
    prompt = api("dataset_prepare")
    history = host.run(prompt, timeout=300)
    assert history["status"]["status_str"] == "success"
    outputs = history["outputs"]
    out_dir = host.output_dir / "finetune" / "datasets" / "my-dataset-x10"
    save = node_id(prompt, "FinetuneSaveDataset")
    assert outputs[save]["text"] == [f"wrote 30 images and 30 captions to {out_dir}"]
    captions = sorted(out_dir.rglob("*.txt"))
    assert len(captions) == 30
    texts = [p.read_text(encoding="utf-8") for p in captions]
    assert all(t.startswith("k4s4 style, ") for t in texts)
    assert len({t for t in texts if "red" in t}) > 1  # the copies of one image differ in order
    shown = node_id(prompt, "PreviewAny")  # Step Plan is not an output node: this shows its summary
    # 3 images x 10 repeats = 30 samples / batch 6 = 5 steps per epoch; 30 epochs
    assert outputs[shown]["text"][0].startswith(
        "30 samples per epoch, batch 6 -> 5 steps per epoch; 30 epoch(s) = 150 steps."
    )
    preview = node_id(prompt, "FinetuneDatasetPreview")
    assert len(outputs[preview]["images"]) == 1


def link_flux_files(comfy: ComfyClient) -> None:
    """The reduced Flux.1-dev files under the names and in the folders the Flux workflow loads."""
    folder = cached_flux(depth=1, single_depth=1)
    for kind, name in FLUX_FILES.values():
        link = comfy.models_dir / kind / name
        if not link.exists():
            link.symlink_to(folder / name)


@pytest.mark.parametrize(
    "name",
    ["train_lora_sd15", "train_lora_sdxl", "train_full_sd3_medium",
     pytest.param("train_lora_flux", marks=needs_realsize)],
)  # fmt: skip
def test_train_workflow_queues_its_run_and_the_run_finishes(host: ComfyClient, train, name: str):
    result = train(name)
    prompt, history, detail = result["prompt"], result["history"], result["detail"]
    assert history["status"]["status_str"] == "success"
    status = node_id(prompt, "FinetuneRunStatus")
    assert history["outputs"][status]["text"][0].startswith(f"run '{result['run']}': ")
    assert (detail["state"], detail["step"], detail["total"]) == ("finished", 2, 2), detail["message"]
    files = [c["file"] for c in get(host, f"/finetune/runs/{result['run']}/checkpoints")["checkpoints"]]
    assert f"{result['run']}-step00002.safetensors" in files
    if name == "train_lora_sd15":
        assert detail["config"]["base_model"].endswith(SD15_FILE)
    elif name == "train_lora_flux":  # trained on the MODEL the stock loaders gave, detected as Flux
        run = result["run"]
        path = host.output_dir / "finetune" / run / "checkpoints" / f"{run}-step00002.safetensors"
        with safe_open(path, framework="pt") as f:
            meta, keys = f.metadata(), set(f.keys())
        assert (meta["finetune.comfy_family"], meta["modelspec.architecture"]) == ("Flux", "flux-1-dev/lora")
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
        assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
    else:
        assert detail["config"]["base_model"].endswith(TINY_MODELS[name])


def small_renders(prompt: dict) -> dict:
    """The workflow rendering 64 px images in 2 steps (the shipped 512 px x 20 steps take minutes on CPU)."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] in ("EmptyLatentImage", "FinetuneCheckpointSweep"):
            inputs.update(width=64, height=64)
        if node["class_type"] in ("KSampler", "FinetuneCheckpointSweep"):
            inputs.update(steps=2)
    return prompt


def saved_image(comfy: ComfyClient, history: dict, node: str) -> Image.Image:
    (entry,) = history["outputs"][node]["images"]
    return Image.open(comfy.output_dir / entry["subfolder"] / entry["filename"]).convert("RGB")


def log_count(comfy: ComfyClient, text: str) -> int:
    return comfy.log_path.read_text(encoding="utf-8", errors="replace").count(text)


def test_checkpoint_sweep_renders_every_checkpoint_of_the_trained_run(host: ComfyClient, train):
    run = train("train_lora_sd15")["run"]
    prompt = small_renders(api("checkpoint_sweep"))
    runs = node_id(prompt, "FinetuneRunCheckpoints")
    assert prompt[runs]["inputs"]["run"] == run  # the shipped sweep reads the shipped training's run
    not_loaded = log_count(host, "lora key not loaded")
    history = host.run(prompt, timeout=900)
    assert history["status"]["status_str"] == "success"
    # max_steps 2 with a checkpoint every step: step 1, step 2 (and the final file, if the run wrote one)
    labels = ["base"] + [c["label"] for c in get(host, f"/finetune/runs/{run}/checkpoints")["checkpoints"]]
    assert labels[:3] == ["base", "step 1", "step 2"]
    assert history["outputs"][runs]["text"] == ["\n".join(labels)]
    rows = prompt[node_id(prompt, "FinetuneCheckpointSweep")]["inputs"]["positive"].splitlines()
    assert len(rows) == 2
    layout = strip_layout(prompt, sizes=[(64, 64)] * (2 * len(labels)), labels=labels, row_labels=rows)
    strip = saved_image(host, history, node_id(prompt, "SaveImage"))
    assert strip.size == layout.size  # every checkpoint x 2 prompts, each render 64 px
    tiles = [strip.crop(t.image_box) for t in layout.tiles]
    # the two prompts' base renders differ
    assert ImageChops.difference(tiles[0], tiles[len(labels)]).getbbox() is not None
    assert log_count(host, "lora key not loaded") == not_loaded


def test_negative_lora_ab_renders_three_labeled_variants(host: ComfyClient, train):
    run = train("train_lora_sd15")["run"]
    prompt = small_renders(api("negative_lora_ab"))
    lora = prompt[node_id(prompt, "LoraLoader")]["inputs"]["lora_name"]
    assert lora == f"{run}.safetensors"  # the final file of the shipped training's run
    files = [c["file"] for c in get(host, f"/finetune/runs/{run}/checkpoints")["checkpoints"]]
    if lora not in files:  # a run that ends on a checkpoint step may not write a separate final file
        (host.models_dir / "loras" / lora).symlink_to(
            host.output_dir / "finetune" / run / "checkpoints" / files[-1]
        )
    not_loaded = log_count(host, "lora key not loaded")
    history = host.run(prompt, timeout=900)
    assert history["status"]["status_str"] == "success"
    labels = prompt[node_id(prompt, "FinetuneLabeledStrip")]["inputs"]["labels"].splitlines()
    layout = strip_layout(prompt, sizes=[(64, 64)] * 3, labels=labels)
    strip = saved_image(host, history, node_id(prompt, "SaveImage"))
    assert strip.size == layout.size
    base, base_negative, _ = (strip.crop(t.image_box) for t in layout.tiles)
    # cfg 7: the trigger word as negative prompt changes the base render
    assert ImageChops.difference(base, base_negative).getbbox() is not None
    assert log_count(host, "lora key not loaded") == not_loaded


def strip_layout(prompt: dict, *, sizes: list, labels: list[str], row_labels: list[str] | None = None):
    """The layout the workflow's Labeled Strip draws for renders of ``sizes``."""
    inputs = prompt[node_id(prompt, "FinetuneLabeledStrip")]["inputs"]
    options = {k: inputs[k] for k in ("columns", "label_height", "font_size", "title", "padding")}
    return compute_layout(sizes, labels, row_labels=row_labels, **options)
