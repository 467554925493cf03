"""The pack's nodes in the real ComfyUI frontend, as a new user meets them, in headless Chromium.

1. Every node of the pack, added fresh the way a drop from the node library adds it
   (``LiteGraph.createNode`` + ``graph.add``): its height and visible widgets at the default zoom,
   a screenshot each, and "Show Advanced" reaching every widget. Train nodes stay within
   :data:`MAX_WIDGETS` widgets and :data:`MAX_HEIGHT` px.
2. Each shipped UI workflow loads with its values, and each training graph (the shipped ones and a
   freshly built one) queued twice with the frontend's own Run button makes one run.
3. A graph with a dataset folder that does not exist, or a Train node without a model, is refused
   and the one-sentence reason shows under the node.

Sizes are written to ``node_sizes.json`` and screenshots to ``<node type>.png`` in the test's tmp
folder; copies are kept in ``/tmp/finetune_nodes/`` (pytest prunes old tmp folders). Skipped
without ``COMFYUI_PATH``, playwright or chromium, like ``tests/test_web_panel.py``, whose browser
fixtures this module uses.

Run: ``COMFYUI_PATH=/path/to/ComfyUI python -m pytest -q tests/test_web_nodes.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import workflow_sync as ws
from comfy_server import ComfyClient, comfy_fixture  # noqa: F401  (the `comfy` fixture)
from PIL import Image
from test_web_panel import Browser, browser, chromium  # noqa: F401  (fixtures)

pytestmark = pytest.mark.comfyui

TRAIN_NODES = ("FinetuneTrainLoRA", "FinetuneTrainFull")
MAX_WIDGETS = 20
MAX_HEIGHT = 700
# What most runs set; a fresh Train node shows these.
LORA_SHOWN = [
    "ckpt_name", "run_name", "lora_rank", "lora_alpha", "learning_rate", "batch_size", "epochs", "max_steps",
    "resolution", "checkpoint_every", "validation_prompts", "validation_every", "memory_mode",
]  # fmt: skip
FULL_SHOWN = [
    "ckpt_name", "unet_name", "run_name", "learning_rate", "batch_size", "epochs", "max_steps", "resolution",
    "train_text_encoder", "checkpoint_every", "validation_prompts", "validation_every", "memory_mode",
]  # fmt: skip
DATASET = "my-dataset"  # the folder the shipped workflows load
TINY_MODEL = {"sd15": "ft-nodes-tiny-sd15", "sdxl": "ft-nodes-tiny-sdxl", "sd3": "ft-nodes-tiny-sd3"}
TRAIN_WORKFLOWS = {"train_lora_sd15": "sd15", "train_lora_sdxl": "sdxl", "train_full_sd3_medium": "sd3"}
TINY_TRAINING = {
    "max_steps": 2, "epochs": 1, "batch_size": 1, "resolution": 64, "min_bucket_resolution": 64,
    "max_bucket_resolution": 128, "mixed_precision": "fp32", "compile": False, "gradient_checkpointing": False,
    "dataloader_workers": 0, "checkpoint_every": 1, "validation_prompts": "", "validation_every": 0,
}  # fmt: skip
QUEUE_WAIT_S = 300
KEEP = Path("/tmp/finetune_nodes")

# Page helpers (window.app and window.LiteGraph are the frontend's own globals).
READY = "() => !!(window.app?.graph && window.LiteGraph && window.app.canvas)"
MEASURE = """(node) => {
    const shown = node.widgets?.filter((w) => node.isWidgetVisible(w)) ?? [];
    return {
        height: Math.round(node.size[1] + LiteGraph.NODE_TITLE_HEIGHT),
        width: Math.round(node.size[0]),
        shown: shown.map((w) => w.name),
        widgets: node.widgets?.filter((w) => !w.hidden).length ?? 0,
        names: node.widgets?.filter((w) => !w.hidden).map((w) => w.name) ?? [],
    };
}"""
ADD_NODE = """([type, x, y]) => {
    const node = LiteGraph.createNode(type);
    node.pos = [x, y];
    app.graph.add(node);
    return node.id;
}"""


def _ready(b: Browser) -> None:
    """Wait until the app has set up: the Run button is drawn and the start-up requests (node
    definitions, the workflow it opens) are done, so nothing replaces the graph a test builds."""
    b.page.wait_for_function(READY, timeout=90_000)
    b.page.wait_for_selector('[data-testid="queue-button"]', timeout=90_000)
    b.page.wait_for_load_state("networkidle")


def _fresh_canvas(page) -> None:
    """An empty graph at the default zoom, scrolled to its origin. Nodes are removed one by one, not
    with ``graph.clear()``: that restarts node ids, and the frontend's widget store would hand a new
    node the values of the removed node with the same id."""
    page.evaluate(
        """() => {
            for (const node of [...app.graph.nodes]) app.graph.remove(node);
            app.canvas.ds.scale = 1;
            app.canvas.ds.offset = [0, 0];
            app.canvas.setDirty(true, true);
        }"""
    )


def _measure(page, node_id: int) -> dict:
    return page.evaluate(f"(id) => ({MEASURE})(app.graph.getNodeById(id))", node_id)


def _node_sizes(b: Browser, comfy: ComfyClient, tmp_path: Path) -> dict[str, dict]:
    """Add every node of the pack to an empty canvas, one at a time; measure and screenshot it."""
    page = b.page
    types = sorted(n for n in comfy.object_info() if n.startswith("Finetune"))
    assert len(types) >= 14
    sizes = {}
    for node_type in types:
        _fresh_canvas(page)
        node_id = page.evaluate(ADD_NODE, [node_type, 100, 120])
        page.evaluate("() => app.canvas.draw(true, true)")
        size = _measure(page, node_id)
        shot = tmp_path / f"{node_type}.png"
        page.screenshot(path=str(shot))
        size["screenshot"] = str(shot)
        size["menu"] = page.evaluate(
            """(id) => app.canvas.getNodeMenuOptions(app.graph.getNodeById(id))
                .filter(Boolean).map((o) => o.content).filter((c) => typeof c === "string")""",
            node_id,
        )
        size["seed_controls"] = page.evaluate(
            """(id) => Object.fromEntries((app.graph.getNodeById(id).widgets ?? [])
                .filter((w) => w.linkedWidgets?.length).map((w) => [w.name, w.linkedWidgets[0].value]))""",
            node_id,
        )
        # Every widget is reachable: "Show Advanced" draws them all, "Hide Advanced" shrinks back.
        page.evaluate("(id) => app.graph.getNodeById(id).toggleAdvanced()", node_id)
        size["advanced_shown"] = _measure(page, node_id)
        page.evaluate("(id) => app.graph.getNodeById(id).toggleAdvanced()", node_id)
        size["hidden_again"] = _measure(page, node_id)
        sizes[node_type] = size
    return sizes


def _write_sizes(sizes: dict, tmp_path: Path) -> None:
    path = tmp_path / "node_sizes.json"
    path.write_text(json.dumps(sizes, indent=1), encoding="utf-8")
    KEEP.mkdir(exist_ok=True)
    for shot in [path, *tmp_path.glob("*.png")]:
        shutil.copyfile(shot, KEEP / shot.name)
    for node_type, s in sizes.items():
        print(f"{node_type:32s} {s['height']:5d} px {len(s['shown']):3d} / {s['widgets']:3d} widgets")


def test_fresh_nodes_are_compact_and_reach_every_widget(
    browser: Browser,  # noqa: F811  (the fixture imported above)
    comfy: ComfyClient,
    tmp_path: Path,
):
    _ready(browser)
    sizes = _node_sizes(browser, comfy, tmp_path)
    _write_sizes(sizes, tmp_path)
    for node_type in TRAIN_NODES:
        size = sizes[node_type]
        assert len(size["shown"]) <= MAX_WIDGETS, (node_type, size["shown"])
        assert size["height"] <= MAX_HEIGHT, (node_type, size["height"])
        assert size["seed_controls"] == {"seed": "fixed"}
    for node_type, shown in (("FinetuneTrainLoRA", LORA_SHOWN), ("FinetuneTrainFull", FULL_SHOWN)):
        assert sizes[node_type]["shown"] == shown
    for node_type, size in sizes.items():
        with Image.open(size["screenshot"]) as img:
            assert img.size == (1280, 800)
        hidden = size["widgets"] - len(size["shown"])
        if hidden:
            assert "Show Advanced" in size["menu"], node_type
            assert len(size["advanced_shown"]["shown"]) == size["widgets"], node_type
            assert size["advanced_shown"]["height"] > size["height"], node_type
            kept = ("height", "width", "shown", "widgets")
            assert {k: size["hidden_again"][k] for k in kept} == {k: size[k] for k in kept}
        else:
            assert size["advanced_shown"]["shown"] == size["shown"], node_type
    # Seeds of runs and dataset draws start fixed (KSampler-like randomize would change the run).
    assert sizes["FinetuneDatasetPreview"]["seed_controls"] == {"seed": "fixed"}
    assert sizes["FinetuneSaveDataset"]["seed_controls"] == {"seed": "fixed"}
    assert sizes["FinetuneCheckpointSweep"]["seed_controls"] == {"seed": "fixed"}
    assert browser.errors == []


# --------------------------------------------------------------------------------------------
# 2. Shipped workflows load with their values; queuing twice makes one run

LOAD = """async (graph) => {
    await app.loadGraphData(graph, true, true, null, {skipAssetScans: true, silentAssetErrors: true});
    return Object.fromEntries(app.graph.nodes.map((n) => [n.id, n.serialize().widgets_values ?? null]));
}"""
SET_WIDGETS = """([id, values]) => {
    const node = app.graph.getNodeById(id);
    for (const [name, value] of Object.entries(values)) {
        const widget = node.widgets.find((w) => w.name === name);
        if (!widget) throw new Error(`node ${id} has no widget ${name}`);
        widget.value = value;
    }
}"""


@pytest.fixture(scope="module")
def models(comfy: ComfyClient) -> dict[str, str]:
    """Tiny diffusers models the Train nodes can load (the shipped file names are not on this
    machine) and the shipped workflows' dataset folder; {arch: model name}."""
    # Imported here: diffusers is slow to import, and the size test does not need it.
    from train_helpers import make_images

    from trainer.config import Arch
    from trainer.models.tiny import save_tiny_checkpoint, tiny_bundle

    arches = {"sd15": Arch.SD15, "sdxl": Arch.SDXL, "sd3": Arch.SD3}
    for key, name in TINY_MODEL.items():
        folder = comfy.base_dir / "models" / "diffusers" / name
        if not (folder / "model_index.json").exists():
            save_tiny_checkpoint(tiny_bundle(arches[key], seed=0), folder, single_file=False)
    if not (comfy.input_dir / DATASET).exists():
        make_images(comfy.input_dir / DATASET, [(64, 64)] * 3)
    return dict(TINY_MODEL)


def _refresh_lists(b: Browser) -> None:
    """Refresh the node definitions' file lists (the canvas's "r"), for files written after the page
    loaded. Not a page reload: that restores the previous graph asynchronously."""
    _ready(b)
    b.page.evaluate("async () => await app.refreshComboInNodes()")


def _run_button_queue(b: Browser, comfy: ComfyClient) -> dict:
    """Click the frontend's Run button; wait for the prompt it posts to finish. Returns its history."""
    page = b.page
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as posted:
        page.click('[data-testid="queue-button"]')
    response = posted.value
    assert response.status == 200, response.text()
    prompt_id = response.json()["prompt_id"]
    deadline = time.monotonic() + QUEUE_WAIT_S
    while not (history := comfy.history(prompt_id)).get("status", {}).get("completed"):
        assert time.monotonic() < deadline, f"prompt {prompt_id} did not finish: {history}"
        time.sleep(0.5)
    return history


def _run_names(comfy: ComfyClient) -> set[str]:
    return {r["name"] for r in comfy.get_json("/finetune/runs")["runs"]}


def _queue_twice_makes_one_run(b: Browser, comfy: ComfyClient, train_id: int, run: str) -> list[str]:
    """Queue the loaded graph twice with the Run button; returns the Train node's two messages."""
    before = _run_names(comfy)
    messages = []
    for _ in range(2):
        history = _run_button_queue(b, comfy)
        assert history["status"]["status_str"] == "success", history["status"]
        messages.append(history["outputs"][str(train_id)]["text"][0])
    assert _run_names(comfy) - before == {run}
    return messages


@pytest.mark.parametrize("name", ws.workflow_names())
def test_shipped_workflow_loads_with_its_values_and_is_compact(
    browser: Browser,  # noqa: F811
    name: str,
):
    _ready(browser)
    workflow = ws.read_json(ws.WORKFLOWS_DIR / f"{name}.json")
    loaded = browser.page.evaluate(LOAD, workflow)
    for node in workflow["nodes"]:
        if "widgets_values" in node:
            # A node without widgets saves [] in our files and nothing in the frontend's.
            assert (loaded[str(node["id"])] or []) == node["widgets_values"], (name, node["id"], node["type"])
    for node in workflow["nodes"]:
        if node["type"] in TRAIN_NODES:
            size = _measure(browser.page, node["id"])
            assert len(size["shown"]) <= MAX_WIDGETS and size["height"] <= MAX_HEIGHT, size
    assert browser.errors == []


@pytest.mark.parametrize("name", sorted(TRAIN_WORKFLOWS))
def test_shipped_training_queued_twice_with_the_run_button_makes_one_run(
    browser: Browser,  # noqa: F811
    comfy: ComfyClient,
    models: dict[str, str],
    name: str,
):
    _refresh_lists(browser)
    workflow = ws.read_json(ws.WORKFLOWS_DIR / f"{name}.json")
    browser.page.evaluate(LOAD, workflow)
    (train,) = [n for n in workflow["nodes"] if n["type"] in TRAIN_NODES]
    run = f"web-{name}"
    # What a user on this machine changes: the model, the run name and a tiny schedule.
    tiny = TINY_TRAINING | {
        "ckpt_name": "(none)",
        "diffusers_model": models[TRAIN_WORKFLOWS[name]],
        "run_name": run,
    }
    browser.page.evaluate(SET_WIDGETS, [train["id"], tiny])
    first, second = _queue_twice_makes_one_run(browser, comfy, train["id"], run)
    assert first.startswith(f"run '{run}': queued")
    assert re.match(rf"run '{run}': already (queued|running|paused|finished)", second), second
    assert browser.errors == []


def test_fresh_training_graph_queued_twice_with_the_run_button_makes_one_run(
    browser: Browser,  # noqa: F811
    comfy: ComfyClient,
    models: dict[str, str],
):
    """A graph built from fresh nodes (default seed control) keeps its run on the second queue."""
    _refresh_lists(browser)
    page = browser.page
    _fresh_canvas(page)
    load = page.evaluate(ADD_NODE, ["FinetuneLoadDataset", 100, 120])
    train = page.evaluate(ADD_NODE, ["FinetuneTrainLoRA", 450, 120])
    status = page.evaluate(ADD_NODE, ["FinetuneRunStatus", 900, 120])
    page.evaluate(
        """([load, train, status]) => {
            const node = (id) => app.graph.getNodeById(id);
            node(load).connect(0, node(train), 0);
            node(train).connect(0, node(status), 0);
        }""",
        [load, train, status],
    )
    run = "web-fresh-lora"
    page.evaluate(SET_WIDGETS, [load, {"folder": DATASET}])
    tiny = TINY_TRAINING | {"ckpt_name": "(none)", "diffusers_model": models["sd15"], "run_name": run}
    page.evaluate(SET_WIDGETS, [train, tiny])
    first, second = _queue_twice_makes_one_run(browser, comfy, train, run)
    assert first.startswith(f"run '{run}': queued")
    assert re.match(rf"run '{run}': already (queued|running|paused|finished)", second), second
    assert browser.errors == []


# --------------------------------------------------------------------------------------------
# 3. Refusals show their message on the node

ERRORS_ON = """(id) => app.graph.getNodeById(id).finetuneErrors ?? []"""


def _dataset_train_status(page, folder: str) -> tuple[int, int]:
    """Load Dataset(folder) -> fresh Train LoRA -> Run Status on an empty canvas; (load, train) ids."""
    _fresh_canvas(page)
    load = page.evaluate(ADD_NODE, ["FinetuneLoadDataset", 100, 120])
    train = page.evaluate(ADD_NODE, ["FinetuneTrainLoRA", 450, 120])
    status = page.evaluate(ADD_NODE, ["FinetuneRunStatus", 900, 120])
    page.evaluate(
        """([load, train, status]) => {
            const node = (id) => app.graph.getNodeById(id);
            node(load).connect(0, node(train), 0);
            node(train).connect(0, node(status), 0);
        }""",
        [load, train, status],
    )
    page.evaluate(SET_WIDGETS, [load, {"folder": folder}])
    return load, train


def _messages_on(page, node_id: int) -> list[str]:
    """The messages drawn under the node, once the canvas has drawn them."""
    page.wait_for_function(f"(id) => ({ERRORS_ON})(id).length > 0", arg=node_id, timeout=QUEUE_WAIT_S * 1000)
    return page.evaluate(ERRORS_ON, node_id)


def _keep_screenshot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name))
    KEEP.mkdir(exist_ok=True)
    shutil.copyfile(tmp_path / name, KEEP / name)


def test_a_missing_dataset_folder_shows_its_message_on_the_node(
    browser: Browser,  # noqa: F811
    comfy: ComfyClient,
    tmp_path: Path,
):
    """/prompt refuses the graph (Load Dataset's validate_inputs); the reason is drawn under the node."""
    _ready(browser)
    page = browser.page
    load, train = _dataset_train_status(page, "no-such-folder")
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as posted:
        page.click('[data-testid="queue-button"]')
    assert posted.value.status == 400
    roots = f"{comfy.input_dir}, {comfy.base_dir / 'datasets'}"
    assert _messages_on(page, load) == [f"folder: no folder 'no-such-folder' in {roots}"]
    assert page.evaluate("(id) => app.graph.getNodeById(id).has_errors", load) is True
    assert page.evaluate(ERRORS_ON, train) == []
    _keep_screenshot(page, tmp_path, "node_error_dataset.png")
    assert browser.errors == []


def test_a_refused_model_shows_its_message_on_the_train_node(
    browser: Browser,  # noqa: F811
    comfy: ComfyClient,
    models: dict[str, str],
    tmp_path: Path,
):
    """A fresh Train node with no model chosen fails when it runs; the reason is drawn under it."""
    _refresh_lists(browser)
    page = browser.page
    _, train = _dataset_train_status(page, DATASET)
    page.evaluate(SET_WIDGETS, [train, {"run_name": "web-no-model"}])
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as posted:
        page.click('[data-testid="queue-button"]')
    assert posted.value.status == 200
    assert _messages_on(page, train) == [
        "Train LoRA: ckpt_name is (none): choose a checkpoint to train, or a diffusers_model / unet_name"
    ]
    _keep_screenshot(page, tmp_path, "node_error_model.png")
    assert browser.errors == []


def test_error_text_helpers(
    browser: Browser,  # noqa: F811
):
    """node_errors.js as served: ComfyUI's "<input> - " prefix is dropped, long lists are cut, an
    execution error counts for its node only, and a message shows once."""
    _ready(browser)
    result = browser.page.evaluate(
        """async (base) => {
            const e = await import(`${base}/node_errors.js`);
            const custom = {details: "folder - folder: no folder 'x' in /in", extra_info: {input_name: "folder"}};
            const listed = {message: "Value not in list", details: "ckpt_name: 'a' not in " + "b".repeat(500)};
            const nodeErrors = {"3": {errors: [custom, custom]}};
            const executionError = {node_id: "4", exception_message: "Train LoRA: no model\\n"};
            return {
                custom: e.validationText(custom),
                listed: e.validationText(listed).length,
                three: e.errorMessages(3, {nodeErrors, executionError}),
                four: e.errorMessages("4", {nodeErrors, executionError}),
                five: e.errorMessages(5, {nodeErrors: null, executionError: null}),
            };
        }""",
        "/extensions/comfyui-finetune",
    )
    assert result == {
        "custom": "folder: no folder 'x' in /in",
        "listed": 400,
        "three": ["folder: no folder 'x' in /in"],
        "four": ["Train LoRA: no model"],
        "five": [],
    }
    assert browser.errors == []


def test_show_advanced_and_edited_values_survive_save_and_load(
    browser: Browser,  # noqa: F811
):
    """A Train node opened with "Show Advanced" and an advanced value edited is saved and loads
    back the same: every widget shown, the edited value kept, the hidden ones folded for others."""
    _ready(browser)
    page = browser.page
    _fresh_canvas(page)
    shown = page.evaluate(ADD_NODE, ["FinetuneTrainLoRA", 100, 120])
    folded = page.evaluate(ADD_NODE, ["FinetuneTrainLoRA", 600, 120])
    page.evaluate(
        """([shown, folded]) => {
            app.graph.getNodeById(shown).toggleAdvanced();
            for (const id of [shown, folded]) {
                const node = app.graph.getNodeById(id);
                node.widgets.find((w) => w.name === "lr_scheduler").value = "linear";
                node.widgets.find((w) => w.name === "seed").value = 7;
            }
        }""",
        [shown, folded],
    )
    saved = page.evaluate("() => app.graph.serialize()")
    page.evaluate(LOAD, saved)
    values = page.evaluate(
        """(ids) => ids.map((id) => {
            const widgets = app.graph.getNodeById(id).widgets;
            const seed = widgets.find((w) => w.name === "seed");
            return {
                lr_scheduler: widgets.find((w) => w.name === "lr_scheduler").value,
                seed: seed.value,
                control: seed.linkedWidgets[0].value,
            };
        })""",
        [shown, folded],
    )
    assert values == [{"lr_scheduler": "linear", "seed": 7, "control": "fixed"}] * 2
    after = [_measure(page, node_id) for node_id in (shown, folded)]
    frozen = ws.read_json(ws.ROOT / "tests" / "data" / "train_widget_order.json")["FinetuneTrainLoRA"]
    assert after[0]["shown"] == after[0]["names"]
    assert set(frozen) | {"memory_mode"} <= set(after[0]["shown"])
    assert after[1]["shown"] == LORA_SHOWN
    assert after[1]["height"] <= MAX_HEIGHT < after[0]["height"]
    assert browser.errors == []
