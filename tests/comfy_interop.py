"""ComfyUI's side of the interop suite: what stock ComfyUI does with each tiny file of ``interop_files``.

Runs under ComfyUI's python (``run_comfy_interop`` launches it, like ``comfy_models.run_comfy``)::

    $COMFYUI_PYTHON tests/comfy_interop.py lora --checkpoint ckpt.safetensors --lora l.safetensors \\
        --options options.json --inputs in.safetensors --out report.json
    $COMFYUI_PYTHON tests/comfy_interop.py full --model unet.safetensors --options options.json \\
        --inputs in.safetensors --out report.json

Everything goes through ComfyUI's own code: ``comfy.sd.load_checkpoint_guess_config`` (*Load
Checkpoint*), ``comfy.sd.load_lora_for_models`` (*Load LoRA*), ``comfy.sd.load_diffusion_model``
(*Load Diffusion Model*), ``ModelPatcher.patch_weight_to_device`` / ``patch_model``. Two things
make tiny models loadable, both through ComfyUI's own extension points:

- ComfyUI recognises a UNet by its real sizes (``supported_models.SD15.unet_config`` pins
  ``model_channels: 320``...) and assumes its attention heads (``unet_extra_config``), so a
  subclass of ``SD15``/``SDXL`` matching the tiny file's sizes and heads is put first in
  ``comfy.supported_models.models``. Key maps, patching and the model classes stay
  ComfyUI's. SD3 needs none: its detection reads the depth from the file.
- Text encoders take their sizes from ``te_model_options["clip_l_model_config"]`` /
  ``["clip_g_model_config"]``, ComfyUI's own override of its CLIP JSON configs.

The report counts, for the file: its modules, the patches ComfyUI registered, log lines about keys
not loaded, and per patched weight max |ΔW - Σ (alpha/rank)·up·down| computed from the file's
tensors (the file keys of each patch are the ones ComfyUI says it read, ``LoRAAdapter.loaded_keys``);
and the denoiser's output on fixed inputs without and with the LoRA.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_models import LORA_NOT_LOADED, _import_comfy  # noqa: E402
from log_capture import captured_logs  # noqa: E402

_MODULE_SUFFIXES = (
    ".lora_down.weight",
    ".lora_up.weight",
    ".lora_A.weight",
    ".lora_B.weight",
    ".alpha",
)
_FULL_MARKERS = ("unet missing", "unet unexpected", "left over keys")


def _register_tiny_unets(comfy, sd: dict, prefix: str, extra: dict | None) -> None:
    """Put SD15/SDXL subclasses matching this file's (tiny) UNet sizes first in ComfyUI's model list."""
    import comfy.supported_models as sm

    config = comfy.model_detection.detect_unet_config(sd, prefix)
    if config is None or "context_dim" not in config:
        return  # not a UNet (SD3 is detected as it is)
    match = {
        "model_channels": config["model_channels"],
        "context_dim": config["context_dim"],
        "adm_in_channels": config.get("adm_in_channels"),
        "use_temporal_attention": False,
    }
    base = sm.SDXL if config.get("adm_in_channels") else sm.SD15
    body = {"unet_config": match, "unet_extra_config": {**base.unet_extra_config, **(extra or {})}}
    tiny = type(f"Tiny{base.__name__}", (base,), body)
    sm.models.insert(0, tiny)


def _module(key: str) -> str:
    for suffix in _MODULE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def _adapter_delta(lora: dict, adapter, key_of: dict):
    """(alpha/rank)·up·down of one patch from the file's tensors, and the file module it came from.

    ``adapter.weights`` holds the very tensors of the file dict (up, down, alpha, ...), so their
    identity names the file keys ComfyUI used; the alpha is read from the file again.
    """
    up_key, down_key = key_of[id(adapter.weights[0])], key_of[id(adapter.weights[1])]
    module = _module(up_key)
    if _module(down_key) != module:
        raise AssertionError(f"ComfyUI paired {up_key} with {down_key}")
    up, down = lora[up_key].float(), lora[down_key].float()
    rank = down.shape[0]
    alpha = float(lora[module + ".alpha"]) if module + ".alpha" in lora else float(rank)
    return (alpha / rank) * (up.flatten(1) @ down.flatten(1)), module


def _denoise(model, inputs: dict, torch):
    kwargs = {"context": inputs["context"]}
    if "y" in inputs:
        kwargs["y"] = inputs["y"]
    with torch.no_grad():
        return model.model.diffusion_model(inputs["x"], inputs["timesteps"], **kwargs).float()


def check_lora(checkpoint: str, lora_path: str, options_path: str, inputs_path: str, out: str) -> dict:
    comfy = _import_comfy()
    import torch
    from safetensors.torch import load_file, save_file

    options = json.loads(Path(options_path).read_text(encoding="utf-8"))
    sd = comfy.utils.load_torch_file(checkpoint)
    _register_tiny_unets(comfy, sd, "model.diffusion_model.", options["unet_extra_config"])
    te_options = options["te_model_options"]
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        checkpoint, output_vae=False, te_model_options={"dtype": torch.float32, **te_options}
    )
    lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
    inputs = load_file(inputs_path)
    before = _denoise(model, inputs, torch)

    with captured_logs() as messages:
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    not_loaded = [m for m in messages if LORA_NOT_LOADED in m or m.startswith("NOT LOADED")]

    file_modules = sorted({_module(k) for k in lora})
    key_of = {id(v): k for k, v in lora.items()}
    patchers = {"model": new_model, "clip": new_clip.patcher}
    applied_modules: set[str] = set()
    errors = []
    largest = 0.0
    cpu = torch.device("cpu")
    for patcher in patchers.values():
        for key, patches in patcher.patches.items():
            original = comfy.utils.get_attr(patcher.model, key).detach().float().clone()
            patched = patcher.patch_weight_to_device(key, device_to=cpu, return_weight=True).float()
            expected = torch.zeros_like(original)
            for patch in patches:
                adapter, offset = patch[1], patch[3]
                delta, module = _adapter_delta(lora, adapter, key_of)
                applied_modules.add(module)
                target = expected
                if offset is not None:
                    dim, start, size = offset
                    target = expected.narrow(dim, start, size)
                target += delta.reshape(target.shape)
            largest = max(largest, float(expected.abs().max()))
            errors.append(float((patched - original - expected).abs().max()))
    # The LoRA applied to the denoiser (ComfyUI patches weights in place for a run).
    new_model.patch_model()
    after = _denoise(new_model, inputs, torch)
    new_model.unpatch_model()
    save_file({"out": after.contiguous()}, str(Path(out).with_suffix(".safetensors")))
    report = {
        "class": type(model.model.model_config).__name__,
        "modules": len(file_modules),
        "applied": len(applied_modules & set(file_modules)),
        "patches": {name: sum(len(v) for v in p.patches.values()) for name, p in patchers.items()},
        "not_loaded": not_loaded,
        "not_applied": sorted(set(file_modules) - applied_modules),
        "max_delta_error": max(errors, default=float("nan")),
        "largest_delta": largest,
        "output_change": float((after - before).abs().max()),
        "output": str(Path(out).with_suffix(".safetensors")),
    }
    Path(out).write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def check_full(model_path: str, options_path: str, inputs_path: str, out: str) -> dict:
    comfy = _import_comfy()
    import torch
    from safetensors.torch import load_file, save_file

    options = json.loads(Path(options_path).read_text(encoding="utf-8"))
    sd = comfy.utils.load_torch_file(model_path)
    _register_tiny_unets(comfy, sd, "", options["unet_extra_config"])
    with captured_logs() as messages:
        patcher = comfy.sd.load_diffusion_model(model_path, model_options={"dtype": torch.float32})
    ignored = [m for m in messages if any(marker in m for marker in _FULL_MARKERS)]
    state = patcher.model.diffusion_model.state_dict()
    output = _denoise(patcher, load_file(inputs_path), torch)
    save_file({"out": output.contiguous()}, str(Path(out).with_suffix(".safetensors")))
    # The file is in ComfyUI's own layout: every tensor must be a weight of the model, as it is.
    errors = {
        k: float((state[k].float() - v.float()).abs().max())
        for k, v in sd.items()
        if k in state and state[k].shape == v.shape
    }
    report = {
        "class": type(patcher.model.model_config).__name__,
        "file_tensors": len(sd),
        "model_tensors": len(state),
        "applied": len(errors),
        "max_weight_error": max(errors.values(), default=float("nan")),
        "ignored": ignored + sorted(set(sd) - set(errors)),
        "output": str(Path(out).with_suffix(".safetensors")),
    }
    Path(out).write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    lo = sub.add_parser("lora", help="Load Checkpoint + Load LoRA, measure every patch")
    lo.add_argument("--checkpoint", required=True)
    lo.add_argument("--lora", required=True)
    lo.add_argument("--options", required=True, help="JSON: te_model_options, unet_extra_config")
    lo.add_argument("--inputs", required=True)
    lo.add_argument("--out", required=True)
    fu = sub.add_parser("full", help="Load Diffusion Model, run the denoiser once")
    fu.add_argument("--model", required=True)
    fu.add_argument("--options", required=True, help="JSON: unet_extra_config")
    fu.add_argument("--inputs", required=True)
    fu.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "lora":
        report = check_lora(args.checkpoint, args.lora, args.options, args.inputs, args.out)
    else:
        report = check_full(args.model, args.options, args.inputs, args.out)
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, list)}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
