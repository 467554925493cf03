"""Real-size random-weight Flux.1-dev files, laid out as a Flux user downloads them, built with
ComfyUI's own classes (run under ComfyUI's python through ``tests/comfy_models.py build --arch flux``).

A Flux user loads four files with stock nodes, and this module writes those four::

    diffusion_models/flux1-dev.safetensors        Load Diffusion Model (UNETLoader), weight_dtype fp8_e4m3fn
    text_encoders/clip_l.safetensors              DualCLIPLoader, type flux
    text_encoders/t5xxl_fp8_e4m3fn.safetensors    DualCLIPLoader, type flux
    vae/ae.safetensors                            Load VAE

- ``flux1-dev.safetensors``: ComfyUI's ``Flux`` model (``comfy.supported_models.Flux``) with
  Flux.1-dev's unet_config as ``model_detection`` reads it from the real file (hidden 3072, 19
  double and 38 single blocks, guidance embedding), keys in BFL's layout (what UNETLoader loads;
  q/k norms as ``…_norm.scale``), matrices in fp8_e4m3fn and vectors in bf16: 11.9B parameters,
  about 11.9 GB instead of bf16's 23.8 GB. ``depth``/``single_depth`` make a reduced file for the
  CPU (real widths, fewer blocks; ComfyUI detects the depth from the keys).
- ``t5xxl_fp8_e4m3fn.safetensors``: ComfyUI's T5-XXL encoder (4.76B parameters), every tensor in
  fp8_e4m3fn like the common file (ComfyUI reads the T5's dtype from ``encoder.final_layer_norm``),
  about 4.8 GB. Always all 24 blocks: ComfyUI builds T5-XXL from its fixed config, so a file with
  fewer blocks would leave the rest uninitialised (``torch.empty``) on a CPU.
- ``clip_l.safetensors``: ComfyUI's CLIP-L (HF layout, fp16, 246 MB).
- ``ae.safetensors``: the 16-channel AutoencoderKL Flux shares with SD3 (ComfyUI's
  ``AutoencodingEngine``, no quant convs; fp32, 335 MB, as BFL ships it).

Nothing is ever materialised whole: each model is built on the ``meta`` device for its names and
shapes, and each tensor is drawn, converted and written on its own (:func:`write_safetensors`
streams the file), several at a time on a thread pool. Values are seeded per tensor name, so a
file does not depend on the number of threads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from log_capture import captured_logs

# What comfy.model_detection.detect_unet_config reads from BFL's flux1-dev.safetensors.
FLUX_DEV_CONFIG = {
    "image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
    "out_channels": 16, "qkv_bias": True, "txt_ids_dims": [], "in_channels": 16, "hidden_size": 3072,
    "context_in_dim": 4096, "patch_size": 2, "vec_in_dim": 768, "depth": 19, "depth_single_blocks": 38,
    "guidance_embed": True, "yak_mlp": False, "txt_norm": False,
}  # fmt: skip
#: The files, by role, under the ComfyUI models sub-folder the stock loaders read them from.
FILES = {
    "unet": ("diffusion_models", "flux1-dev.safetensors"),
    "clip_l": ("text_encoders", "clip_l.safetensors"),
    "t5xxl": ("text_encoders", "t5xxl_fp8_e4m3fn.safetensors"),
    "vae": ("vae", "ae.safetensors"),
}
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn has no infinity: a larger value would become NaN
_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3",
}  # fmt: skip

log = logging.getLogger("comfy_flux")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file: its key, shape, stored dtype and how its values are drawn
    (``matrix``: N(0, 1/fan_in); ``norm``: a norm scale, 1 + N(0, 0.1); ``vector``: N(0, 0.02))."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str

    @property
    def numel(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def specs_of(
    module: torch.nn.Module, *, dtype_for, strip: str = "", skip=(), rename=None
) -> list[TensorSpec]:
    """The parameters of a (meta-device) ``module`` as the tensors of a file.

    Args:
        dtype_for: ``(key, shape) -> dtype`` stored in the file.
        strip: a prefix removed from every key (ComfyUI's wrapper modules).
        skip: keys (after ``strip``) that are not in the file.
        rename: ``key -> key`` for names the file spells differently from ComfyUI's module.
    """
    out = []
    for prefix, sub in module.named_modules():
        is_norm = "norm" in type(sub).__name__.lower()
        for name, param in sub.named_parameters(recurse=False):
            key = f"{prefix}.{name}" if prefix else name
            if strip and key.startswith(strip):
                key = key[len(strip) :]
            if key in skip:
                continue
            key = rename(key) if rename else key
            shape = tuple(param.shape)
            if len(shape) >= 2:
                kind = "matrix"
            elif is_norm and name in ("weight", "scale"):
                kind = "norm"
            else:
                kind = "vector"
            out.append(TensorSpec(key, shape, dtype_for(key, shape), kind))
    return out


def draw(spec: TensorSpec, seed: int) -> torch.Tensor:
    """Seeded values of a sane scale for ``spec`` (as ``comfy_models.randomize``), in its dtype."""
    digest = hashlib.sha256(f"{seed}:{spec.key}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    values = torch.randn(spec.shape, generator=generator)
    if spec.kind == "matrix":
        fan_in = values[0].numel()
        values.mul_(fan_in**-0.5)
    elif spec.kind == "norm":
        values.mul_(0.1).add_(1.0)
    else:
        values.mul_(0.02)
    if spec.dtype == FP8:
        values.clamp_(-FP8_MAX, FP8_MAX)
    return values.to(spec.dtype)


def write_safetensors(
    path: Path, specs: list[TensorSpec], *, seed: int, metadata: dict[str, str], threads: int = 1
) -> int:
    """Write a safetensors file tensor by tensor (never the whole model in memory); atomic.

    The header is known from the specs, so each tensor is drawn (:func:`draw`), written and freed
    in turn; ``threads`` draw ahead on a pool, at most ``2 * threads`` tensors at once.

    Returns:
        The file's size in bytes.
    """
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for spec in specs:
        if spec.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{spec.key}: no safetensors name for {spec.dtype}")
        header[spec.key] = {
            "dtype": _SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f, ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        pending: deque = deque()
        todo = iter(specs)
        for spec in todo:
            pending.append(pool.submit(draw, spec, seed))
            if len(pending) >= 2 * max(1, threads):
                break
        while pending:
            tensor = pending.popleft().result()
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
            del tensor
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(draw, nxt, seed))
    os.replace(tmp, path)
    return path.stat().st_size


# --------------------------------------------------------------------------------------------
# The four files (ComfyUI must be imported first: comfy_models._import_comfy)


def flux_specs(*, depth: int = 19, single_depth: int = 38) -> list[TensorSpec]:
    """flux1-dev.safetensors: ComfyUI's Flux model, BFL key names, fp8 matrices and bf16 vectors."""
    import comfy.model_detection

    config = {**FLUX_DEV_CONFIG, "depth": depth, "depth_single_blocks": single_depth}
    model_config = comfy.model_detection.model_config_from_unet_config(dict(config))
    if type(model_config).__name__ != "Flux":
        raise SystemExit(f"ComfyUI matched Flux.1-dev's config to {type(model_config).__name__}, not Flux")
    model_config.set_inference_dtype(torch.bfloat16, None)
    with torch.device("meta"):
        model = model_config.get_model({}, "", device=torch.device("meta"))

    def rename(key: str) -> str:
        # BFL names the q/k RMSNorm scales ".scale"; ComfyUI's Flux.process_unet_state_dict maps them back.
        return key[: -len(".weight")] + ".scale" if key.endswith("_norm.weight") else key

    return specs_of(
        model.diffusion_model,
        dtype_for=lambda key, shape: FP8 if len(shape) >= 2 else torch.bfloat16,
        rename=rename,
    )


def t5xxl_specs() -> list[TensorSpec]:
    """t5xxl_fp8_e4m3fn.safetensors: ComfyUI's T5-XXL encoder, every tensor fp8."""
    import comfy.text_encoders.sd3_clip

    with torch.device("meta"):
        model = comfy.text_encoders.sd3_clip.T5XXLModel(device="meta", dtype=FP8)
    return specs_of(model, dtype_for=lambda key, shape: FP8, strip="transformer.", skip={"logit_scale"})


def clip_l_specs() -> list[TensorSpec]:
    """clip_l.safetensors: ComfyUI's CLIP-L text model in HF's layout, fp16."""
    import comfy.sd1_clip

    with torch.device("meta"):
        model = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16, return_projected_pooled=False)
    return specs_of(
        model, dtype_for=lambda key, shape: torch.float16, strip="transformer.", skip={"logit_scale"}
    )


def vae_specs() -> list[TensorSpec]:
    """ae.safetensors: the 16-channel AutoencoderKL (Flux's and SD3's architecture), fp32."""
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {
        "double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
    }  # fmt: skip
    with torch.device("meta"):
        model = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig},
        )
    return specs_of(model, dtype_for=lambda key, shape: torch.float32)


def detected(specs: dict[str, list[TensorSpec]]) -> dict:
    """What ComfyUI's detection makes of the files' keys, shapes and dtypes (from the specs, on the
    ``meta`` device: nothing is loaded): the diffusion model's supported_models class and whether its
    unet_config is Flux.1-dev's (when the depth is), and each text encoder's ``detect_te_model``."""
    import comfy.model_detection
    import comfy.sd
    import comfy.text_encoders.sd3_clip

    def meta(role):
        return {s.key: torch.empty(s.shape, dtype=s.dtype, device="meta") for s in specs[role]}

    unet = comfy.model_detection.model_config_from_unet(meta("unet"), "")
    t5 = meta("t5xxl")
    return {
        "unet": type(unet).__name__ if unet is not None else None,
        "unet_config": dict(unet.unet_config) if unet is not None else None,
        "t5xxl": comfy.sd.detect_te_model(t5).name,
        "t5xxl_dtype": str(comfy.text_encoders.sd3_clip.t5_xxl_detect(t5).get("dtype_t5")),
        "clip_l": comfy.sd.detect_te_model(meta("clip_l")).name,
    }


def build(out_dir: str | os.PathLike, *, depth: int = 19, single_depth: int = 38, seed: int = 0,
          threads: int = 1) -> dict:  # fmt: skip
    """Write the four Flux.1-dev files into ``out_dir`` (``FILES``' names, flat), all or none:
    they are written into a temporary folder that is renamed at the end.

    Returns:
        Per file: its name, tensors, parameters, bytes and seconds.
    """
    out = Path(out_dir)
    if out.exists():
        raise SystemExit(f"{out} exists; delete it to build the Flux files again")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    builders = {
        "unet": lambda: flux_specs(depth=depth, single_depth=single_depth),
        "clip_l": clip_l_specs,
        "t5xxl": t5xxl_specs,
        "vae": vae_specs,
    }
    report = {"depth": depth, "single_depth": single_depth, "seed": seed, "files": {}}
    if threads > 1:
        torch.set_num_threads(1)  # the pool's workers draw one tensor each; no nested parallelism
    specs_by_role = {}
    for role, make_specs in builders.items():
        name = FILES[role][1]
        started = time.monotonic()
        specs = specs_by_role[role] = make_specs()
        meta = {"comfy_models.build": f"flux {role} seed {seed} depth {depth}/{single_depth}"}
        size = write_safetensors(tmp / name, specs, seed=seed + len(report["files"]), metadata=meta,
                                 threads=threads)  # fmt: skip
        report["files"][name] = {
            "tensors": len(specs),
            "parameters": sum(s.numel for s in specs),
            "bytes": size,
            "seconds": round(time.monotonic() - started, 1),
        }
        log.info("wrote %s: %.2f GB in %.0f s", name, size / 1e9, time.monotonic() - started)
    found = detected(specs_by_role)
    report["detected"] = {k: v for k, v in found.items() if k != "unet_config"}
    report["detected"]["flux1_dev_config"] = found["unet_config"] == {
        **FLUX_DEV_CONFIG, "depth": depth, "depth_single_blocks": single_depth,
    }  # fmt: skip
    try:
        os.replace(tmp, out)
    except OSError:
        if not out.is_dir():
            raise
        # Another build of the same files (a harness prebuild) finished first; they are equal.
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("%s was built meanwhile by another process; kept that one", out)
    return report


def build_t5xxl(out: str | os.PathLike, *, seed: int = 0, threads: int = 1) -> dict:
    """The T5-XXL file alone (``FILES["t5xxl"]``'s, fp8): what the SD3 Medium row gives the Train
    node as its ``t5xxl`` (the file-name trainer casts it to its compute dtype as it loads)."""
    out = Path(out)
    if threads > 1:
        torch.set_num_threads(1)
    started = time.monotonic()
    specs = t5xxl_specs()
    size = write_safetensors(out, specs, seed=seed, metadata={"comfy_models.build": f"t5xxl seed {seed}"},
                             threads=threads)  # fmt: skip
    return {"tensors": len(specs), "parameters": sum(s.numel for s in specs), "bytes": size,
            "seconds": round(time.monotonic() - started, 1)}  # fmt: skip


# --------------------------------------------------------------------------------------------
# What ComfyUI's stock loaders make of them


def check(folder: str | os.PathLike, *, size: int = 64) -> dict:
    """Load the files in ``folder`` with the stock loader nodes as a Flux user wires them
    (UNETLoader fp8_e4m3fn, DualCLIPLoader type flux, VAELoader) and render one step with them
    (FluxGuidance 3.5, KSampler euler/simple cfg 1, VAE Decode) at ``size`` px.

    Returns:
        What ComfyUI detected and loaded (classes, configs, dtypes, log lines about keys) and the
        render's shapes and whether its values are finite.
    """
    import folder_paths
    import node_helpers

    import nodes  # ComfyUI's nodes.py (its checkout is first on sys.path), not the pack's package

    for kind in {folder for folder, _ in FILES.values()}:
        folder_paths.add_model_folder_path(kind, str(folder), is_default=True)
    with captured_logs() as messages:
        (model,) = nodes.UNETLoader().load_unet(FILES["unet"][1], "fp8_e4m3fn")
        (clip,) = nodes.DualCLIPLoader().load_clip(FILES["clip_l"][1], FILES["t5xxl"][1], "flux")
        (vae,) = nodes.VAELoader().load_vae(FILES["vae"][1])
    unet = model.model
    config = unet.model_config.unet_config
    te = clip.cond_stage_model

    (positive,) = nodes.CLIPTextEncode().encode(clip, "k4s4 style, a cat sitting on a windowsill")
    positive = node_helpers.conditioning_set_values(positive, {"guidance": 3.5})
    (negative,) = nodes.CLIPTextEncode().encode(clip, "")
    latent = {"samples": torch.zeros(1, 16, size // 8, size // 8)}
    (samples,) = nodes.common_ksampler(model, 0, 1, 1.0, "euler", "simple", positive, negative, latent)
    (image,) = nodes.VAEDecode().decode(vae, samples)
    cond, extra = positive[0]
    return {
        "unet": {
            "class": type(unet.model_config).__name__,
            "model_class": type(unet).__name__,
            "config": {
                k: config.get(k)
                for k in (
                    "hidden_size",
                    "depth",
                    "depth_single_blocks",
                    "guidance_embed",
                    "context_in_dim",
                    "vec_in_dim",
                    "num_heads",
                )
            },
            "weight_dtype": str(unet.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype),
            "norm_dtype": str(unet.diffusion_model.double_blocks[0].img_attn.norm.query_norm.weight.dtype),
            "compute_dtype": str(unet.manual_cast_dtype or unet.get_dtype()),
            "latent_format": type(unet.latent_format).__name__,
        },
        "clip": {
            "class": type(te).__name__,
            "t5_dtype": str(te.t5xxl.transformer.encoder.final_layer_norm.weight.dtype),
            "clip_l_dtype": str(te.clip_l.transformer.text_model.final_layer_norm.weight.dtype),
            "cond_shape": list(cond.shape),
            "pooled_shape": list(extra["pooled_output"].shape),
            "cond_finite": bool(torch.isfinite(cond).all()),
        },
        "vae": {"class": type(vae.first_stage_model).__name__, "latent_channels": vae.latent_channels},
        "render": {
            "latent_shape": list(samples["samples"].shape),
            "latent_finite": bool(torch.isfinite(samples["samples"]).all()),
            "image_shape": list(image.shape),
            "image_finite": bool(torch.isfinite(image).all()),
        },
        "key_messages": [
            m[:300]
            for m in messages
            if "missing" in m or "left over" in m or "unexpected" in m or "NOT LOADED" in m
        ],
    }
