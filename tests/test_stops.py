"""Stops that keep every step (issue 18): Ctrl-C and SIGTERM in the CLI save where they stop;
resumes without a checkpoint, after a kill while loading and with changed settings; stale
temporaries; write failures in one sentence; ``plan`` tells what ``train`` tells. The same for
runs of the run manager (ComfyUI's path) where its code differs."""

from __future__ import annotations

import errno
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_images, spec_for, tiny_config

from trainer.cli import _StopOnSignal, main
from trainer.config import Arch, DatasetPart, DatasetSource, DatasetSpec, TrainConfig
from trainer.engine.events import Commands
from trainer.options import ConfigError, to_dict
from trainer.runfolder import RunFolder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny SD1.5 as a single file plus its configs (what a CLI run loads)."""
    from trainer.models.tiny import TINY_TOKENIZER_DIR, save_tiny_checkpoint, tiny_bundle

    root = tmp_path_factory.mktemp("model")
    bundle = tiny_bundle(Arch.SD15, seed=0)
    return {
        "base_model": save_tiny_checkpoint(bundle, root / "tiny.safetensors", single_file=True),
        "config_dir": save_tiny_checkpoint(bundle, root / "tiny-diffusers", single_file=False),
        "tokenizer_dir": str(TINY_TOKENIZER_DIR),
    }


def write_config(tmp_path: Path, tiny_model: dict, *, out: str = "out", **values) -> Path:
    data = tmp_path / "data"
    if not data.exists():
        make_images(data, [(64, 64), (64, 64)])
    config = {
        "run_name": "cli",
        "output_dir": str(tmp_path / out),
        "arch": "sd15",
        **tiny_model,
        "dataset": to_dict(spec_for(data)),
        "resolution": 64,
        "min_bucket_resolution": 64,
        "max_bucket_resolution": 128,
        "batch_size": 1,
        "epochs": 5,  # 2 images: 10 steps
        "checkpoint_every": 100,  # no cadence checkpoint: only a stop and the end save
        "mixed_precision": "fp32",
        "lora_rank": 2,
        "lora_alpha": 2.0,
        "learning_rate": 1e-3,
        "lr_warmup": 0.0,
        "seed": 7,
        **values,
    }
    path = tmp_path / f"{out}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def train_cli(*args: str) -> int:
    return main(["train", *args, "--device", "cpu", "--quiet"])


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# A CLI run in its own process, with steps slowed so a signal lands mid-run (the loop is real).
# One torch thread, as in this process (conftest): the weights are compared bit for bit.
_SLOW_CLI = """
import sys, time
import torch
torch.set_num_threads(1)
from trainer.engine import loop
real = loop.batch_loss
def slow(*args, **kwargs):
    time.sleep(0.15)
    return real(*args, **kwargs)
loop.batch_loss = slow
from trainer.cli import main
sys.exit(main(["train", sys.argv[1], "--device", "cpu", "--quiet"]))
"""


def _run_and_signal(config: Path, run_dir: Path, sig: int) -> tuple[subprocess.CompletedProcess, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CLI, str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), len(steps_logged(run_dir))


@pytest.mark.parametrize("sig, name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_a_signal_stops_the_cli_after_its_step_saves_there_and_resumes_to_the_same_weights(
    tmp_path, tiny_model, sig, name
):
    config = write_config(tmp_path, tiny_model)
    run_dir = tmp_path / "out" / "finetune" / "cli"
    proc, _ = _run_and_signal(config, run_dir, sig)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = json.loads((run_dir / "run.json").read_text())["status"]
    step = status["step"]
    assert 3 <= step < 10
    assert (status["state"], status["message"]) == (
        "stopped",
        f"stopped by {name} at step {step}; resume to continue",
    )
    assert f"stopped at step {step}: stopped by {name} at step {step}; resume to continue" in proc.stdout
    assert f"{name}: stopping after the current step and saving there" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"cli-step{step:05d}.safetensors"]
    assert [p.name for p in (run_dir / "state").iterdir()] == [f"step-{step:05d}"]
    assert steps_logged(run_dir) == list(range(1, step + 1))

    # Resuming from run.json ends with the weights of a run never stopped.
    assert train_cli(str(run_dir / "run.json"), "--resume") == 0
    assert steps_logged(run_dir) == list(range(1, 11))
    assert train_cli(str(write_config(tmp_path, tiny_model, out="ref"))) == 0
    ref = tmp_path / "ref" / "finetune" / "cli" / "checkpoints" / "cli-step00010.safetensors"
    resumed = tensors(run_dir / "checkpoints" / "cli-step00010.safetensors")
    expected = tensors(ref)
    assert resumed.keys() == expected.keys() and len(expected) > 0
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


def test_a_second_ctrl_c_quits_without_saving():
    commands, said = Commands(), []
    handler = _StopOnSignal(commands, said.append)
    handler._handle(signal.SIGINT, None)
    assert commands.stop_requested and commands.stop_reason == "stopped by Ctrl-C"
    assert said == [
        "Ctrl-C: stopping after the current step and saving there; press Ctrl-C again to quit without saving"
    ]
    handler._handle(signal.SIGTERM, None)  # a repeated SIGTERM lets the save finish
    with pytest.raises(KeyboardInterrupt):
        handler._handle(signal.SIGINT, None)


_KILLED_WHILE_LOADING = """
import os, signal, sys
from trainer.engine import loop
loop.load_model = lambda config: os.kill(os.getpid(), signal.SIGKILL)
from trainer.cli import main
main(["train", sys.argv[1], "--device", "cpu", "--quiet"])
"""


def test_a_kill_while_the_model_loads_still_resumes_from_run_json(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, epochs=1)
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WHILE_LOADING, str(config)], cwd=ROOT, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL
    run_dir = tmp_path / "out" / "finetune" / "cli"
    run = json.loads((run_dir / "run.json").read_text())
    assert (run["status"]["state"], run["status"]["message"]) == ("running", "loading the model")
    assert run["config"] == to_dict(TrainConfig.load(config))
    assert train_cli(str(run_dir / "run.json"), "--resume") == 0
    assert json.loads((run_dir / "run.json").read_text())["status"]["state"] == "finished"


def test_a_run_json_without_its_config_says_what_to_do(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"status": {"state": "running"}, "updated_at": 1.0}), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        TrainConfig.load(path)
    assert str(info.value) == (
        f"config: {path} is a run.json without its config (the run was killed before it started "
        "training); train again from the config file you started it with"
    )


# The engine in-process: a dead attempt before the first checkpoint, stale temporaries ----------


def _stale_temporaries(folder: RunFolder) -> dict[str, bool]:
    """Leave what killed writes leave (True: must go) and user files that look alike (False: stay)."""
    name = folder.name
    files = {
        "checkpoints/.tmpAb3dE9": True,  # safetensors' own writer
        f"checkpoints/.{name}-step00002.safetensors.4242-deadbeef.tmp": True,  # save_lora
        f"checkpoints/.{name}-step00002.safetensors.tmp-4242": True,  # full checkpoints
        f"checkpoints/text_encoders/.{name}-step00002-te1.safetensors.tmp": True,
        "state/.tmp-step-00002/.tmpQw7rT2": True,
        "state/.tmpZz9yX1": True,
        ".run.json.k2j3h4.tmp": True,
        ".metrics.jsonl.a1b2c3.tmp": True,
        "checkpoints/.someone-else.safetensors.1-2.tmp": False,
        "checkpoints/notes.tmp": False,
        "state/readme.txt": False,
    }
    for rel in files:
        path = folder.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    return files


def _leftovers(folder: RunFolder, files: dict[str, bool]) -> list[str]:
    return sorted(rel for rel in files if (folder.path / rel).exists())


def _die_at_step(monkeypatch, step: int, error: BaseException):
    from trainer.engine import loop

    real, calls = loop.batch_loss, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "batch_loss", dying)


def _tiny_loader(config):
    from trainer.models.tiny import tiny_bundle

    return tiny_bundle(Arch.SD15, seed=0)


def test_a_resume_without_a_checkpoint_logs_each_step_once_and_cleans_temporaries(tmp_path, monkeypatch):
    from trainer.engine.loop import train

    data = make_images(tmp_path / "data", [(64, 64), (64, 64)])
    config = tiny_config(tmp_path, data, epochs=3, checkpoint_every=100)
    _die_at_step(monkeypatch, 4, KeyboardInterrupt())  # a kill before the first checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(config, model_loader=_tiny_loader, device="cpu")
    monkeypatch.undo()
    folder = RunFolder.for_run(config.output_dir, config.run_name)
    assert steps_logged(folder.path) == [1, 2, 3]
    files = _stale_temporaries(folder)

    result = train(config, model_loader=_tiny_loader, device="cpu", resume=True)
    assert (result.state.value, result.step) == ("finished", 6)
    assert steps_logged(folder.path) == [1, 2, 3, 4, 5, 6]
    assert _leftovers(folder, files) == [
        "checkpoints/.someone-else.safetensors.1-2.tmp",
        "checkpoints/notes.tmp",
        "state/readme.txt",
    ]


# Changed settings on resume -------------------------------------------------------------------


def test_a_resume_with_changed_settings_is_refused_and_leaves_run_json_as_it_was(
    tmp_path, tiny_model, capsys, caplog
):
    config = write_config(tmp_path, tiny_model, epochs=1, checkpoint_every=1)
    assert train_cli(str(config)) == 0
    run_json = tmp_path / "out" / "finetune" / "cli" / "run.json"
    before = run_json.read_bytes()
    capsys.readouterr()

    assert train_cli(str(run_json), "--resume", "--set", "lora_rank=4", "--set", "seed=8") == 1
    out = capsys.readouterr().out
    assert (
        "failed at step 0: run 'cli' cannot resume with changed settings (lora_rank 2 -> 4; seed 7 -> 8): "
        "they change what the run learns from its saved state. Resume with the recorded settings "
        "(train <run>/run.json --resume), or choose another run_name to train with the new ones."
    ) in out
    assert run_json.read_bytes() == before

    # A setting that does not change what the run learns is accepted, with a warning naming it.
    with caplog.at_level(logging.WARNING, logger="finetune"):
        assert train_cli(str(run_json), "--resume", "--set", "keep_checkpoints=1") == 0
    assert (
        "finetune: run cli resumes with changed settings that do not change what it learns: "
        "keep_checkpoints 0 -> 1"
    ) in [r.getMessage() for r in caplog.records]
    assert json.loads(run_json.read_text())["config"]["lora_rank"] == 2


# Write failures --------------------------------------------------------------------------------


def _no_traceback(capsys, caplog) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert not [r for r in caplog.records if r.exc_info]
    return captured.out


def test_disk_full_and_a_read_only_folder_end_in_one_sentence(
    tmp_path, tiny_model, capsys, caplog, monkeypatch
):
    from safetensors import SafetensorError

    from trainer.lora import io as lora_io

    real, calls = lora_io.save_file, {"n": 0}

    def full(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # what safetensors' writer raises on a full disk
            raise SafetensorError(
                f'Error while serializing: I/O error: No space left on device (os error 28) at path "{path}"'
            )
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(lora_io, "save_file", full)
    config = write_config(tmp_path, tiny_model, epochs=1, checkpoint_every=1)
    assert train_cli(str(config)) == 1
    ckpt = tmp_path / "out" / "finetune" / "cli" / "checkpoints"
    out = _no_traceback(capsys, caplog)
    assert (
        f"failed at step 2: disk full while writing {ckpt / 'cli-step00002.safetensors'}; "
        "free some space, then resume the run"
    ) in out
    assert sorted(p.name for p in ckpt.iterdir()) == ["cli-step00001.safetensors"]

    from trainer.engine import saving

    def read_only(path, tensors, metadata=None):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(saving, "save_lora", read_only)
    config = write_config(tmp_path, tiny_model, out="ro", epochs=1, checkpoint_every=1)
    assert train_cli(str(config)) == 1
    ckpt = tmp_path / "ro" / "finetune" / "cli" / "checkpoints"
    assert (
        f"failed at step 1: cannot write {ckpt / 'cli-step00001.safetensors'}: the output folder is "
        "read-only or not yours (Read-only file system); choose a writable output_dir or fix the "
        "folder's permissions, then resume the run"
    ) in _no_traceback(capsys, caplog)

    # A file where the runs folder should be (what a root user meets instead of permissions).
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "finetune").write_text("not a folder", encoding="utf-8")
    config = write_config(tmp_path, tiny_model, out="blocked")
    assert train_cli(str(config)) == 1
    assert (
        f"failed at step 0: cannot write {tmp_path / 'blocked' / 'finetune' / 'cli'}: a file stands where "
        "a folder of this path should be; move that file away or choose another output_dir, then resume the run"
    ) in _no_traceback(capsys, caplog)


# plan tells what train tells -------------------------------------------------------------------


@pytest.mark.parametrize("base", ["model.ckpt", "missing.safetensors"])
def test_plan_on_a_pickle_or_missing_base_model_says_what_train_says(tmp_path, tiny_model, capsys, base):
    if base.endswith(".ckpt"):
        (tmp_path / base).write_bytes(b"pickle")
    config = write_config(tmp_path, tiny_model, arch="auto", base_model=str(tmp_path / base))
    assert main(["plan", str(config)]) == 1
    planned = capsys.readouterr().err.strip().removeprefix("error: ")
    assert train_cli(str(config)) == 1
    trained = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("failed at step 0: ")
    assert planned == trained
    expected = "refusing to load pickle file" if base.endswith(".ckpt") else "model file not found"
    assert planned.startswith(expected) and str(tmp_path / base) in planned


def test_plan_lists_cut_and_tiny_images_as_train_scans_them(tmp_path, tiny_model, capsys):
    from test_dataset_scan import write_cut_jpeg

    data = tmp_path / "data"
    make_images(data, [(64, 64), (64, 64)])
    write_cut_jpeg(data / "1_things" / "cut.jpg")
    (data / "1_things" / "cut.txt").write_text("a cut photo", encoding="utf-8")
    make_images(tmp_path / "dot", [(1, 1)])
    (data / "1_things" / "dot.png").write_bytes((tmp_path / "dot" / "1_things" / "img0.png").read_bytes())
    (data / "1_things" / "dot.txt").write_text("a dot", encoding="utf-8")

    config = write_config(tmp_path, tiny_model)
    assert main(["plan", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the dataset has 2 problem file(s):")
    assert "dot.png: image too small (1x1 px, far below the smallest bucket side of 64 px)" in err

    spec = DatasetSpec(parts=[DatasetPart(source=DatasetSource(folder=str(data), on_problem="skip"))])
    config = write_config(tmp_path, tiny_model, dataset=to_dict(spec))
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "dataset: 2 images, 2 samples per epoch" in out
    left_out = [line for line in out if line.startswith("  left out: ")]
    assert [Path(line.split(": ")[1]).name for line in left_out] == ["cut.jpg", "dot.png"]
    assert left_out[0].startswith(f"  left out: {data / '1_things' / 'cut.jpg'}: unreadable image (")
    assert left_out[1] == (
        f"  left out: {data / '1_things' / 'dot.png'}: image too small "
        "(1x1 px, far below the smallest bucket side of 64 px)"
    )
    config = write_config(tmp_path, tiny_model, dataset=to_dict(spec), allow_upscale=True)
    assert main(["plan", str(config)]) == 0
    assert "dataset: 3 images, 3 samples per epoch" in capsys.readouterr().out


# The run manager (ComfyUI's path) --------------------------------------------------------------


@pytest.fixture
def manager(tmp_path):
    from trainer.engine.loop import train
    from trainer.runs import RunManager

    def train_tiny(config, **kwargs):
        return train(config, model_loader=_tiny_loader, **kwargs)

    m = RunManager(tmp_path / "out", train_fn=train_tiny, devices=("cpu",))
    yield m
    m.shutdown(timeout=30)


def test_the_run_manager_resumes_from_scratch_cleanly_and_refuses_changed_settings(
    manager, tmp_path, monkeypatch
):
    import dataclasses

    from trainer.runs import RunStateError

    data = make_images(tmp_path / "data", [(64, 64), (64, 64)])
    config = tiny_config(tmp_path, data, run_name="comfy", epochs=3, checkpoint_every=4)
    _die_at_step(monkeypatch, 3, torch.OutOfMemoryError("CUDA out of memory."))
    manager.submit(config)
    assert manager.wait("comfy", timeout=120).state == "failed"
    monkeypatch.undo()
    folder = RunFolder(manager.runs_root / "comfy")
    assert steps_logged(folder.path) == [1, 2]
    files = _stale_temporaries(folder)

    manager.resume("comfy")  # no checkpoint yet: from step 0
    done = manager.wait("comfy", timeout=120)
    assert (done.state, done.step) == ("finished", 6)
    assert steps_logged(folder.path) == [1, 2, 3, 4, 5, 6]
    assert _leftovers(folder, files) == [
        "checkpoints/.someone-else.safetensors.1-2.tmp",
        "checkpoints/notes.tmp",
        "state/readme.txt",
    ]

    before = folder.run_json.read_bytes()
    with pytest.raises(RunStateError) as info:
        manager.submit(dataclasses.replace(config, lora_rank=8), resume=True)
    assert str(info.value).startswith("run 'comfy' cannot resume with changed settings (lora_rank 4 -> 8)")
    assert folder.run_json.read_bytes() == before


def test_training_refuses_or_leaves_out_cut_and_tiny_images_before_step_one(tmp_path, caplog):
    from test_dataset_scan import write_cut_jpeg

    from trainer.engine.loop import train

    data = make_images(tmp_path / "data", [(64, 64), (64, 64), (1, 1)])  # img2 is 1x1
    write_cut_jpeg(data / "1_things" / "cut.jpg")
    (data / "1_things" / "cut.txt").write_text("a cut photo", encoding="utf-8")
    config = tiny_config(tmp_path, data, run_name="stop", max_steps=2)
    result = train(config, model_loader=_tiny_loader, device="cpu")
    assert (result.state.value, result.step) == ("failed", 0)
    assert result.message.startswith("the dataset has 2 problem file(s):")
    assert "img2.png: image too small (1x1 px, far below the smallest bucket side of 64 px)" in result.message
    assert not (tmp_path / "out" / "finetune" / "stop" / "metrics.jsonl").exists()

    skip = DatasetSpec(parts=[DatasetPart(source=DatasetSource(folder=str(data), on_problem="skip"))])
    config = tiny_config(tmp_path, data, run_name="skip", max_steps=2, dataset=skip)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        result = train(config, model_loader=_tiny_loader, device="cpu")
    assert (result.state.value, result.step) == ("finished", 2)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dataset: leaving out")]
    assert [Path(m.split("leaving out ")[1].split(":")[0]).name for m in said] == ["cut.jpg", "img2.png"]
    run = json.loads((tmp_path / "out" / "finetune" / "skip" / "run.json").read_text())
    assert run["plan"]["steps_per_epoch"] == 2  # the two good images
