"""The dataset nodes inside a real ComfyUI: loading, /object_info, and graphs queued through /prompt.

Run: ``COMFYUI_PATH=/path/to/ComfyUI <its python> -m pytest -q tests/test_comfy_dataset_nodes.py``.
Skipped without ``COMFYUI_PATH``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from comfy_server import ComfyClient, ComfyError, comfy_fixture, pack_load_errors  # noqa: F401  (the `comfy` fixture)
from PIL import Image

from trainer.config import CaptionPolicy
from trainer.data.captions import draw_caption

pytestmark = pytest.mark.comfyui

DATASET_INPUTS = {
    "FinetuneLoadDataset": ["folder", "caption_extension", "recursive", "folder_name_as_caption", "on_problem", "alpha_background"],
    "FinetuneCaptionShuffle": [
        "dataset", "shuffle", "keep_tokens", "keep_separator", "separator", "split_on_period", "join_separator", "prefix", "suffix",
    ],
    "FinetuneCaptionDropout": ["dataset", "caption_dropout_rate", "caption_dropout_every_n_epochs", "tag_dropout_rate"],
    "FinetuneDatasetRepeat": ["dataset", "repeat_factor"],
    "FinetuneMergeDatasets": ["dataset_1", "dataset_2", "dataset_3", "dataset_4", "dataset_5", "dataset_6"],
    "FinetuneDatasetPreview": [
        "dataset", "epoch", "seed", "count", "columns", "tile_size", "batch_size", "gradient_accumulation", "epochs", "max_steps", "resolution", "buckets",
        "min_bucket_resolution", "max_bucket_resolution", "allow_upscale",
    ],
    "FinetuneStepPlan": [
        "dataset", "batch_size", "gradient_accumulation", "epochs", "max_steps", "resolution", "buckets", "checkpoint_every", "validation_every",
        "lr_warmup", "num_processes", "arch", "method", "lora_rank", "memory_mode", "min_bucket_resolution",
        "max_bucket_resolution", "allow_upscale",
    ],
    "FinetuneSaveDataset": ["dataset", "folder", "seed", "overwrite"],
}  # fmt: skip

CAPTIONS = {"apple": "tok, red, round, sweet", "sky": "tok, blue, wide, calm"}
COLOURS = {"apple": (220, 20, 20), "sky": (20, 40, 230)}


def _write_dataset(root: Path) -> Path:
    """``root/2_fruit/{apple,sky}.png`` (64 px, solid colours) with comma-tag captions."""
    folder = root / "2_fruit"
    folder.mkdir(parents=True, exist_ok=True)
    for stem, caption in CAPTIONS.items():
        Image.new("RGB", (64, 64), COLOURS[stem]).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return root


def _load(folder: str, *, on_problem: str = "stop") -> dict:
    return {
        "class_type": "FinetuneLoadDataset",
        "inputs": {
            "folder": folder, "caption_extension": ".txt", "recursive": True, "folder_name_as_caption": False,
            "on_problem": on_problem, "alpha_background": "#ffffff",
        },
    }  # fmt: skip


def _shuffle(source: str, *, keep_tokens: int) -> dict:
    return {
        "class_type": "FinetuneCaptionShuffle",
        "inputs": {
            "dataset": [source, 0], "shuffle": True, "keep_tokens": keep_tokens, "keep_separator": "", "separator": ",",
            "split_on_period": False, "join_separator": ", ", "prefix": "", "suffix": "",
        },
    }  # fmt: skip


def _preview(source: str) -> dict:
    return {
        "class_type": "FinetuneDatasetPreview",
        "inputs": {
            "dataset": [source, 0], "epoch": 1, "seed": 1, "count": 4, "columns": 2, "tile_size": 32,
            "batch_size": 2, "gradient_accumulation": 1, "epochs": 3, "max_steps": 0, "resolution": 512, "buckets": True,
        },
    }  # fmt: skip


def test_pack_loads_without_import_errors(comfy: ComfyClient):
    log = comfy.log_path.read_text(encoding="utf-8", errors="replace")
    assert pack_load_errors(log) == []
    loaded = [line for line in log.splitlines() if "seconds" in line and "comfyui-finetune" in line]
    assert len(loaded) == 1 and "IMPORT FAILED" not in loaded[0], loaded


def test_object_info_lists_the_dataset_nodes_with_their_inputs(comfy: ComfyClient):
    info = comfy.object_info()
    for node_id, inputs in DATASET_INPUTS.items():
        entry = info[node_id]
        assert entry["category"] == "finetune/dataset"
        order = entry["input_order"]
        assert order["required"] + order.get("optional", []) == inputs, node_id
    assert info["FinetuneLoadDataset"]["output"] == ["FT_DATASET", "STRING"]
    assert info["FinetuneStepPlan"]["output"] == ["STRING", "INT", "INT", "INT", "INT", "INT"]
    assert info["FinetuneStepPlan"]["output_name"] == [
        "summary", "steps_per_epoch", "total_steps", "checkpoint_every", "validation_every", "warmup_steps",
    ]  # fmt: skip
    assert info["FinetuneMergeDatasets"]["input_order"]["optional"] == [
        "dataset_3",
        "dataset_4",
        "dataset_5",
        "dataset_6",
    ]
    assert info["FinetuneSaveDataset"]["output_node"] is True
    assert info["FinetuneDatasetPreview"]["output_node"] is True
    on_problem = info["FinetuneLoadDataset"]["input"]["required"]["on_problem"]
    assert on_problem[1]["options"] == ["stop", "skip"] and on_problem[1]["default"] == "stop"


def test_load_shuffle_repeat_save_writes_every_copy_with_its_own_caption(comfy: ComfyClient):
    _write_dataset(comfy.input_dir / "fruit_set")
    prompt = {
        "1": _load("fruit_set"),
        "2": _shuffle("1", keep_tokens=1),
        "3": {"class_type": "FinetuneDatasetRepeat", "inputs": {"dataset": ["2", 0], "repeat_factor": 2}},
        "4": {
            "class_type": "FinetuneSaveDataset",
            "inputs": {"dataset": ["3", 0], "folder": "saved/fruit", "seed": 7, "overwrite": False},
        },
    }
    history = comfy.run(prompt)
    out_dir = comfy.output_dir / "saved" / "fruit"
    # 2 images x (kohya 2 x repeat 2) = 8 copies; repeats are baked in, hence "1_fruit"
    assert history["outputs"]["4"]["text"] == [f"wrote 8 images and 8 captions to {out_dir}"]
    written = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    assert written == sorted(
        f"1_fruit/{stem}_{k}.{ext}" for stem in CAPTIONS for k in range(1, 5) for ext in ("png", "txt")
    )
    policy = CaptionPolicy(shuffle=True, keep_tokens=1)
    for index, stem in enumerate(sorted(CAPTIONS)):  # scan order: files sorted by name
        drawn = []
        for k in range(1, 5):
            caption = (out_dir / "1_fruit" / f"{stem}_{k}.txt").read_text(encoding="utf-8")
            assert caption == draw_caption(CAPTIONS[stem], policy, seed=7, epoch=k, index=index)
            assert caption.split(", ")[0] == "tok"
            assert sorted(caption.split(", ")) == sorted(CAPTIONS[stem].split(", "))
            drawn.append(caption)
            with Image.open(out_dir / "1_fruit" / f"{stem}_{k}.png") as img:
                assert img.convert("RGB").getpixel((16, 16)) == COLOURS[stem]
        assert len(set(drawn)) > 1, f"all copies of {stem} got the same caption: {drawn}"


def test_preview_shows_a_grid_and_the_plan_and_reruns_when_the_folder_changes(comfy: ComfyClient):
    root = _write_dataset(comfy.input_dir / "preview_set")
    prompt = {"1": _load("preview_set"), "2": _shuffle("1", keep_tokens=1), "3": _preview("2")}
    first = comfy.run(prompt)["outputs"]["3"]
    assert len(first["images"]) == 1 and first["images"][0]["type"] == "temp"
    # 2 images x 2 repeats = 4 samples / batch 2 -> 2 steps per epoch, 3 epochs
    assert first["text"][0].startswith(
        "4 samples per epoch, batch 2 -> 2 steps per epoch; 3 epoch(s) = 6 steps."
    )
    assert "No problems: 2 images, 4 samples per epoch." in first["text"][0]
    Image.new("RGB", (64, 64), (0, 200, 0)).save(root / "2_fruit" / "leaf.png")
    (root / "2_fruit" / "leaf.txt").write_text("tok, green", encoding="utf-8")
    second = comfy.run(prompt)["outputs"]["3"]  # the same prompt: only the folder's fingerprint changed
    assert second["text"][0].startswith(
        "6 samples per epoch, batch 2 -> 3 steps per epoch; 3 epoch(s) = 9 steps."
    )


def test_bad_folders_are_refused_before_execution_with_the_value_named(comfy: ComfyClient):
    with pytest.raises(ComfyError) as info:
        comfy.queue({"1": _load("../outside"), "2": _preview("1")})
    assert "folder: '../outside' contains '..'" in str(info.value)
    with pytest.raises(ComfyError) as info:
        comfy.queue({"1": _load(""), "2": _preview("1")})
    assert "folder is empty" in str(info.value)


def test_dataset_problems_fail_the_load_node_with_every_bad_file(comfy: ComfyClient):
    folder = _write_dataset(comfy.input_dir / "broken_set") / "2_fruit"
    (folder / "apple.txt").unlink()
    (folder / "empty.png").write_bytes(b"")
    with pytest.raises(ComfyError) as info:
        comfy.run({"1": _load("broken_set"), "2": _preview("1")})
    message = str(info.value)
    assert "node 1 (FinetuneLoadDataset) failed:" in message
    assert "the dataset has 3 problem file(s):" in message
    assert f"  - {folder / 'apple.png'}: missing caption (expected apple.txt)" in message
    assert f"  - {folder / 'empty.png'}: zero-byte file" in message
    assert f"  - {folder / 'empty.png'}: missing caption (expected empty.txt)" in message


def test_preview_and_step_plan_leave_out_tiny_images_as_the_trainer_does(comfy: ComfyClient):
    """A 1x1 image is far below the smallest bucket (256 px at 512): the trainer leaves it out
    under on_problem=skip, so the preview and the plan count without it, and say so; with
    allow_upscale on it is trained enlarged and counted."""
    folder = _write_dataset(comfy.input_dir / "tiny_set") / "2_fruit"
    Image.new("RGB", (1, 1), (0, 0, 0)).save(folder / "dot.png")
    (folder / "dot.txt").write_text("tok, dot", encoding="utf-8")
    plan = {
        "class_type": "FinetuneStepPlan",
        "inputs": {
            "dataset": ["1", 0], "batch_size": 2, "gradient_accumulation": 1, "epochs": 3, "max_steps": 0,
            "resolution": 512, "buckets": True, "checkpoint_every": 0, "validation_every": 0, "lr_warmup": 0,
            "num_processes": 1, "arch": "sd15", "method": "lora", "lora_rank": 16, "memory_mode": "auto",
        },
    }  # fmt: skip
    shown = {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}  # Step Plan is no output node
    prompt = {"1": _load("tiny_set", on_problem="skip"), "2": _preview("1"), "3": plan, "4": shown}
    outputs = comfy.run(prompt)["outputs"]
    report = outputs["2"]["text"][0]
    assert report.startswith("4 samples per epoch, batch 2 -> 2 steps per epoch; 3 epoch(s) = 6 steps.")
    assert "1 file(s) left out (on_problem is 'skip'):" in report
    assert (
        f"  - {folder / 'dot.png'}: image too small (1x1 px, far below the smallest bucket side of 256 px); "
        "use a larger image, or turn on allow_upscale" in report
    )
    assert outputs["4"]["text"][0].startswith("4 samples per epoch, batch 2 -> 2 steps per epoch")

    for node in ("2", "3"):
        prompt[node]["inputs"]["allow_upscale"] = True
    outputs = comfy.run(prompt)["outputs"]
    for node in ("2", "4"):
        assert outputs[node]["text"][0].startswith("6 samples per epoch, batch 2 -> 3 steps per epoch"), node
    assert "No problems: 3 images, 6 samples per epoch." in outputs["2"]["text"][0]

    with pytest.raises(ComfyError) as info:  # on_problem=stop: refused, naming the file
        comfy.run({"1": _load("tiny_set"), "2": _preview("1")})
    assert f"{folder / 'dot.png'}: image too small" in str(info.value)
