"""The pack's nodes in the real ComfyUI frontend, as a new user meets them, in headless Chromium.

1. Every node of the pack, added fresh the way a drop from the node library adds it
   (``LiteGraph.createNode`` + ``graph.add``): its height and visible widgets at the default zoom,
   a screenshot each, and "Show Advanced" reaching every widget. Train nodes stay within
   :data:`MAX_WIDGETS` widgets and :data:`MAX_HEIGHT` px.
2. Each shipped UI workflow loads with its values, and each training graph (the shipped ones and a
   freshly built one) queued twice with the frontend's own Run button makes one run.
3. A graph with a dataset folder that does not exist is refused and the message shows on the node.

Sizes are written to ``node_sizes.json`` and screenshots to ``<node type>.png`` in the test's tmp
folder; copies are kept in ``/tmp/finetune_nodes/`` (pytest prunes old tmp folders). Skipped without ``COMFYUI_PATH``, playwright or chromium, like
``tests/test_web_panel.py``, whose browser fixtures this module uses.

Run: ``COMFYUI_PATH=/path/to/ComfyUI python -m pytest -q tests/test_web_nodes.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from comfy_server import ComfyClient, comfy_fixture  # noqa: F401  (the `comfy` fixture)
from PIL import Image
from test_web_panel import Browser, browser, chromium  # noqa: F401  (fixtures)

pytestmark = pytest.mark.comfyui

TRAIN_NODES = ("FinetuneTrainLoRA", "FinetuneTrainFull")
MAX_WIDGETS = 20
MAX_HEIGHT = 700
# What most runs set; a fresh Train node shows these (memory_mode once the option exists).
LORA_SHOWN = [
    "ckpt_name", "run_name", "lora_rank", "lora_alpha", "learning_rate", "batch_size", "epochs", "max_steps",
    "resolution", "checkpoint_every", "validation_prompts", "validation_every",
]  # fmt: skip
FULL_SHOWN = [
    "ckpt_name", "unet_name", "run_name", "learning_rate", "batch_size", "epochs", "max_steps", "resolution",
    "train_text_encoder", "checkpoint_every", "validation_prompts", "validation_every",
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
    };
}"""
ADD_NODE = """([type, x, y]) => {
    const node = LiteGraph.createNode(type);
    node.pos = [x, y];
    app.graph.add(node);
    return node.id;
}"""


def _ready(b: Browser) -> None:
    b.page.wait_for_function(READY, timeout=90_000)


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
    assert sizes["FinetuneTrainLoRA"]["shown"] == LORA_SHOWN
    assert sizes["FinetuneTrainFull"]["shown"] == FULL_SHOWN
    for node_type, size in sizes.items():
        with Image.open(size["screenshot"]) as img:
            assert img.size == (1280, 800)
        hidden = size["widgets"] - len(size["shown"])
        if hidden:
            assert "Show Advanced" in size["menu"], node_type
            assert len(size["advanced_shown"]["shown"]) == size["widgets"], node_type
            assert size["advanced_shown"]["height"] > size["height"], node_type
            assert size["hidden_again"] == {k: size[k] for k in ("height", "width", "shown", "widgets")}
        else:
            assert size["advanced_shown"]["shown"] == size["shown"], node_type
    # Seeds of runs and dataset draws start fixed (KSampler-like randomize would change the run).
    assert sizes["FinetuneDatasetPreview"]["seed_controls"] == {"seed": "fixed"}
    assert sizes["FinetuneSaveDataset"]["seed_controls"] == {"seed": "fixed"}
    assert sizes["FinetuneCheckpointSweep"]["seed_controls"] == {"seed": "fixed"}
    assert browser.errors == []
