"""ComfyUI's side of the compatibility tests: real-size random-weight checkpoints built with ComfyUI's
own model classes, and what stock ComfyUI does with the LoRA and full fine-tune files we write.

Why a subprocess: ComfyUI is imported in-process (``comfy.sd``, ``comfy.lora``...), which needs
ComfyUI's own python and ``comfy.cli_args.args.cpu = True`` before ``comfy.model_management`` is
imported; real-size models also need their memory back before the next step starts. So every
ComfyUI step runs as::

    $COMFYUI_PYTHON tests/comfy_models.py build   --arch sd15 --out ckpt.safetensors
    $COMFYUI_PYTHON tests/comfy_models.py lora    --checkpoint ckpt.safetensors --lora lora.safetensors \
                                                  --expect expect.json --out report.json
    $COMFYUI_PYTHON tests/comfy_models.py denoise --model unet.safetensors --inputs in.safetensors \
                                                  --out out.safetensors --report report.json
    $COMFYUI_PYTHON tests/comfy_models.py build   --arch flux --out flux/ [--depth 1 --single-depth 1]
    $COMFYUI_PYTHON tests/comfy_models.py check-flux --folder flux/ --out report.json

(``--fp16-weights`` on ``lora`` and ``denoise`` keeps weights in fp16: SDXL in fp32 next to
everything else does not fit a 24 GB machine.)

and the tests import this module only for the launchers at the bottom (:func:`comfy_python`,
:func:`run_comfy`, :func:`cached_checkpoint`), which need nothing but the standard library.

Checkpoints are what ComfyUI itself would save (``comfy.sd.save_checkpoint``: keys from
``state_dict_for_saving``), fp16, with every weight drawn from a seeded normal distribution (ComfyUI
builds its layers without initialising them). SD3 Medium is saved with CLIP-L and CLIP-G and no T5,
like Stability's ``sd3_medium_incl_clips.safetensors``. Flux.1-dev is four files, as its users
download them (diffusion model in fp8, CLIP-L, T5-XXL in fp8, VAE): ``build --arch flux`` writes
them into a folder, streamed tensor by tensor (:mod:`comfy_flux`), and ``check-flux`` loads them
with the stock loader nodes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from log_capture import captured_logs

# Bump to rebuild cached checkpoints when the way they are built changes.
BUILD_VERSION = "1"
ARCHS = ("sd15", "sdxl", "sd3", "flux", "t5xxl")  # flux: a folder of four files; t5xxl: one (comfy_flux.py)
# The supported_models class ComfyUI must pick for each arch.
COMFY_CLASS = {"sd15": "SD15", "sdxl": "SDXL", "sd3": "SD3"}
# ComfyUI's CLIP patcher keys of each text-encoder slot, in our trainer's text_encoders order.
CLIP_SLOTS = {"sd15": ("clip_l",), "sdxl": ("clip_l", "clip_g"), "sd3": ("clip_l", "clip_g", "t5xxl")}

# The real UNet configs, as ComfyUI's model_detection.unet_config_from_diffusers_unet lists them.
_UNET_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "model_channels": 320,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
UNET_CONFIGS = {
    "sd15": {
        **_UNET_COMMON,
        "adm_in_channels": None,
        "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": False,
        "context_dim": 768,
        "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    },
    "sdxl": {
        **_UNET_COMMON,
        "num_classes": "sequential",
        "adm_in_channels": 2816,
        "num_res_blocks": [2, 2, 2],
        "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4],
        "transformer_depth_middle": 10,
        "use_linear_in_transformer": True,
        "context_dim": 2048,
        "num_head_channels": 64,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    },
    # SD3 Medium, as model_detection.detect_unet_config reads it from sd3_medium.safetensors.
    "sd3": {
        "in_channels": 16,
        "patch_size": 2,
        "out_channels": 16,
        "depth": 24,
        "input_size": None,
        "adm_in_channels": 2048,
        "context_embedder_config": {
            "target": "torch.nn.Linear",
            "params": {"in_features": 4096, "out_features": 1536},
        },
        "num_patches": 36864,
        "pos_embed_max_size": 192,
        "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [],
    },
}
# The SD VAE (ComfyUI's default AutoencoderKL ddconfig); SD3's has 16 latent channels and no quant convs.
VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
# SD3's clip_target picks its text encoders from the keys a checkpoint has.
_SD3_CLIP_MARKERS = (
    "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
    "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight",
)
LORA_NOT_LOADED = "lora key not loaded"

log = logging.getLogger("comfy_models")


# --------------------------------------------------------------------------------------------
# Inside ComfyUI's python


def _import_comfy():
    """Import ComfyUI from ``COMFYUI_PATH`` for CPU use; returns the ``comfy`` package."""
    root = os.environ.get("COMFYUI_PATH")
    if not root or not Path(root, "comfy", "sd.py").is_file():
        raise SystemExit(f"COMFYUI_PATH={root!r} is not a ComfyUI checkout (no comfy/sd.py)")
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args

    # Must be set before comfy.model_management is imported, or it asks for CUDA.
    comfy.cli_args.args.cpu = True
    import torch

    torch.set_num_threads(compat_threads())
    import comfy.lora  # noqa: F401
    import comfy.model_detection  # noqa: F401
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.utils  # noqa: F401

    return comfy


def randomize(module, *, seed: int) -> int:
    """Fill every parameter of ``module`` with seeded random values of a sane scale.

    Matrices and kernels get N(0, 1/fan_in) (activations keep their size through the depth of the
    model), norm scales 1 + N(0, 0.1), every other vector N(0, 0.02). ComfyUI's layers are built
    without initialisation, so nothing may be left as it is.

    Returns:
        The number of parameters filled.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for _, sub in module.named_modules():
            is_norm = "norm" in type(sub).__name__.lower()
            for name, param in sub.named_parameters(recurse=False):
                if param.dim() >= 2:
                    values = torch.randn(param.shape, generator=generator) * param[0].numel() ** -0.5
                elif is_norm and name == "weight":
                    values = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
                else:
                    values = 0.02 * torch.randn(param.shape, generator=generator)
                param.copy_(values.to(param.dtype))
                count += 1
    return count


def _vae_model(arch: str):
    from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine

    if arch != "sd3":
        return AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4)
    ddconfig = {**VAE_DDCONFIG, "z_channels": 16}
    return AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig},
    )


def build_checkpoint(arch: str, out: str, *, seed: int = 0) -> dict:
    """Build a real-size ``arch`` checkpoint with ComfyUI's classes and save it with ComfyUI's saver.

    Returns:
        Facts for the log: the supported_models class and the number of tensors saved.
    """
    comfy = _import_comfy()
    import torch

    cpu = torch.device("cpu")
    model_config = comfy.model_detection.model_config_from_unet_config(dict(UNET_CONFIGS[arch]))
    if type(model_config).__name__ != COMFY_CLASS[arch]:
        raise SystemExit(
            f"ComfyUI matched the {arch} config to {type(model_config).__name__}, not {COMFY_CLASS[arch]}"
        )
    model_config.set_inference_dtype(torch.float16, None)
    model = model_config.get_model({}, "", device=cpu)
    randomize(model.diffusion_model, seed=seed)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)

    markers = {k: torch.zeros(1) for k in _SD3_CLIP_MARKERS} if arch == "sd3" else {}
    clip = comfy.sd.CLIP(model_config.clip_target(state_dict=markers), model_options={"dtype": torch.float16})
    randomize(clip.cond_stage_model, seed=seed + 1)

    vae_model = _vae_model(arch)
    randomize(vae_model, seed=seed + 2)
    vae = comfy.sd.VAE(sd={k: v.half() for k, v in vae_model.state_dict().items()})
    del vae_model

    tmp = f"{out}.tmp-{os.getpid()}.safetensors"
    comfy.sd.save_checkpoint(tmp, patcher, clip, vae, metadata={"comfy_models.build": f"{arch} seed {seed}"})
    os.replace(tmp, out)
    keys = comfy.utils.load_torch_file(out).keys()
    return {"class": type(model_config).__name__, "tensors": len(keys)}


def build_flux(out: str, *, depth: int = 19, single_depth: int = 38, seed: int = 0) -> dict:
    """The Flux.1-dev files (:mod:`comfy_flux`) in the new folder ``out``; reduced depth for the CPU.

    Returns:
        Per file: tensors, parameters, bytes and seconds.
    """
    _import_comfy()
    import comfy_flux  # beside this file: sys.path[0] when run as a script

    return comfy_flux.build(out, depth=depth, single_depth=single_depth, seed=seed, threads=compat_threads())


def _expected_delta(lora, entry: dict):
    """((alpha / rank) * up @ down, alpha / rank) from the file's own tensors, in fp32, shaped like the weight rows."""
    down = lora[entry["down"]].float()
    up = lora[entry["up"]].float()
    rank = down.shape[0]
    alpha = float(lora[entry["alpha"]].float()) if entry.get("alpha") in lora else float(rank)
    delta = up.flatten(1) @ down.flatten(1)
    return (alpha / rank) * delta.reshape(up.shape[0], *down.shape[1:]), alpha / rank


def check_lora(
    checkpoint: str, lora_path: str, expect_path: str, out: str, *, fp16_weights: bool = False
) -> dict:
    """Load ``checkpoint`` and ``lora_path`` the way *Load LoRA* does and measure every weight change.

    ``expect_path`` (JSON) lists, per LoRA module of the file: its ``down``/``up``/``alpha`` keys and
    the ComfyUI weight it must change (``target``: a model key ``diffusion_model.…`` or a CLIP key
    ``clip_l.…``), with ``rows`` [start, stop] for a slice of a fused weight (SD3's qkv).

    By default the checkpoint loads as ComfyUI loads it on a CPU (UNet in fp32) except that the
    text encoders are fp32 too (``--fp32-text-enc``), and every weight is patched with
    ``ModelPatcher.patch_weight_to_device(key, return_weight=True)``: the per-weight step of
    ``patch_model()`` without the write-back, so two copies of a whole model never coexist.
    ``fp16_weights`` keeps every weight in fp16 (what ComfyUI does on a GPU; SDXL in fp32 does not
    fit this machine twice over) and patches with ``comfy.lora.calculate_weight`` on an fp32 copy:
    the same LoRA math before ComfyUI rounds the result back to fp16.

    Returns (and writes to ``out``): the detected class, the log lines about unloaded keys, the
    number of patches ComfyUI registered, and per module the max abs error against
    (alpha/rank)·up·down, the largest expected change, and whether the weight changed.
    """
    comfy = _import_comfy()
    import torch

    cpu = torch.device("cpu")
    expect = json.loads(Path(expect_path).read_text(encoding="utf-8"))
    dtype = torch.float16 if fp16_weights else torch.float32
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        checkpoint,
        output_vae=False,
        model_options={"dtype": torch.float16} if fp16_weights else {},
        te_model_options={"dtype": dtype},
    )
    lora = comfy.utils.load_torch_file(lora_path, safe_load=True)

    with captured_logs() as messages:
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    not_loaded = [m for m in messages if LORA_NOT_LOADED in m or m.startswith("NOT LOADED")]

    patchers = {"model": new_model, "clip": new_clip.patcher}
    applied = {name: sum(len(v) for v in p.patches.values()) for name, p in patchers.items()}

    def patch(patcher, key):
        """(weight before, weight after) in fp32, or (weight, None) when ComfyUI has no patch for it."""
        weight = comfy.utils.get_attr(patcher.model, key).detach()
        if key not in patcher.patches:
            return weight.float(), None
        if weight.dtype == torch.float32:
            return weight, patcher.patch_weight_to_device(key, device_to=cpu, return_weight=True)
        original = weight.float()
        return original, comfy.lora.calculate_weight(patcher.patches[key], original.clone(), key)

    modules = []
    current: tuple = ("", None, None)
    for entry in expect["modules"]:
        which = "model" if entry["target"].startswith("diffusion_model.") else "clip"
        patcher = patchers[which]
        key = entry["target"]
        if current[0] != key:  # entries of one fused weight come together; hold one weight at a time
            current = (key, *patch(patcher, key))
        _, original, patched = current
        start, stop = entry.get("rows") or (0, original.shape[0])
        expected, scale = _expected_delta(lora, entry)
        result = {
            "down": entry["down"],
            "target": key,
            "scale": scale,
            "patched": key in patcher.patches,
            "expected_max": float(expected.abs().max()),
            "weight_max": float(original.abs().max()),
        }
        if patched is None or patched.shape != original.shape:
            result.update(error=None, changed=False)
        else:
            delta = patched[start:stop] - original[start:stop]
            result.update(error=float((delta - expected).abs().max()), changed=bool(delta.abs().max() > 0))
        modules.append(result)

    report = {
        "class": type(model.model.model_config).__name__,
        "weight_dtype": str(dtype),
        "not_loaded": not_loaded,
        "applied": applied,
        "lora_keys": len(lora),
        "modules": modules,
    }
    Path(out).write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def denoise(
    model_path: str, inputs_path: str, out: str, report_path: str, *, fp16_weights: bool = False
) -> dict:
    """Load a diffusion-model file with ComfyUI's *Load Diffusion Model* path and run its denoiser once.

    ``inputs_path`` (safetensors) holds ``x``, ``timesteps``, ``context`` and, for SDXL/SD3, ``y``
    (SDXL: pooled text embeds followed by the embedded size/crop ids, what ComfyUI's SDXL
    ``encode_adm`` builds). Writes the output as ``out`` (safetensors, key ``out``) and facts to
    ``report_path``: the detected supported_models class, the model class, the weight dtype and the
    compute (manual cast) dtype. ``fp16_weights`` stores the weights in fp16 (what ComfyUI does on a
    GPU); on the CPU it then computes in fp32 by casting each layer's weights as it runs them.
    """
    comfy = _import_comfy()
    import torch
    from safetensors.torch import load_file, save_file

    options = {"dtype": torch.float16} if fp16_weights else {}
    patcher = comfy.sd.load_diffusion_model(model_path, model_options=options)
    inputs = load_file(inputs_path)
    diffusion_model = patcher.model.diffusion_model
    dtype = next(diffusion_model.parameters()).dtype
    kwargs = {"context": inputs["context"]}
    if "y" in inputs:
        kwargs["y"] = inputs["y"]
    with torch.no_grad():
        output = diffusion_model(inputs["x"], inputs["timesteps"], **kwargs)
    save_file({"out": output.float().contiguous()}, out)
    report = {
        "class": type(patcher.model.model_config).__name__,
        "model_class": type(patcher.model).__name__,
        "dtype": str(dtype),
        "compute_dtype": str(patcher.model.manual_cast_dtype or dtype),
    }
    Path(report_path).write_text(json.dumps(report), encoding="utf-8")
    return report


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a real-size random-weight checkpoint")
    b.add_argument("--arch", choices=ARCHS, required=True)
    b.add_argument("--out", required=True, help="the checkpoint file (flux: a new folder for its four files)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--depth", type=int, default=19, help="flux: double blocks (19 in Flux.1-dev)")
    b.add_argument("--single-depth", type=int, default=38, help="flux: single blocks (38 in Flux.1-dev)")
    cf = sub.add_parser("check-flux", help="load built Flux files with the stock loaders and render one step")
    cf.add_argument("--folder", required=True)
    cf.add_argument("--out", required=True)
    lo = sub.add_parser("lora", help="apply a LoRA file the way Load LoRA does and measure it")
    lo.add_argument("--checkpoint", required=True)
    lo.add_argument("--lora", required=True)
    lo.add_argument("--expect", required=True)
    lo.add_argument("--out", required=True)
    lo.add_argument(
        "--fp16-weights", action="store_true", help="keep weights in fp16 (SDXL/SD3 on a small machine)"
    )
    d = sub.add_parser("denoise", help="load a diffusion model file and run its denoiser once")
    d.add_argument("--model", required=True)
    d.add_argument("--inputs", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--report", required=True)
    d.add_argument("--fp16-weights", action="store_true", help="keep weights in fp16, compute in fp32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "build" and args.arch == "t5xxl":
        _import_comfy()
        import comfy_flux

        print(json.dumps(comfy_flux.build_t5xxl(args.out, seed=args.seed, threads=compat_threads())))
    elif args.command == "build" and args.arch == "flux":
        print(
            json.dumps(build_flux(args.out, depth=args.depth, single_depth=args.single_depth, seed=args.seed))
        )
    elif args.command == "build":
        print(json.dumps(build_checkpoint(args.arch, args.out, seed=args.seed)))
    elif args.command == "check-flux":
        _import_comfy()
        import comfy_flux

        report = comfy_flux.check(args.folder)
        Path(args.out).write_text(json.dumps(report, indent=1), encoding="utf-8")
        print(json.dumps({"class": report["unet"]["class"], "clip": report["clip"]["class"]}))
    elif args.command == "lora":
        report = check_lora(args.checkpoint, args.lora, args.expect, args.out, fp16_weights=args.fp16_weights)
        print(
            json.dumps(
                {
                    "class": report["class"],
                    "applied": report["applied"],
                    "not_loaded": len(report["not_loaded"]),
                }
            )
        )
    else:
        print(
            json.dumps(
                denoise(args.model, args.inputs, args.out, args.report, fp16_weights=args.fp16_weights)
            )
        )
    return 0


# --------------------------------------------------------------------------------------------
# Launchers for the tests (standard library only)


def comfy_python() -> tuple[str, str] | None:
    """(ComfyUI checkout, its python) from ``COMFYUI_PATH`` / ``COMFYUI_PYTHON``, or None when unset.

    ``COMFYUI_PYTHON`` defaults to ``<COMFYUI_PATH>/../comfy-venv/bin/python`` when that exists,
    else this interpreter (the same convention as ``comfy_server.py``).
    """
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        return None
    python = os.environ.get("COMFYUI_PYTHON")
    if not python:
        candidate = Path(root).resolve().parent / "comfy-venv" / "bin" / "python"
        python = str(candidate) if candidate.is_file() else sys.executable
    return str(Path(root).resolve()), python


def run_comfy(*args: str, timeout: float = 1800.0) -> str:
    """Run one command of this file under ComfyUI's python; returns its stdout's last line.

    Raises:
        RuntimeError: the command failed, with the tail of its output.
    """
    found = comfy_python()
    if found is None:
        raise RuntimeError("COMFYUI_PATH is not set")
    root, python = found
    env = {**os.environ, "COMFYUI_PATH": root, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.monotonic()
    proc = subprocess.run(
        [python, str(Path(__file__).resolve()), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    log.info("comfy_models %s: %.0f s", args[0], time.monotonic() - started)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise RuntimeError(f"comfy_models {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def compat_threads() -> int:
    """CPU threads for the real-size steps: ``$FINETUNE_COMPAT_THREADS``, default 1 (a shared machine)."""
    return max(1, int(os.environ.get("FINETUNE_COMPAT_THREADS", "1")))


def available_gib() -> float:
    """Memory the kernel says can be used without swapping (``MemAvailable``), in GiB; inf if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def in_child(fn, *args):
    """Run ``fn(*args)`` in a freshly spawned python (this interpreter) and return its result.

    Real-size models are loaded there, so all their memory is back when it returns. ``fn`` must be
    a module-level function of an importable module (a test module is: spawn passes ``sys.path``
    on), its arguments and result picklable.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _cache_key(root: str) -> str:
    version_file = Path(root, "comfyui_version.py")
    version = version_file.read_text(encoding="utf-8") if version_file.is_file() else "unknown"
    return hashlib.sha256(f"{version}\n{BUILD_VERSION}".encode()).hexdigest()[:12]


def cached_flux(
    *, depth: int = 19, single_depth: int = 38, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The folder of Flux.1-dev files (:mod:`comfy_flux`) at this depth, built once and cached
    like :func:`cached_checkpoint` (the reduced-depth folder is named by its depth)."""
    found = comfy_python()
    if found is None:
        raise RuntimeError("COMFYUI_PATH is not set")
    folder = Path(cache_dir or os.environ.get("FINETUNE_COMFY_CACHE", "/tmp/finetune-comfy-models"))
    name = "flux" if (depth, single_depth) == (19, 38) else f"flux-depth{depth}x{single_depth}"
    path = folder / _cache_key(found[0]) / name
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        run_comfy("build", "--arch", "flux", "--out", str(path), "--depth", str(depth),
                  "--single-depth", str(single_depth))  # fmt: skip
    return path


def cached_checkpoint(arch: str, *, cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The real-size random ``arch`` checkpoint, built once and kept under the cache folder.

    The cache (``$FINETUNE_COMFY_CACHE``, default ``/tmp/finetune-comfy-models``) is keyed by the
    ComfyUI version and :data:`BUILD_VERSION` (bump it when the builder changes); delete the folder
    to force a rebuild.
    """
    found = comfy_python()
    if found is None:
        raise RuntimeError("COMFYUI_PATH is not set")
    folder = Path(cache_dir or os.environ.get("FINETUNE_COMFY_CACHE", "/tmp/finetune-comfy-models"))
    path = folder / _cache_key(found[0]) / f"{arch}-seed{seed}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        run_comfy("build", "--arch", arch, "--out", str(path), "--seed", str(seed))
    return path


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
