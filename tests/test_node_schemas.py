"""The pack's nodes without a running server: schemas, widgets derived from configs, path checks,
and the dataset nodes' execute() on tiny folders.

Path checks run anywhere. Everything that needs ComfyUI's ``comfy_api`` is skipped when it is not
importable; set ``COMFYUI_PATH`` (and run with ComfyUI's python) to run it.
"""

from __future__ import annotations

import os

import pytest
from comfy_server import NO_COMFY_API, comfy_api_available, import_pack
from PIL import Image

from trainer.config import CaptionPolicy, DatasetPart, DatasetSource, DatasetSpec, TrainConfig
from trainer.data.captions import draw_caption

host = import_pack("nodes.host")

HAVE_COMFY = comfy_api_available()
needs_comfy = pytest.mark.skipif(not HAVE_COMFY, reason=NO_COMFY_API)

DATASET_NODE_IDS = [
    "FinetuneLoadDataset",
    "FinetuneCaptionShuffle",
    "FinetuneCaptionDropout",
    "FinetuneDatasetRepeat",
    "FinetuneMergeDatasets",
    "FinetuneDatasetPreview",
    "FinetuneStepPlan",
    "FinetuneSaveDataset",
]


def _all_nodes() -> list:
    if not HAVE_COMFY:
        return []
    return import_pack("nodes.extension").collect_nodes()


ALL_NODES = _all_nodes()


def make_folder(root, name: str, captions: dict[str, str], *, colour=(200, 30, 30)) -> str:
    """A folder of 16 px PNGs with same-stem captions; returns its path."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for stem, caption in captions.items():
        Image.new("RGB", (16, 16), colour).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return str(folder)


# --------------------------------------------------------------------------------------------
# Path checks (no ComfyUI needed)


def test_secure_subpath_accepts_a_nested_folder(tmp_path):
    assert host.secure_subpath(tmp_path, "a/b", field="folder") == tmp_path / "a" / "b"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("../outside", "folder: '../outside' contains '..'; give a path inside {base} without '..'"),
        ("a/../../x", "folder: 'a/../../x' contains '..'; give a path inside {base} without '..'"),
        ("/etc", "folder: '/etc' is an absolute path; give a path relative to {base}"),
        ("  ", "folder: is empty; give a folder name inside {base}"),
        (".", "folder: '.' is {base} itself; name a sub-folder of it"),
    ],
)
def test_secure_subpath_refuses_escapes_with_the_value_in_the_message(tmp_path, value, message):
    with pytest.raises(host.UnsafePathError) as info:
        host.secure_subpath(tmp_path, value, field="folder")
    assert str(info.value) == message.format(base=tmp_path)


def test_secure_subpath_refuses_a_symlink_that_leads_outside(tmp_path):
    base, outside = tmp_path / "base", tmp_path / "outside"
    base.mkdir()
    outside.mkdir()
    os.symlink(outside, base / "link")
    with pytest.raises(host.UnsafePathError) as info:
        host.secure_subpath(base, "link/x", field="folder")
    assert (
        str(info.value)
        == f"folder: 'link/x' resolves to {outside / 'x'}, outside {base} (through a symlink?)"
    )


def test_find_folder_in_roots_searches_roots_in_order_and_limits_absolute_paths(tmp_path):
    first, second, elsewhere = tmp_path / "input", tmp_path / "datasets", tmp_path / "elsewhere"
    (second / "cats").mkdir(parents=True)
    (first / "dogs").mkdir(parents=True)
    (elsewhere / "birds").mkdir(parents=True)
    roots = [first, second]
    assert host.find_folder_in_roots("cats", roots, field="folder") == second / "cats"
    assert host.find_folder_in_roots(str(first / "dogs"), roots, field="folder") == first / "dogs"
    with pytest.raises(host.UnsafePathError) as info:
        host.find_folder_in_roots(str(elsewhere / "birds"), roots, field="folder")
    assert str(info.value).startswith(
        f"folder: '{elsewhere / 'birds'}' is not inside an allowed folder ({first}, {second});"
    )
    assert "extra_model_paths.yaml under 'datasets:'" in str(info.value)
    with pytest.raises(host.UnsafePathError) as info:
        host.find_folder_in_roots("fish", roots, field="folder")
    assert str(info.value) == f"folder: no folder 'fish' in {first}, {second}"


# --------------------------------------------------------------------------------------------
# Schemas


@needs_comfy
def test_the_pack_serves_every_dataset_node():
    ids = [cls.define_schema().node_id for cls in ALL_NODES]
    assert ALL_NODES, "collect_nodes() found no nodes"
    assert [i for i in ids if i in DATASET_NODE_IDS] == DATASET_NODE_IDS
    assert len(ids) == len(set(ids)), f"duplicate node ids: {ids}"


@needs_comfy
@pytest.mark.parametrize("node_cls", ALL_NODES, ids=lambda c: c.__name__)
def test_schema(node_cls):
    schema = node_cls.define_schema()
    schema.validate()
    assert schema.node_id.startswith("Finetune")
    assert schema.category == "finetune" or schema.category.startswith("finetune/")
    assert schema.description, f"{schema.node_id} has no description"
    for top in schema.inputs:
        for inp in top.get_all():
            assert inp.tooltip, f"{schema.node_id}: input {inp.id!r} has no tooltip"
    for out in schema.outputs:
        assert out.tooltip, f"{schema.node_id}: output {out.id!r} has no tooltip"
    info = node_cls.GET_NODE_INFO_V1()  # what /object_info serves
    assert info["name"] == schema.node_id
    assert info["category"] == schema.category


@needs_comfy
def test_entrypoint_returns_the_extension_and_a_broken_module_only_loses_its_own_nodes(monkeypatch, caplog):
    import asyncio

    pack = import_pack()
    extension = import_pack("nodes.extension")
    ext = asyncio.run(pack.comfy_entrypoint())
    assert isinstance(ext, extension.FinetuneExtension)
    real = extension._optional_module

    def optional_module(name):
        if name == "train_nodes":
            raise SyntaxError("invalid syntax (train_nodes.py, line 3)")
        return real(name)

    monkeypatch.setattr(extension, "_optional_module", optional_module)
    monkeypatch.setattr(
        extension,
        "NODE_MODULES",
        (("dataset_nodes", "DATASET_NODES"), ("train_nodes", "TRAIN_NODES"), ("not_written_yet", "X")),
    )
    with caplog.at_level("ERROR", logger="finetune"):
        nodes = asyncio.run(ext.get_node_list())
    assert [n.define_schema().node_id for n in nodes] == DATASET_NODE_IDS
    assert [r.getMessage() for r in caplog.records] == [
        "comfyui-finetune: failed to load nodes/train_nodes.py; its nodes are missing"
    ]


# --------------------------------------------------------------------------------------------
# Widgets derived from configs


@needs_comfy
def test_inputs_for_maps_types_limits_and_flags():
    widgets = import_pack("nodes.widgets")
    by_id = {i.id: i for i in widgets.inputs_for(TrainConfig)}
    # hidden fields and nested configs never become widgets
    assert {"output_dir", "dataset", "tokenizer_dir"}.isdisjoint(by_id)
    lr = by_id["learning_rate"].as_dict()
    # An explicit step: full fine-tune rates such as 1.5e-5 need 7 decimals in the frontend.
    assert (lr["default"], lr["min"], lr["max"], lr["step"]) == (1e-4, 0.0, 1.0, 1e-7)
    assert by_id["adam_beta2"].as_dict()["step"] == 1e-4  # 0.999 survives the frontend's rounding
    assert by_id["lr_scheduler"].as_dict()["options"] == [
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    ]  # fmt: skip
    assert by_id["lr_scheduler"].as_dict()["default"] == "cosine"
    assert by_id["gradient_accumulation"].as_dict()["advanced"] is True
    assert "advanced" not in by_id["batch_size"].as_dict()
    prompts = by_id["validation_prompts"].as_dict()
    assert (prompts["multiline"], prompts["default"]) == (True, "")
    assert by_id["resolution"].as_dict()["step"] == 64
    assert by_id["flip"].get_io_type() == "BOOLEAN"


@needs_comfy
def test_inputs_for_applies_overrides_and_refuses_typos():
    widgets = import_pack("nodes.widgets")
    (shuffle,) = widgets.inputs_for(CaptionPolicy, ["shuffle"], overrides={"shuffle": {"default": True}})
    assert shuffle.as_dict()["default"] is True
    with pytest.raises(KeyError, match="CaptionPolicy has no option 'keep_token'"):
        widgets.inputs_for(CaptionPolicy, ["keep_token"])
    with pytest.raises(KeyError, match="not among the inputs"):
        widgets.inputs_for(CaptionPolicy, ["shuffle"], overrides={"prefix": {"default": "x"}})


@needs_comfy
def test_values_to_config_names_node_and_widget():
    widgets = import_pack("nodes.widgets")
    base = CaptionPolicy(prefix="k4s4")
    policy = widgets.values_to_config(CaptionPolicy, {"keep_tokens": 2}, node="Caption Shuffle", base=base)
    assert (policy.prefix, policy.keep_tokens) == ("k4s4", 2)
    with pytest.raises(widgets.WidgetError) as info:
        widgets.values_to_config(CaptionPolicy, {"keep_tokens": 65}, node="Caption Shuffle")
    assert info.value.widget == "keep_tokens"
    assert str(info.value).startswith(
        "Caption Shuffle: widget 'keep_tokens': 65 is above the maximum 64. How many leading"
    )
    with pytest.raises(widgets.WidgetError) as info:
        widgets.values_to_config(DatasetSource, {"caption_extension": "txt"}, node="Load Dataset")
    assert (
        str(info.value)
        == "Load Dataset: widget 'caption_extension': 'txt' must start with a dot, e.g. '.txt'"
    )


# --------------------------------------------------------------------------------------------
# Dataset nodes' execute() (no server)


def _spec(*folders: str) -> DatasetSpec:
    return DatasetSpec(parts=[DatasetPart(source=DatasetSource(folder=f)) for f in folders])


@needs_comfy
def test_load_dataset_resolves_inside_the_roots_and_summarises(tmp_path, monkeypatch):
    nodes = import_pack("nodes.dataset_nodes")
    make_folder(tmp_path / "input" / "set", "3_cat", {"a": "cat, red", "b": "cat, blue"})
    monkeypatch.setattr(host, "dataset_roots", lambda: [tmp_path / "input"])
    out = nodes.LoadDataset.execute(
        folder="set", caption_extension=".txt", recursive=True, folder_name_as_caption=False,
        on_problem="stop", alpha_background="#ffffff",
    )  # fmt: skip
    spec, summary = out.args
    assert isinstance(spec, DatasetSpec)
    assert spec.parts[0].source.folder == str(tmp_path / "input" / "set")
    assert summary.splitlines()[0] == "cat: 2 images -> 6 samples per epoch"
    assert nodes.LoadDataset.validate_inputs(folder="../x").endswith(
        "contains '..'; give a path inside " + str(tmp_path / "input") + " without '..'"
    )
    assert (
        nodes.LoadDataset.validate_inputs(folder="")
        == "folder is empty: type the name of a folder inside ComfyUI's input folder"
    )
    assert nodes.LoadDataset.validate_inputs(folder="set") is True


@needs_comfy
def test_folder_fingerprint_changes_when_files_change(tmp_path):
    nodes = import_pack("nodes.dataset_nodes")
    folder = make_folder(tmp_path, "set", {"a": "x"})
    before = nodes.folder_fingerprint(folder)
    assert nodes.folder_fingerprint(folder) == before
    make_folder(tmp_path, "set/sub", {"b": "y"})
    after = nodes.folder_fingerprint(folder)
    assert after != before
    (tmp_path / "set" / "a.txt").write_text("a longer caption", encoding="utf-8")
    assert nodes.folder_fingerprint(folder) != after


@needs_comfy
def test_policy_nodes_return_new_specs_and_leave_inputs_alone():
    nodes = import_pack("nodes.dataset_nodes")
    spec = _spec("/a", "/b")
    shuffled = nodes.CaptionShuffle.execute(
        dataset=spec, shuffle=True, keep_tokens=1, keep_separator="", separator=",", split_on_period=False,
        join_separator=", ", prefix="k4s4", suffix="",
    ).args[0]  # fmt: skip
    assert [(p.policy.shuffle, p.policy.keep_tokens, p.policy.prefix) for p in shuffled.parts] == [
        (True, 1, "k4s4")
    ] * 2
    dropped = nodes.CaptionDropout.execute(
        dataset=shuffled, caption_dropout_rate=0.1, caption_dropout_every_n_epochs=0, tag_dropout_rate=0.05
    ).args[0]
    assert [
        (p.policy.caption_dropout_rate, p.policy.tag_dropout_rate, p.policy.keep_tokens)
        for p in dropped.parts
    ] == [(0.1, 0.05, 1)] * 2
    assert [p.policy for p in spec.parts] == [CaptionPolicy(), CaptionPolicy()]
    assert [p.policy.caption_dropout_rate for p in shuffled.parts] == [0.0, 0.0]


@needs_comfy
def test_repeat_multiplies_and_merge_keeps_parts_in_order():
    nodes = import_pack("nodes.dataset_nodes")
    widgets = import_pack("nodes.widgets")
    once = nodes.DatasetRepeat.execute(dataset=_spec("/a"), repeat_factor=2).args[0]
    twice = nodes.DatasetRepeat.execute(dataset=once, repeat_factor=3).args[0]
    assert (once.parts[0].repeat_factor, twice.parts[0].repeat_factor) == (2, 6)
    merged = nodes.MergeDatasets.execute(
        dataset_1=twice, dataset_2=_spec("/b", "/c"), dataset_3=None, dataset_4=_spec("/d")
    ).args[0]
    assert [p.source.folder for p in merged.parts] == ["/a", "/b", "/c", "/d"]
    assert [p.repeat_factor for p in merged.parts] == [6, 1, 1, 1]
    with pytest.raises(
        widgets.WidgetError, match="Dataset Repeat: widget 'repeat_factor': 12000 is above the maximum 10000"
    ):
        nodes.DatasetRepeat.execute(dataset=twice, repeat_factor=2000)


@needs_comfy
def test_step_plan_numbers(tmp_path):
    nodes = import_pack("nodes.dataset_nodes")
    folder = make_folder(tmp_path, "10_style", {f"img{i}": f"style, {i}" for i in range(5)})
    out = nodes.StepPlanNode.execute(
        dataset=_spec(folder), batch_size=6, gradient_accumulation=1, epochs=30, max_steps=0,
        resolution=512, buckets=True, checkpoint_every=0, validation_every=0, lr_warmup=0.1, num_processes=1,
        allow_upscale=True,  # the 16 px images would be left out as far below the 256 px buckets
    )  # fmt: skip
    summary, *numbers = out.args
    # 5 images x 10 repeats = 50 samples / batch 6 -> 9 steps per epoch; x 30 = 270; warm-up 10 % = 27
    assert numbers == [9, 270, 9, 2, 27]
    assert summary.startswith("50 samples per epoch, batch 6 -> 9 steps per epoch; 30 epoch(s) = 270 steps.")


def test_caption_draws_used_by_the_save_test_are_deterministic():
    # The real-host test predicts SaveDataset's captions with draw_caption; pin that contract here.
    policy = CaptionPolicy(shuffle=True, keep_tokens=1)
    first = draw_caption("tok, a, b, c", policy, seed=7, epoch=1, index=0)
    assert first == draw_caption("tok, a, b, c", policy, seed=7, epoch=1, index=0)
    assert first.split(", ")[0] == "tok"
    assert sorted(first.split(", ")) == ["a", "b", "c", "tok"]
