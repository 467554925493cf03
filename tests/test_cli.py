"""The command line: plan numbers, overrides, a real train run from a checkpoint file, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import make_images, spec_for

from trainer.cli import load_config, main, parse_override
from trainer.config import Arch
from trainer.options import ConfigError, to_dict

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, data: Path, **values) -> Path:
    config = {
        "run_name": "cli",
        "output_dir": str(tmp_path / "out"),
        "arch": "sd15",
        "resolution": 128,
        "min_bucket_resolution": 64,
        "max_bucket_resolution": 256,
        "batch_size": 2,
        "epochs": 3,
        "dataset": to_dict(spec_for(data)),
        **values,
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path):
    # 3 squares x 2 repeats = 6 draws in 64x64; 1 wide x 2 repeats = 2 draws in 128x64.
    return make_images(tmp_path / "data", [(64, 64), (64, 64), (64, 64), (128, 64)], repeats=2)


def test_plan_prints_the_buckets_and_step_counts(tmp_path, data, capsys):
    path = write_config(tmp_path, data)
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "model: sd15 at 128 px" in out
    assert "dataset: 4 images, 8 samples per epoch" in out
    assert out[out.index("buckets (samples per epoch):") + 1 :][:2] == ["  64x64: 6", "  128x64: 2"]
    # 6 squares / batch 2 = 3 batches, 2 wide = 1 batch: 4 steps an epoch, 12 over 3 epochs.
    assert "steps_per_epoch: 4" in out
    assert "total_steps: 12" in out
    assert "checkpoint_every: 4" in out
    assert "validation_every: 1" in out
    assert "warmup_steps: 1" in out


def test_plan_json_with_overrides(tmp_path, data, capsys):
    path = write_config(tmp_path, data)
    assert (
        main(
            [
                "plan",
                str(path),
                "--json",
                "--set",
                "batch_size=1",
                "--set",
                "epochs=2",
                "--num-processes",
                "2",
            ]
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert info["buckets"] == {"128x64": 2, "64x64": 6}
    assert info["plan"]["micro_batches_per_epoch"] == 4  # ceil(6/2) + ceil(2/2) global batches
    assert info["plan"]["total_steps"] == 8


def test_overrides_parse_json_reach_nested_options_and_name_bad_keys(tmp_path, data, capsys):
    assert parse_override("a.b=1e-4") == (["a", "b"], 1e-4)
    assert parse_override('validation_prompts=["a cat"]') == (["validation_prompts"], ["a cat"])
    assert parse_override("run_name=my run") == (["run_name"], "my run")
    path = write_config(tmp_path, data)
    config = load_config(path, ["learning_rate=5e-5", "method=full", "dataset.parts=[]"])
    assert (config.learning_rate, config.method.value, config.dataset.parts) == (5e-5, "full", [])
    with pytest.raises(ConfigError, match="--set: 'oops' is not key=value"):
        load_config(path, ["oops"])
    assert main(["plan", str(path), "--set", "learning_rat=1"]) == 1
    assert "learning_rat: unknown option; did you mean 'learning_rate'?" in capsys.readouterr().err


def test_train_from_a_single_file_checkpoint(tmp_path, capsys):
    from trainer.models.tiny import TINY_TOKENIZER_DIR, save_tiny_checkpoint, tiny_bundle

    bundle = tiny_bundle(Arch.SD15, seed=0)
    ckpt = save_tiny_checkpoint(bundle, tmp_path / "tiny.safetensors", single_file=True)
    configs = save_tiny_checkpoint(bundle, tmp_path / "tiny-diffusers", single_file=False)
    data = make_images(tmp_path / "data", [(64, 64)])
    path = write_config(
        tmp_path,
        data,
        base_model=ckpt,
        config_dir=configs,
        tokenizer_dir=str(TINY_TOKENIZER_DIR),
        resolution=64,
        batch_size=1,
        max_steps=2,
        mixed_precision="fp32",
        lora_rank=2,
        lora_alpha=2.0,
    )
    assert main(["train", str(path), "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "out" / "finetune" / "cli"
    assert f"run folder: {run_dir}" in out
    assert f"last checkpoint: {run_dir / 'checkpoints' / 'cli-step00002.safetensors'}" in out
    assert "finished at step 2: finished 2 steps" in out
    # Training again without --resume is refused; with --resume it finds nothing left to do.
    assert main(["train", str(path), "--device", "cpu", "--quiet"]) == 1
    assert "already has checkpoints" in capsys.readouterr().out
    assert main(["train", str(path), "--device", "cpu", "--quiet", "--resume"]) == 0


def test_a_failed_run_exits_1_with_its_message(tmp_path, capsys):
    data = make_images(tmp_path / "data", [(64, 64)])
    path = write_config(tmp_path, data, base_model=str(tmp_path / "missing.safetensors"))
    assert main(["train", str(path), "--device", "cpu", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "failed at step 0:" in out and "missing.safetensors" in out


def test_module_entry_point_runs(tmp_path, data):
    path = write_config(tmp_path, data)
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "plan", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "total_steps: 12" in proc.stdout


@pytest.mark.slow
def test_two_processes_write_one_run(tmp_path):
    """Under torchrun / accelerate launch: one plan for both ranks, files written once (CPU, gloo)."""
    from trainer.models.tiny import TINY_TOKENIZER_DIR, save_tiny_checkpoint, tiny_bundle

    bundle = tiny_bundle(Arch.SD15, seed=0)
    ckpt = save_tiny_checkpoint(bundle, tmp_path / "tiny.safetensors", single_file=True)
    configs = save_tiny_checkpoint(bundle, tmp_path / "tiny-diffusers", single_file=False)
    data = make_images(tmp_path / "data", [(64, 64)] * 3 + [(128, 64)] * 2, repeats=2)
    path = write_config(
        tmp_path,
        data,
        base_model=ckpt,
        config_dir=configs,
        tokenizer_dir=str(TINY_TOKENIZER_DIR),
        epochs=2,
        checkpoint_every=3,
        mixed_precision="fp32",
        lora_rank=2,
        lora_alpha=2.0,
        train_text_encoder=True,
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "trainer",
            "train",
            str(path),
            "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished at step 6: finished 6 steps") == 1  # rank 0 alone prints
    run_dir = tmp_path / "out" / "finetune" / "cli"
    run = json.loads((run_dir / "run.json").read_text())
    # Global batches of 2 x 2: 6 squares -> 2, 4 wide -> 1; 3 steps an epoch.
    assert (run["num_processes"], run["plan"]["steps_per_epoch"], run["plan"]["total_steps"]) == (2, 3, 6)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "cli-step00003.safetensors",
        "cli-step00006.safetensors",
    ]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_sweep_is_wired_to_the_sweep_client(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--workflow" in out and "--checkpoints" in out
