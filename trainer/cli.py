"""The command line: ``python -m trainer train|plan|sweep|demo``.

``train`` and ``plan`` read a run config (a bare TrainConfig JSON or a run folder's run.json) and
take ``--set key=value`` overrides (``--set learning_rate=5e-5 --set method=full``; dotted keys
reach nested options, values are JSON where they parse as JSON, text otherwise). ``train`` also
works under ``accelerate launch --num_processes N -m trainer train run.json``: only rank 0 prints
and writes files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import Arch, TrainConfig
from .models.errors import ModelLoadError
from .options import ConfigError, to_dict

log = logging.getLogger("finetune")


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


# ------------------------------------------------------------------------------------------------
# Config loading with overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=1"`` -> ``(["a", "b"], 1)``; the value is JSON if it parses as JSON, else text.

    Raises:
        ConfigError: no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", f"{text!r} is not key=value (e.g. --set learning_rate=5e-5)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return [k.strip() for k in key.split(".")], value


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a run config and apply ``key=value`` overrides, validating the result.

    Raises:
        ConfigError: a missing/invalid file, an unknown key or a bad value, naming it.
    """
    base = to_dict(TrainConfig.load(path))
    for text in overrides:
        keys, value = parse_override(text)
        target = base
        for k in keys[:-1]:
            if not isinstance(target.get(k), dict):
                raise ConfigError(".".join(keys), f"{k!r} is not a group of options")
            target = target[k]
        target[keys[-1]] = value
    return TrainConfig.from_dict(base)


# ------------------------------------------------------------------------------------------------
# plan


def plan_arch(config: TrainConfig) -> Arch:
    """The model family of a config without loading the model (reads a header or model_index.json).

    Raises:
        ConfigError: ``arch`` is auto and the base model cannot tell.
        ModelLoadError: the base model file is missing or a refused pickle file (as ``train`` says).
    """
    from .models.load import check_model_path

    if config.base_model:  # a plan may be made before a model is chosen (with arch set)
        check_model_path(config.base_model, allow_pickle=config.allow_pickle)  # what train says
    if config.arch != Arch.AUTO:
        return config.arch
    path = Path(config.base_model)
    if path.is_dir():
        from .models.load import PIPELINE_ARCH

        try:
            name = json.loads((path / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
        except (OSError, json.JSONDecodeError):
            name = ""
        if name in PIPELINE_ARCH:
            return PIPELINE_ARCH[name]
    elif path.is_file() and path.suffix == ".safetensors":
        from .models.detect import detect_arch
        from .models.files import read_safetensors_header

        return detect_arch(read_safetensors_header(str(path)), source=str(path))
    raise ConfigError(
        "arch",
        f"is auto and {config.base_model!r} does not say which model it is; set arch to sd15, sdxl or sd3",
    )


def make_run_plan(config: TrainConfig, *, num_processes: int = 1) -> dict[str, Any]:
    """Scan the dataset, count the buckets and make the plan the trainer will follow.

    Returns:
        ``{"arch", "resolution", "images", "samples_per_epoch", "problems", "buckets", "plan"}``.
    """
    from .planning import plan_run, scan_for_run

    arch = plan_arch(config)
    resolution = config.native_resolution(arch)
    dataset = scan_for_run(config, resolution)
    run_plan = plan_run(config, dataset, resolution=resolution, num_processes=num_processes)
    plan, counts = run_plan.plan, run_plan.bucket_counts
    return {
        "arch": arch.value,
        "resolution": resolution,
        "images": len(dataset.items),
        "samples_per_epoch": dataset.samples_per_epoch,
        "problems": [str(p) for p in dataset.problems],
        "buckets": {f"{w}x{h}": n for (w, h), n in sorted(counts.items())},
        "plan": plan.to_dict(),
        "summary": plan.describe(),
    }


def _print_plan(info: dict[str, Any], out) -> None:
    p = info["plan"]
    print(f"model: {info['arch']} at {info['resolution']} px", file=out)
    print(f"dataset: {info['images']} images, {info['samples_per_epoch']} samples per epoch", file=out)
    for problem in info["problems"]:
        print(f"  left out: {problem}", file=out)
    print("buckets (samples per epoch):", file=out)
    for name, n in info["buckets"].items():
        print(f"  {name}: {n}", file=out)
    for key in (
        "steps_per_epoch",
        "epochs",
        "total_steps",
        "checkpoint_every",
        "validation_every",
        "warmup_steps",
    ):
        print(f"{key}: {p[key]}", file=out)
    print(info["summary"], file=out)


# ------------------------------------------------------------------------------------------------
# train


def _progress_callbacks():
    from tqdm.auto import tqdm

    from .engine.events import Callbacks

    class Bar(Callbacks):
        def __init__(self):
            self.bar = None

        def on_progress(self, progress):
            if self.bar is None:
                self.bar = tqdm(
                    total=progress.total_steps, initial=progress.step - 1, unit="step", dynamic_ncols=True
                )
            self.bar.total = progress.total_steps
            self.bar.set_postfix(
                loss=f"{progress.loss:.4f}", lr=f"{progress.lr:.2e}", epoch=progress.epoch, refresh=False
            )
            self.bar.update(progress.step - self.bar.n)

        def on_checkpoint(self, run, step, path):
            (self.bar.write if self.bar else print)(f"checkpoint: {path}")

        def on_sample(self, run, step, paths):
            (self.bar.write if self.bar else print)(f"samples: {', '.join(paths)}")

        def on_state(self, run, state, message=""):
            if message and state.value in ("paused", "stopped", "failed"):
                (self.bar.write if self.bar else print)(f"{state.value}: {message}")

        def close(self):
            if self.bar is not None:
                self.bar.close()

    return Bar()


class _StopOnSignal:
    """Ctrl-C (SIGINT) and SIGTERM stop the run after its current step, saving a checkpoint and
    its resume state there, as the Stop button does in ComfyUI; a second Ctrl-C quits at once
    without saving (the run is then ``interrupted`` and resumes from its last checkpoint).

    Installed by the command line only: inside ComfyUI the host owns the process's signals.
    """

    _NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self, commands, write):
        self.commands = commands
        self.write = write
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self._NAMES:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.commands.stop_requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: quit now, without saving
            return  # a repeated SIGTERM: the save is already under way
        name = self._NAMES.get(signum, f"signal {signum}")
        self.commands.stop(f"stopped by {name}")
        if _is_main_process():
            self.write(
                f"{name}: stopping after the current step and saving there"
                + ("; press Ctrl-C again to quit without saving" if signum == signal.SIGINT else "")
            )


def cmd_train(args: argparse.Namespace) -> int:
    from .engine.events import Commands
    from .engine.loop import train

    config = load_config(args.config, args.set or [])
    bar = _progress_callbacks() if _is_main_process() and not args.quiet else None
    commands = Commands()

    def write(text: str) -> None:
        (bar.bar.write if bar is not None and bar.bar is not None else print)(text, file=sys.stderr)

    try:
        with _StopOnSignal(commands, write):
            result = train(config, callbacks=bar, commands=commands, resume=args.resume, device=args.device)
    except KeyboardInterrupt:
        print("interrupted without saving; resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    if _is_main_process():
        print(f"run folder: {result.run_dir}")
        if result.final_checkpoint:
            print(f"last checkpoint: {result.final_checkpoint}")
        print(f"{result.state.value} at step {result.step}: {result.message}")
    return 0 if result.state.value in ("finished", "stopped") else 1


def cmd_plan(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set or [])
    info = make_run_plan(config, num_processes=args.num_processes)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_plan(info, sys.stdout)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    bar = _progress_callbacks()
    try:
        result = run_demo(out_dir=args.out, steps=args.steps, callbacks=bar)
    finally:
        bar.close()
    print(result.describe())
    return 0 if result.ok else 1


# ------------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer", description="Fine-tune Stable Diffusion (SD1.5, SDXL, SD3): LoRA or full."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a run from its config (run.json or a TrainConfig JSON)")
    p.add_argument("config", help="run.json or a config JSON file")
    p.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an option (repeatable)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: first GPU, else CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="scan the dataset and print the step plan")
    p.add_argument("config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an option (repeatable)")
    p.add_argument("--num-processes", type=int, default=1, help="GPUs the run will use")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("demo", help="train a tiny LoRA on the bundled images (CPU, about a minute)")
    p.add_argument("--out", default="finetune-demo", help="output folder (default ./finetune-demo)")
    p.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    p.set_defaults(func=cmd_demo)

    try:
        from .sweep_client import add_sweep_arguments, run_sweep
    except ImportError:
        p = sub.add_parser("sweep", help="render every checkpoint of a run (not available in this install)")
        p.set_defaults(func=lambda a: _unavailable("sweep"))
    else:
        p = sub.add_parser(
            "sweep", help="render one prompt with every checkpoint of a run and lay them out in a strip"
        )
        add_sweep_arguments(p)
        p.set_defaults(func=run_sweep)
    return parser


def _unavailable(what: str) -> int:
    print(
        f"error: '{what}' is not available: trainer/sweep_client.py is missing from this install",
        file=sys.stderr,
    )
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (1 on a failed run or a bad config)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if _is_main_process() else logging.WARNING,
        format="%(levelname)s %(message)s",
    )
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ModelLoadError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
