"""Tiny random-weight models built with ComfyUI's own classes, for training on a MODEL in-process.

Each family is ComfyUI's ``supported_models`` class with a small ``unet_config`` (the same model
code ComfyUI runs for the real files; only the widths and depths shrink), wrapped in ComfyUI's
``ModelPatcher`` as a checkpoint loader would return it. The VAE is ComfyUI's ``AutoencoderKL``
(``comfy.sd.VAE`` with a small config; 8x downscale as the real ones). The real text encoders
(T5-XXL, Gemma...) cannot be shrunk through ComfyUI's API, so :class:`WordClip` stands in for the
CLIP object: it has the methods the pack calls (``tokenize``, ``encode_from_tokens``,
``encode_from_tokens_scheduled``) and gives each word a fixed random embedding of the family's
width, so "red" and "blue" condition differently.

Import only under ComfyUI's python with ``COMFYUI_PATH`` set (see :func:`import_comfy`).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch
from comfy_server import RUN_WITH_COMFY_PYTHON

CONTEXT = 32  # text width of every tiny family
POOLED = 32

UNET_SD15 = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "in_channels": 4, "model_channels": 32, "use_temporal_attention": False,
    "use_temporal_resblock": False, "adm_in_channels": None, "num_res_blocks": [2, 2],
    "transformer_depth": [1, 1, 0, 0], "channel_mult": [1, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": CONTEXT, "num_heads": 2,
    "transformer_depth_output": [1, 1, 1, 0, 0, 0],
}  # fmt: skip
UNET_SDXL = {
    **UNET_SD15, "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "model_channels": 64, "use_linear_in_transformer": True, "num_heads": -1, "num_head_channels": 64,
    "num_classes": "sequential",
    "adm_in_channels": POOLED + 6 * 256,
}  # fmt: skip
CONFIGS = {
    # The layout of trainer.models.tiny's SD1.5 UNet (so one set of weights runs in both backends).
    "SD15": UNET_SD15,
    "SDXL": UNET_SDXL,
    "Flux": {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": POOLED,
        "context_in_dim": CONTEXT, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
        "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2,
        "qkv_bias": True, "guidance_embed": True, "txt_ids_dims": [],
    },
    # SD3.5 Medium's layout: RMS q/k norms and a second self-attention in the first x-block.
    "SD3": {
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
        "adm_in_channels": POOLED,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": CONTEXT, "out_features": 128}},
        "num_patches": 64 * 64, "pos_embed_max_size": 64, "pos_embed_scaling_factor": None,
        "qk_norm": "rms", "x_block_self_attn_layers": [0],
    },
    "Lumina2": {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": CONTEXT,
        "n_layers": 2, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2, "axes_dims": [8, 12, 12],
        "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0, "n_refiner_layers": 1,
    },
    "AuraFlow": {
        "in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64, "n_layers": 2, "n_double_layers": 1,
        "n_heads": 2, "global_conddim": 64, "cond_seq_dim": CONTEXT, "max_seq": 64,
    },
}  # fmt: skip
LATENT_CHANNELS = {"SD15": 4, "SDXL": 4, "Flux": 16, "SD3": 16, "Lumina2": 16, "AuraFlow": 4}


def import_comfy():
    """Import ComfyUI from ``COMFYUI_PATH`` for CPU use (``--cpu`` before model_management)."""
    root = os.environ["COMFYUI_PATH"]
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    # torch's SDPA (ComfyUI's --use-pytorch-cross-attention): its CPU default is far slower here.
    comfy.cli_args.args.use_pytorch_cross_attention = True
    try:
        import comfy.lora  # noqa: F401
        import comfy.model_management  # noqa: F401
        import comfy.model_patcher  # noqa: F401
        import comfy.sd  # noqa: F401
        import comfy.supported_models  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"ComfyUI in {root} does not import in {sys.executable} ({e}); {RUN_WITH_COMFY_PYTHON}"
        ) from None
    return comfy


def randomize(module: torch.nn.Module, *, seed: int, scale: float = 1.0) -> None:
    """Seeded values of a sane size for every parameter and persistent float buffer (ComfyUI builds
    layers uninitialised)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            is_norm = "norm" in type(sub).__name__.lower()
            for name, p in sub.named_parameters(recurse=False):
                if p.dim() >= 2:
                    values = torch.randn(p.shape, generator=generator) * scale * p[0].numel() ** -0.5
                elif is_norm and name == "weight":
                    values = 1.0 + 0.1 * torch.randn(p.shape, generator=generator)
                else:
                    values = 0.02 * torch.randn(p.shape, generator=generator)
                p.copy_(values.to(p.dtype))
        # Persistent float buffers are weights a checkpoint carries, and ComfyUI allocates them with
        # torch.empty too (SD3's pos_embed): left alone they hold whatever memory the allocator
        # hands back, zeros in a fresh process, garbage (even NaN) after other tests. Filled after
        # the parameters, so those keep their values.
        for sub in module.modules():
            for name, b in sub.named_buffers(recurse=False):
                if b.is_floating_point() and name not in sub._non_persistent_buffers_set:
                    b.copy_((0.02 * torch.randn(b.shape, generator=generator)).to(b.dtype))


def tiny_model(family: str, *, seed: int = 0, state_dict: dict | None = None):
    """A MODEL (``ModelPatcher``) of ``family`` as ComfyUI builds it, with random weights (or the
    given ``diffusion_model`` state dict), loaded under ``torch.inference_mode`` as ComfyUI's
    loaders run, so its tensors are inference tensors like a real loaded model's."""
    comfy = import_comfy()
    cpu = torch.device("cpu")
    with torch.inference_mode():
        config = getattr(comfy.supported_models, family)(dict(CONFIGS[family]))
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({}, "", device=cpu)
        if state_dict is not None:
            missing, unexpected = model.diffusion_model.load_state_dict(state_dict, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"weights do not fit the tiny {family}: missing {missing[:3]}, unexpected {unexpected[:3]}"
                )
        else:
            randomize(model.diffusion_model, seed=seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def tiny_vae(latent_channels: int, *, seed: int = 1):
    """ComfyUI's VAE (``AutoencoderKL``, 8x downscale) with few channels and random weights."""
    comfy = import_comfy()
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {
        "double_z": True, "z_channels": latent_channels, "resolution": 64, "in_channels": 3, "out_ch": 3,
        "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
    }  # fmt: skip
    params = {"ddconfig": ddconfig, "embed_dim": latent_channels}
    model = AutoencoderKL(**params)
    randomize(model, seed=seed)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        return comfy.sd.VAE(sd=sd, config={"params": params}, dtype=torch.float32)


class WordClip:
    """A stand-in for ComfyUI's CLIP object: each word gets a fixed random vector.

    ``encode_from_tokens`` returns ``cond [1, 8, CONTEXT]`` (one row per word, padded with a fixed
    vector) and ``pooled_output [1, POOLED]`` (the mean of the words' pooled vectors).
    """

    length = 8

    def __init__(self, seed: int = 7):
        self.seed = seed
        self.calls = 0

    def _vector(self, word: str, width: int, salt: str) -> torch.Tensor:
        digest = hashlib.sha256(f"{self.seed}:{salt}:{word}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        return torch.randn(width, generator=generator)

    def tokenize(self, text: str) -> list[str]:
        words = [w for w in text.lower().replace(",", " ").split() if w][: self.length]
        return words + ["<pad>"] * (self.length - len(words))

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.calls += 1
        cond = torch.stack([self._vector(w, CONTEXT, "cond") for w in tokens]).unsqueeze(0)
        pooled = torch.stack([self._vector(w, POOLED, "pooled") for w in tokens]).mean(0, keepdim=True)
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        out = self.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        out.update(add_dict or {})
        return [[cond, out]]


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def colour_dataset(folder: Path, *, size: int = 64) -> Path:
    """Flat-colour images with their colour as caption, in a kohya ``1_colours`` sub-folder."""
    from PIL import Image

    sub = Path(folder) / "1_colours"
    sub.mkdir(parents=True, exist_ok=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (size, size), rgb).save(sub / f"{name}.png")
        (sub / f"{name}.txt").write_text(f"{name}", encoding="utf-8")
    return Path(folder)
