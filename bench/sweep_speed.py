"""Sweep benchmark: N LoRA checkpoints rendered by the Checkpoint Sweep node in one prompt, against
queuing the stock workflow (Load Checkpoint -> Load LoRA -> KSampler -> VAE Decode) once per
checkpoint through ``/prompt``, on a real ComfyUI running on the CPU.

    COMFYUI_PATH=/path/to/ComfyUI <its python> -m bench.sweep_speed [--checkpoints 8] [--size 64] [--steps 4]

The base model is the real-size random-weight SD1.5 checkpoint of ``tests/comfy_models.py``
(cached under /tmp); the LoRAs are kohya files of rank 16 on every UNet attention projection (the
trainer's default targets), random weights. Both methods start with the base model already
loaded (one warm-up render), every repeat uses freshly named LoRA files, so ComfyUI's cache helps
neither method with a LoRA it has seen, and the methods take turns going first. Prints both
times, per render, and their ratio.

With ComfyUI's default cache the per-checkpoint prompts reuse the loaded base model too, so the
difference is per-prompt overhead; ``--cache-none`` shows a server that keeps nothing between
prompts, where each per-checkpoint prompt loads the base model again and the sweep node does not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
SD15_UNET_CONFIG = ROOT / "trainer" / "models" / "configs" / "sd15" / "unet" / "config.json"
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
SAMPLING = {"seed": 7, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal"}
PROMPT, NEGATIVE = "a lighthouse on a cliff at dusk", "blurry"


def attention_shapes() -> dict[str, tuple[int, int]]:
    """(in, out) features of every UNet attention projection of SD1.5, by diffusers module name;
    built on the meta device from the shipped config, so nothing is allocated."""
    from diffusers import UNet2DConditionModel

    config = json.loads(SD15_UNET_CONFIG.read_text(encoding="utf-8"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return {
        name: (module.in_features, module.out_features)
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(ATTENTION)
    }


def write_loras(folder: Path, count: int, *, rank: int = 16, seed: int = 0) -> list[Path]:
    """``count`` kohya LoRA files ``<folder name>-stepNNNNN.safetensors`` (steps 100, 200, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = attention_shapes()
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        tensors = {}
        for name, (fan_in, fan_out) in shapes.items():
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = (torch.randn(rank, fan_in, generator=g) / fan_in**0.5).half()
            tensors[f"{key}.lora_up.weight"] = (torch.randn(fan_out, rank, generator=g) * 0.01).half()
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
        path = folder / f"{folder.name}-step{(i + 1) * 100:05d}.safetensors"
        save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
        paths.append(path)
    return paths


def _loader(ckpt: str) -> dict:
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}


def stock_prompt(ckpt: str, lora_name: str, *, size: int, steps: int) -> dict:
    """The workflow one would queue once per checkpoint."""
    return {
        "1": _loader(ckpt),
        "2": {"class_type": "LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name, "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": PROMPT}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": NEGATIVE}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "steps": steps, "denoise": 1.0, **SAMPLING}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }  # fmt: skip


def sweep_prompt(ckpt: str, folder: str, *, size: int, steps: int) -> dict:
    """One prompt rendering every checkpoint of ``folder`` with the Checkpoint Sweep node."""
    return {
        "1": _loader(ckpt),
        "2": {"class_type": "FinetuneRunCheckpoints", "inputs": {
            "run": "(none)", "folder": folder, "every_k": 1, "step_min": 0, "step_max": 0, "include_base": False}},
        "3": {"class_type": "FinetuneCheckpointSweep", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "checkpoints": ["2", 0], "positive": PROMPT,
            "negative": NEGATIVE, "steps": steps, "width": size, "height": size, "lora_strength": 1.0, **SAMPLING}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }  # fmt: skip


def _images(history: dict, node: str) -> int:
    return len(history["outputs"][node]["images"])


def _run_node(client, ckpt: str, folder: Path, *, count: int, size: int, steps: int) -> float:
    started = time.perf_counter()
    history = client.run(sweep_prompt(ckpt, folder.name, size=size, steps=steps), timeout=3600)
    elapsed = time.perf_counter() - started
    if _images(history, "4") != count:
        raise RuntimeError(f"the sweep rendered {_images(history, '4')} images, expected {count}")
    return elapsed


def _run_per_checkpoint(client, ckpt: str, names: list[str], *, size: int, steps: int) -> float:
    started = time.perf_counter()
    for name in names:
        history = client.run(stock_prompt(ckpt, name, size=size, steps=steps), timeout=1800)
        if _images(history, "8") != 1:
            raise RuntimeError(f"the stock workflow for {name} rendered no image")
    return time.perf_counter() - started


def measure(client, ckpt: str, *, count: int, size: int, steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per method and repeat; every repeat writes new LoRA files with new names, and the
    two methods take turns going first (a shared machine's load drifts over minutes)."""
    times: dict[str, list[float]] = {"node": [], "per_checkpoint": []}
    loras = client.models_dir / "loras"
    warmup = write_loras(loras / "bench-warmup", 1)[0].relative_to(loras).as_posix()
    client.run(stock_prompt(ckpt, warmup, size=size, steps=steps), timeout=1800)  # loads the base model
    for repeat in range(repeats):
        node_folder = loras / f"bench-node-{repeat}"
        write_loras(node_folder, count, seed=2 * repeat + 1)
        queue_files = write_loras(loras / f"bench-queue-{repeat}", count, seed=2 * repeat + 2)
        names = [p.relative_to(loras).as_posix() for p in queue_files]
        order = ["node", "per_checkpoint"] if repeat % 2 == 0 else ["per_checkpoint", "node"]
        for method in order:
            if method == "node":
                elapsed = _run_node(client, ckpt, node_folder, count=count, size=size, steps=steps)
            else:
                elapsed = _run_per_checkpoint(client, ckpt, names, size=size, steps=steps)
            times[method].append(elapsed)
        print(
            f"repeat {repeat + 1}/{repeats}: node {times['node'][-1]:.1f} s, "
            f"per-checkpoint prompts {times['per_checkpoint'][-1]:.1f} s",
            flush=True,
        )
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=int, default=8, help="LoRA checkpoints to sweep (default 8)")
    parser.add_argument("--size", type=int, default=64, help="render width and height in pixels (default 64)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per render (default 4)")
    parser.add_argument("--repeats", type=int, default=2, help="times to measure each method (default 2)")
    parser.add_argument(
        "--cache-none",
        action="store_true",
        help="start ComfyUI with --cache-none (nothing kept between prompts: each per-checkpoint prompt reloads the base)",
    )
    parser.add_argument(
        "--log", type=Path, help="copy the server's log here (render times per sampling step)"
    )
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT / "tests"))
    from comfy_models import cached_checkpoint
    from comfy_server import start_server, stop_server

    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        parser.error("set COMFYUI_PATH to a ComfyUI checkout (and run with its python)")
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        extra = ("--cache-none",) if args.cache_none else ()
        proc, client = start_server(Path(comfy_path), Path(tmp), extra_args=extra)
        try:
            ckpt = "bench-sd15.safetensors"
            (client.models_dir / "checkpoints" / ckpt).symlink_to(cached_checkpoint("sd15"))
            times = measure(
                client, ckpt, count=args.checkpoints, size=args.size, steps=args.steps, repeats=args.repeats
            )
        finally:
            stop_server(proc)
            if args.log:
                shutil.copyfile(client.log_path, args.log)
    node, per = statistics.median(times["node"]), statistics.median(times["per_checkpoint"])
    n = args.checkpoints
    cache = "ComfyUI --cache-none" if args.cache_none else "ComfyUI's default cache"
    print(f"\nSD1.5 real size, CPU, {n} LoRA checkpoints, {args.size} px, {args.steps} steps, {cache}")
    print(f"(median of {args.repeats} repeats; both methods start with the base model loaded)")
    print(f"  Checkpoint Sweep node, one prompt:      {node:7.1f} s  ({node / n:5.2f} s per checkpoint)")
    print(f"  stock workflow queued per checkpoint:   {per:7.1f} s  ({per / n:5.2f} s per checkpoint)")
    print(f"  ratio (per-checkpoint / node):          {per / node:7.2f}x")
    print(f"  every repeat (s): node {times['node']}, per-checkpoint {times['per_checkpoint']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
