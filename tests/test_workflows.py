"""The shared workflows in ``workflows/`` against the node definitions, without ComfyUI.

The definitions come from ``tests/data/object_info_finetune.json``, a trimmed ``/object_info`` of a
real server (our nodes and the core nodes the workflows use). The last tests check that snapshot
against the current ``define_schema()`` of our node classes when ComfyUI's ``comfy_api`` is
importable (set ``COMFYUI_PATH`` and run with ComfyUI's python), so it cannot go stale silently.

After changing a node or an API file: ``python tests/workflow_sync.py record --server URL`` (a
server with empty model folders) and ``python tests/workflow_sync.py sync [--complete]``.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import workflow_sync as ws
import workflow_tools as wt
from comfy_server import NO_COMFY_API, comfy_api_available, import_pack

DEFS = wt.load_defs(wt.SNAPSHOT)
SNAPSHOT = ws.read_json(wt.SNAPSHOT)
NAMES = ws.workflow_names()
SHIPPED = [
    "checkpoint_sweep",
    "dataset_prepare",
    "negative_lora_ab",
    "train_full_sd3_medium",
    "train_lora_flux",
    "train_lora_sd15",
    "train_lora_sdxl",
]


def api(name: str) -> dict:
    return ws.read_json(ws.WORKFLOWS_DIR / f"{name}.api.json")


def ui(name: str) -> dict:
    return ws.read_json(ws.WORKFLOWS_DIR / f"{name}.json")


def nodes_of(prompt: dict, class_type: str) -> list[dict]:
    return [n for n in prompt.values() if n["class_type"] == class_type]


def test_every_shipped_workflow_has_an_api_and_a_ui_file():
    assert NAMES == SHIPPED
    assert sorted(p.name for p in ws.WORKFLOWS_DIR.glob("*.json")) == sorted(
        [f"{n}.json" for n in SHIPPED] + [f"{n}.api.json" for n in SHIPPED]
    )


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_validates_against_the_node_definitions(name):
    assert wt.validate_api(api(name), DEFS) == []


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_slots_links_and_widgets_match_the_definitions(name):
    workflow = ui(name)
    assert workflow["version"] == 0.4
    assert wt.validate_ui(workflow, DEFS) == []


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_files_describe_the_same_prompt(name):
    assert wt.ui_to_api(ui(name), DEFS) == api(name)


@pytest.mark.parametrize("name", NAMES)
def test_ui_file_is_what_the_converter_writes_from_the_api_file(name):
    text = (ws.WORKFLOWS_DIR / f"{name}.json").read_text(encoding="utf-8")
    assert ws.dumps(wt.api_to_ui(api(name), DEFS, name=name, previous=ui(name))) == text, (
        "run: python tests/workflow_sync.py sync"
    )


@pytest.mark.parametrize("name", NAMES)
def test_every_seed_widget_is_fixed_so_a_requeue_renders_and_trains_the_same(name):
    for node in ui(name)["nodes"]:
        node_def = DEFS.get(node["type"])
        if node_def is None:
            continue
        values = iter(node["widgets_values"])
        for spec in node_def.widgets:
            next(values)
            controls = [next(values) for _ in spec.control_values()]
            if spec.name in wt.SEED_NAMES:
                assert controls == ["fixed"], (node["id"], spec.name)


def test_readme_table_lists_every_workflow_with_both_files():
    readme = (ws.WORKFLOWS_DIR / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    listed = [re.match(r"\| `([a-z0-9_]+)\.json`", row).group(1) for row in rows]
    assert sorted(listed) == SHIPPED and len(listed) == len(set(listed))
    for name, row in zip(listed, rows, strict=True):
        assert f"`{name}.api.json`" in row


# --------------------------------------------------------------------------------------------
# What each workflow is for


def test_dataset_prepare_keeps_the_trigger_word_and_writes_ten_shuffled_copies():
    prompt = api("dataset_prepare")
    (shuffle,) = nodes_of(prompt, "FinetuneCaptionShuffle")
    assert (shuffle["inputs"]["shuffle"], shuffle["inputs"]["keep_tokens"]) == (True, 1)
    (repeat,) = nodes_of(prompt, "FinetuneDatasetRepeat")
    assert repeat["inputs"]["repeat_factor"] == 10
    (save,) = nodes_of(prompt, "FinetuneSaveDataset")
    assert prompt[save["inputs"]["dataset"][0]] is repeat
    for kind in ("FinetuneDatasetPreview", "FinetuneStepPlan"):
        (node,) = nodes_of(prompt, kind)
        assert (node["inputs"]["batch_size"], node["inputs"]["epochs"]) == (6, 30)


@pytest.mark.parametrize(
    ("name", "checkpoint", "resolution"),
    [
        ("train_lora_sd15", "v1-5-pruned-emaonly.safetensors", 512),
        ("train_lora_sdxl", "sd_xl_base_1.0.safetensors", 1024),
    ],
)
def test_lora_workflows_train_their_model_and_show_the_run(name, checkpoint, resolution):
    prompt = api(name)
    (train,) = nodes_of(prompt, "FinetuneTrainLoRA")
    assert (train["inputs"]["ckpt_name"], train["inputs"]["resolution"]) == (checkpoint, resolution)
    (status,) = nodes_of(prompt, "FinetuneRunStatus")
    assert prompt[status["inputs"]["run"][0]] is train


def test_flux_lora_trains_the_model_the_stock_flux_loaders_give():
    prompt = api("train_lora_flux")
    (train,) = nodes_of(prompt, "FinetuneTrainLoRAModel")
    inputs = train["inputs"]
    loaders = {name: prompt[inputs[name][0]] for name in ("model", "clip", "vae")}
    assert {k: (n["class_type"], n["inputs"]) for k, n in loaders.items()} == {
        "model": ("UNETLoader", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "fp8_e4m3fn"}),
        "clip": ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp8_e4m3fn.safetensors",
                                    "type": "flux", "device": "default"}),
        "vae": ("VAELoader", {"vae_name": "ae.safetensors"}),
    }  # fmt: skip
    settings = {k: inputs[k] for k in (
        "resolution", "lora_rank", "lora_alpha", "learning_rate", "batch_size", "mixed_precision",
        "validation_guidance", "precondition_outputs",
    )}  # fmt: skip
    assert settings == {
        "resolution": 1024, "lora_rank": 16, "lora_alpha": 16.0, "learning_rate": 1e-4, "batch_size": 1,
        "mixed_precision": "bf16", "validation_guidance": 1.0, "precondition_outputs": False,
    }  # fmt: skip
    # the same dataset graph as the other LoRA workflows
    sdxl = api("train_lora_sdxl")
    assert [n for n in prompt.values() if n["class_type"].startswith("FinetuneLoadDataset")] == [sdxl["1"]]
    assert prompt[inputs["dataset"][0]] == sdxl["2"]
    (status,) = nodes_of(prompt, "FinetuneRunStatus")
    assert prompt[status["inputs"]["run"][0]] is train


def test_sd3_full_fine_tune_uses_the_tutorials_settings():
    prompt = api("train_full_sd3_medium")
    (train,) = nodes_of(prompt, "FinetuneTrainFull")
    settings = {k: train["inputs"][k] for k in (
        "learning_rate", "batch_size", "lr_scheduler", "lr_warmup", "checkpoint_every", "keep_checkpoints",
        "validation_every", "epochs",
    )}  # fmt: skip
    assert settings == {
        "learning_rate": 1.5e-5, "batch_size": 6, "lr_scheduler": "cosine", "lr_warmup": 0.1,
        "checkpoint_every": 800, "keep_checkpoints": 30, "validation_every": 200, "epochs": 30,
    }  # fmt: skip
    assert train["inputs"]["ckpt_name"] == "sd3_medium_incl_clips.safetensors"
    (plan,) = nodes_of(prompt, "FinetuneStepPlan")
    assert {k: plan["inputs"][k] for k in ("batch_size", "epochs", "checkpoint_every", "validation_every")} == {
        "batch_size": 6, "epochs": 30, "checkpoint_every": 800, "validation_every": 200,
    }  # fmt: skip


def test_checkpoint_sweep_goes_loader_to_checkpoints_to_sweep_to_strip_to_save():
    prompt = api("checkpoint_sweep")
    chain = ["SaveImage", "FinetuneLabeledStrip", "FinetuneCheckpointSweep", "FinetuneRunCheckpoints"]
    (node,) = nodes_of(prompt, chain[0])
    for upstream in chain[1:]:
        sources = [prompt[v[0]] for v in node["inputs"].values() if wt.is_link(v)]
        node = next(s for s in sources if s["class_type"] == upstream)
    (sweep,) = nodes_of(prompt, "FinetuneCheckpointSweep")
    loaders = {prompt[v[0]]["class_type"] for v in sweep["inputs"].values() if wt.is_link(v)}
    assert "CheckpointLoaderSimple" in loaders


def test_negative_lora_ab_renders_three_labeled_variants_at_one_seed_with_cfg_above_one():
    prompt = api("negative_lora_ab")
    samplers = nodes_of(prompt, "KSampler")
    assert len(samplers) == 3
    assert len({s["inputs"]["seed"] for s in samplers}) == 1
    assert all(s["inputs"]["cfg"] > 1 for s in samplers)
    (strip,) = nodes_of(prompt, "FinetuneLabeledStrip")
    assert strip["inputs"]["labels"].splitlines() == [
        "base",
        "base + trigger as negative",
        "LoRA + trigger as negative",
    ]
    notes = [n["widgets_values"][0] for n in ui("negative_lora_ab")["nodes"] if n["type"] == "Note"]
    assert any("cfg > 1" in text and "negative prompt does nothing" in text for text in notes)


# --------------------------------------------------------------------------------------------
# The tools catch what they should (messages name the node, the input and the value)


def _tiny_prompt() -> dict:
    return copy.deepcopy(api("train_lora_sd15"))


def _train_id(prompt: dict) -> str:
    return next(k for k, n in prompt.items() if n["class_type"] == "FinetuneTrainLoRA")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p, t: p[t].update(class_type="FinetuneNope"), "node {t} (FinetuneNope): unknown node class; it is not in /object_info"),
        (lambda p, t: p[t]["inputs"].pop("run_name"), "node {t} (FinetuneTrainLoRA): required input 'run_name' is missing"),
        (lambda p, t: p[t]["inputs"].update(lr_scheduler="cosin"), "node {t} (FinetuneTrainLoRA): input 'lr_scheduler' = 'cosin' is not one of "),
        (lambda p, t: p[t]["inputs"].update(lora_rank=0), "node {t} (FinetuneTrainLoRA): input 'lora_rank' = 0 is below the minimum 1"),
        (lambda p, t: p[t]["inputs"].update(batch_size=2.5), "node {t} (FinetuneTrainLoRA): input 'batch_size' = 2.5 is not an integer"),
        (lambda p, t: p[t]["inputs"].update(ckpt_name=3), "node {t} (FinetuneTrainLoRA): input 'ckpt_name' = 3 is not a file name"),
        (lambda p, t: p[t]["inputs"].update(lora_dropout=0.125), "node {t} (FinetuneTrainLoRA): input 'lora_dropout' = 0.125 has more decimals than the widget's step 0.01 shows (2); the frontend would show and save 0.12"),
        (lambda p, t: p[t]["inputs"].update(bogus=1), "node {t} (FinetuneTrainLoRA): has no input 'bogus'"),
        (lambda p, t: p[t]["inputs"].update(dataset=["1", 1]), "node {t} (FinetuneTrainLoRA): input 'dataset' (FT_DATASET) is linked to output 1 of node 1 (FinetuneLoadDataset), which is STRING"),
        (lambda p, t: p[t]["inputs"].update(dataset=["99", 0]), "node {t} (FinetuneTrainLoRA): input 'dataset' links to missing node 99"),
    ],
)  # fmt: skip
def test_validate_api_names_the_node_input_and_value(edit, message):
    prompt = _tiny_prompt()
    train = _train_id(prompt)
    edit(prompt, train)
    errors = wt.validate_api(prompt, DEFS)
    assert len(errors) == 1 and errors[0].startswith(message.format(t=train)), errors


def test_validate_api_refuses_a_prompt_without_an_output_node():
    prompt = _tiny_prompt()
    status = next(k for k, n in prompt.items() if n["class_type"] == "FinetuneRunStatus")
    del prompt[status]
    assert wt.validate_api(prompt, DEFS) == ["the prompt has no output node, so ComfyUI would refuse it"]


def test_validate_ui_catches_a_link_listed_on_one_end_only_and_a_short_widget_list():
    workflow = ui("train_lora_sd15")
    link_id, src, src_slot, dst, dst_slot, _ = workflow["links"][0]
    target = next(n for n in workflow["nodes"] if n["id"] == dst)
    target["inputs"][dst_slot]["link"] = None
    target["widgets_values"].pop()
    widgets = sum(1 + len(w.control_values()) for w in DEFS[target["type"]].widgets)
    assert wt.validate_ui(workflow, DEFS) == [
        f"node {dst} ({target['type']}): {widgets - 1} widgets_values, expected {widgets}",
        f"link {link_id}: not listed on both ends (node {src} slot {src_slot}, node {dst} slot {dst_slot})",
    ]


def test_seed_widgets_get_the_frontends_control_value_and_other_ints_do_not():
    ksampler = DEFS["KSampler"]
    assert [s.name for s in ksampler.widgets] == [
        "seed",
        "steps",
        "cfg",
        "sampler_name",
        "scheduler",
        "denoise",
    ]
    assert [s.control_values() for s in ksampler.widgets] == [["fixed"], [], [], [], [], []]
    # A seed without control_after_generate still gets one: the frontend goes by the name.
    bare = wt.InputSpec(name="seed", type="INT", options={"default": 0}, required=True)
    assert bare.control_values() == ["fixed"]
    assert DEFS["FinetuneTrainLoRA"].input("validation_seed").control_values() == []


def test_every_seed_of_the_pack_starts_fixed():
    """A fresh node's seed must not be randomized after a queue: queuing the graph again would
    send other settings (a Train node would refuse its own run, a dataset draw would change)."""
    seeds = {
        (node_id, spec.name): spec.options.get("control_after_generate")
        for node_id, node_def in DEFS.items()
        if node_id.startswith("Finetune")
        for spec in node_def.widgets
        if spec.control_values()
    }
    assert seeds == {
        ("FinetuneCheckpointSweep", "seed"): "fixed",
        ("FinetuneDatasetPreview", "seed"): "fixed",
        ("FinetuneSaveDataset", "seed"): "fixed",
        ("FinetuneTrainFull", "seed"): "fixed",
        ("FinetuneTrainLoRA", "seed"): "fixed",
        ("FinetuneTrainLoRAModel", "seed"): "fixed",
    }


def test_ui_slots_list_sockets_before_widgets_like_the_frontend():
    slots = [(i.name, i.is_widget) for i in DEFS["KSampler"].ui_inputs()]
    assert slots == [
        ("model", False), ("positive", False), ("negative", False), ("latent_image", False),
        ("seed", True), ("steps", True), ("cfg", True), ("sampler_name", True), ("scheduler", True), ("denoise", True),
    ]  # fmt: skip


def test_complete_api_adds_new_widgets_at_their_default_and_drops_unknown_ones():
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "old": 1}},
        "2": {"class_type": "FinetuneRunStatus", "inputs": {}},
    }
    done, changes = ws.complete_api(prompt, DEFS)
    assert done["1"] == {
        "inputs": {"width": 64, "height": 512, "batch_size": 1},
        "class_type": "EmptyLatentImage",
        "_meta": {"title": "Empty Latent Image"},
    }
    assert changes == [
        "node 1 (EmptyLatentImage): dropped unknown input 'old'",
        "node 1 (EmptyLatentImage): added height=512",
        "node 1 (EmptyLatentImage): added batch_size=1",
    ]


# --------------------------------------------------------------------------------------------
# The snapshot against the node classes (needs comfy_api)

HAVE_COMFY = comfy_api_available()
needs_comfy = pytest.mark.skipif(not HAVE_COMFY, reason=NO_COMFY_API)


def _normalised(info: dict) -> dict:
    """An /object_info entry without what depends on the machine: the pack's module path and the
    options of combos that list model files or runs."""
    info = json.loads(json.dumps(info))  # as the server sends it: tuples become lists
    info.pop("python_module", None)
    for section in info["input"].values():
        if not isinstance(section, dict):
            continue
        for name, spec in section.items():
            if name in wt.FILE_LIST_INPUTS and len(spec) > 1 and isinstance(spec[1], dict):
                spec[1].pop("options", None)
                spec[1].pop("default", None)
    return info


@needs_comfy
def test_snapshot_matches_the_current_schema_of_every_node_of_the_pack():
    nodes = import_pack("nodes.extension").collect_nodes()
    assert len(nodes) >= 12
    current = {cls.GET_SCHEMA().node_id: cls for cls in nodes}
    recorded = sorted(n for n in SNAPSHOT if n.startswith("Finetune"))
    assert recorded == sorted(current), "re-record: python tests/workflow_sync.py record --server URL"
    for node_id, cls in current.items():
        now, then = _normalised(cls.GET_NODE_INFO_V1()), _normalised(SNAPSHOT[node_id])
        changed = _changed_keys(now, then)
        assert changed == [], (
            f"{node_id} changed since the snapshot was recorded ({changed}); re-record it and run sync"
        )


def _changed_keys(now: dict, then: dict) -> list[str]:
    """Top-level keys and input names whose entries differ."""
    changed = [k for k in sorted(set(now) | set(then)) if k != "input" and now.get(k) != then.get(k)]
    for section in sorted(set(now["input"]) | set(then["input"])):
        a, b = now["input"].get(section, {}), then["input"].get(section, {})
        changed += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return changed


def test_train_widget_order_only_grows_at_the_end():
    """The frontend restores a saved graph's widget values by position, so a Train node's widgets
    keep the order every saved graph was written with (tests/data/train_widget_order.json); a new
    option goes after them (nodes/train_nodes.py: _APPENDED), never between."""
    frozen = ws.read_json(wt.ROOT / "tests" / "data" / "train_widget_order.json")
    for node_id, names in frozen.items():
        now = [spec.name for spec in DEFS[node_id].widgets]
        assert now[: len(names)] == names, (
            f"{node_id}: widgets moved; saved graphs would load shifted values. Append new options last."
        )


@pytest.mark.parametrize(
    ("node_id", "shown"),
    [
        ("FinetuneTrainLoRA", ["ckpt_name", "run_name", "lora_rank", "lora_alpha", "learning_rate", "batch_size",
                               "epochs", "max_steps", "resolution", "checkpoint_every", "validation_prompts",
                               "validation_every", "memory_mode"]),
        ("FinetuneTrainFull", ["ckpt_name", "unet_name", "run_name", "learning_rate", "batch_size", "epochs",
                               "max_steps", "resolution", "train_text_encoder", "checkpoint_every",
                               "validation_prompts", "validation_every", "memory_mode"]),
    ],
)  # fmt: skip
def test_a_train_node_shows_what_most_runs_set_and_marks_the_rest_advanced(node_id, shown):
    widgets = DEFS[node_id].widgets
    not_advanced = [s.name for s in widgets if not s.options.get("advanced")]
    assert not_advanced == shown
    assert len(widgets) > 60
