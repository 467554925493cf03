"""The checkpoint store: name parsing (ours and foreign), ordering, filtering, pruning, fingerprints."""

from __future__ import annotations

import os

import pytest

from trainer.checkpoints import (
    BASE,
    CheckpointStore,
    StepInfo,
    fingerprint,
    list_checkpoints,
    parse_step,
)


@pytest.mark.parametrize(
    "name, expected",
    [
        # ours
        ("my-lora-step00800.safetensors", StepInfo("step", 800)),
        ("my-lora-step123456.safetensors", StepInfo("step", 123456)),
        ("my-lora-step00000.safetensors", StepInfo("step", 0)),
        ("my-lora.safetensors", StepInfo("final", 0)),
        # kohya sd-scripts
        ("k4s4-step00000800.safetensors", StepInfo("step", 800)),
        ("k4s4-000004.safetensors", StepInfo("epoch", 4)),
        ("k4s4.safetensors", StepInfo("final", 0)),
        # diffusers / accelerate folders, and a file of that name
        ("checkpoint-800", StepInfo("step", 800)),
        ("checkpoint-1200.safetensors", StepInfo("step", 1200)),
        # ai-toolkit
        ("my_lora_000000250.safetensors", StepInfo("step", 250)),
        # various
        ("style_800_steps.safetensors", StepInfo("step", 800)),
        ("style-1-step.ckpt", StepInfo("step", 1)),
        ("style-e000004.safetensors", StepInfo("epoch", 4)),
        ("style_epoch4.safetensors", StepInfo("epoch", 4)),
        ("style-epoch-12.pt", StepInfo("epoch", 12)),
        ("STYLE-STEP0042.SAFETENSORS", StepInfo("step", 42)),
        ("sd1.5-step00800", StepInfo("step", 800)),
        ("/abs/dir/run-step01600.safetensors", StepInfo("step", 1600)),
        # not checkpoints
        ("run.json", None),
        ("sample-step00800.png", None),
        (".my-lora-step00800.safetensors.abc123.tmp", None),
        ("my-lora-step00800.safetensors.tmp", None),
        ("my-lora-step00800.safetensors.part", None),
        (".hidden.safetensors", None),
        ("state", None),
        ("", None),
    ],
)
def test_parse_step(name, expected):
    assert parse_step(name) == expected


def _touch(folder, *names, size=4):
    for name in names:
        p = folder / name
        if name.endswith("/"):
            p.mkdir(parents=True)
        else:
            p.write_bytes(b"x" * size)


def test_list_orders_steps_then_epochs_then_final_and_ignores_junk(tmp_path):
    _touch(
        tmp_path,
        "run.safetensors",
        "run-step10000.safetensors",
        "run-step00800.safetensors",
        "run-step01600.safetensors",
        "run-000002.safetensors",
        ".run-step02400.safetensors.x1.tmp",
        "run-step03200.safetensors.part",
        "notes.txt",
        "run.json",
        "checkpoint-2000/",
        "samples/",
    )
    got = list_checkpoints(tmp_path)
    assert [c.label for c in got] == ["step 800", "step 1600", "step 2000", "step 10000", "epoch 2", "final"]
    assert [c.step for c in got] == [800, 1600, 2000, 10000, None, None]
    assert [c.path.name for c in got] == [
        "run-step00800.safetensors",
        "run-step01600.safetensors",
        "checkpoint-2000",
        "run-step10000.safetensors",
        "run-000002.safetensors",
        "run.safetensors",
    ]


def test_list_every_k_keeps_newest_and_filters_range(tmp_path):
    _touch(tmp_path, *(f"r-step{s:05d}.safetensors" for s in range(800, 4001, 800)), "r.safetensors")
    every2 = list_checkpoints(tmp_path, every_k=2, include_base=True)
    assert [c.label for c in every2] == ["base", "step 800", "step 2400", "step 4000", "final"]
    assert every2[0] == BASE and every2[0].path is None
    ranged = list_checkpoints(tmp_path, step_min=1600, step_max=3200)
    assert [c.step for c in ranged] == [1600, 2400, 3200]  # step_max also drops the final file
    from_min = list_checkpoints(tmp_path, step_min=3000)
    assert [c.label for c in from_min] == ["step 3200", "step 4000", "final"]


def test_several_unnumbered_files_are_labelled_by_name(tmp_path):
    _touch(tmp_path, "cats.safetensors", "dogs.safetensors", "cats-step00100.safetensors")
    assert [c.label for c in list_checkpoints(tmp_path)] == ["step 100", "cats", "dogs"]


def test_list_bad_arguments_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="every_k must be 1 or more"):
        list_checkpoints(tmp_path, every_k=0)
    with pytest.raises(ValueError, match="step_min 5 is above step_max 2"):
        list_checkpoints(tmp_path, step_min=5, step_max=2)
    with pytest.raises(FileNotFoundError, match="nope"):
        list_checkpoints(tmp_path / "nope")


def test_store_paths(tmp_path):
    store = CheckpointStore(tmp_path / "my-lora", "my-lora")
    assert store.path_for(800) == tmp_path / "my-lora" / "checkpoints" / "my-lora-step00800.safetensors"
    assert store.path_for(1234567).name == "my-lora-step1234567.safetensors"
    assert store.final_path().name == "my-lora.safetensors"
    assert parse_step(store.path_for(800)) == StepInfo("step", 800)
    assert parse_step(store.final_path()) == StepInfo("final", 0)
    assert store.list() == [] and store.latest() is None
    with pytest.raises(ValueError, match="slashes"):
        CheckpointStore(tmp_path, "a/b")


def _fill(store, steps, *, final=False):
    store.dir.mkdir(parents=True, exist_ok=True)
    for s in steps:
        store.path_for(s).write_bytes(b"w")
    if final:
        store.final_path().write_bytes(b"f")


def test_store_lists_only_its_own_files_and_latest(tmp_path):
    store = CheckpointStore(tmp_path, "run")
    _fill(store, [800, 2400, 1600])
    _touch(
        store.dir, "other-step09999.safetensors", "run-000003.safetensors", ".run-step03200.safetensors.q.tmp"
    )
    assert [c.step for c in store.list()] == [800, 1600, 2400]
    assert store.latest().step == 2400
    store.final_path().write_bytes(b"f")
    assert store.latest().kind == "final"
    assert store.latest(include_final=False).step == 2400


def test_prune_keeps_newest_k_final_and_protected(tmp_path):
    store = CheckpointStore(tmp_path, "run")
    _fill(store, [800, 1600, 2400, 3200, 4000], final=True)
    _touch(store.dir, "foreign-step00100.safetensors")
    deleted = store.prune(2, protect={800})
    assert [p.name for p in deleted] == ["run-step01600.safetensors", "run-step02400.safetensors"]
    assert sorted(p.name for p in store.dir.iterdir()) == [
        "foreign-step00100.safetensors",
        "run-step00800.safetensors",
        "run-step03200.safetensors",
        "run-step04000.safetensors",
        "run.safetensors",
    ]
    assert store.prune(0) == []  # 0 keeps all
    assert store.prune(5) == []
    assert [p.name for p in store.prune(1)] == ["run-step00800.safetensors", "run-step03200.safetensors"]
    assert [c.label for c in store.list()] == ["step 4000", "final"]
    with pytest.raises(ValueError, match="keep must be 0"):
        store.prune(-1)


def test_fingerprint_changes_with_new_or_rewritten_checkpoint(tmp_path):
    _touch(tmp_path, "r-step00800.safetensors")
    first = fingerprint(tmp_path)
    assert fingerprint(tmp_path) == first
    _touch(tmp_path, ".r-step01600.safetensors.tmp")  # a write in progress changes nothing yet
    assert fingerprint(tmp_path) == first
    _touch(tmp_path, "r-step01600.safetensors")
    second = fingerprint(tmp_path)
    assert second != first
    p = tmp_path / "r-step01600.safetensors"
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert fingerprint(tmp_path) not in (first, second)
    assert fingerprint(tmp_path / "missing") != fingerprint(tmp_path / "missing2")
    assert len(first) == 16


def test_checkpoint_method_reads_only_the_header(tmp_path):
    import torch
    from safetensors.torch import save_file

    from trainer.checkpoints import checkpoint_method, read_safetensors_header

    w = torch.zeros(2, 2)
    save_file(
        {
            "lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": w,
            "lora_unet_down_blocks_0_attn1_to_q.alpha": torch.tensor(1.0),
        },
        tmp_path / "kohya.safetensors",
    )
    save_file({"transformer.blocks.0.attn.to_q.lora_A.weight": w}, tmp_path / "peft.safetensors")
    save_file({"x": w}, tmp_path / "meta.safetensors", metadata={"ss_network_module": "networks.lora"})
    save_file({"input_blocks.0.0.weight": w, "out.2.bias": torch.zeros(2)}, tmp_path / "full.safetensors")
    assert [checkpoint_method(tmp_path / f"{n}.safetensors") for n in ("kohya", "peft", "meta", "full")] == [
        "lora",
        "lora",
        "lora",
        "full",
    ]
    keys, meta = read_safetensors_header(tmp_path / "meta.safetensors")
    assert keys == ["x"] and meta == {"ss_network_module": "networks.lora"}
    (tmp_path / "torn.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match="torn.safetensors' is not a readable .safetensors file"):
        checkpoint_method(tmp_path / "torn.safetensors")
    with pytest.raises(ValueError, match="only .safetensors files can be inspected"):
        checkpoint_method(tmp_path / "old.ckpt")
