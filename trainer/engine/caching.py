"""Caches of what the frozen parts compute: VAE latents per (image, bucket) and text-encoder outputs
per caption text.

Both live in memory (CPU tensors) or on disk under ``<output>/finetune/.cache/`` as safetensors
files named by a sha256 key, so a later run on the same images and model reuses them. The key
covers everything the value depends on (file, size, mtime, bucket, crop, flip and the model's
identity), so a changed image or model is never served a stale entry. No pickle.

When caching is allowed is decided here too: latents only when every draw of an image gives the
same pixels (center crop; with flips on, both mirror images are cached), text only when no text
encoder trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import CacheMode, CropMode
from ..runfolder import atomic_write_bytes, runs_root

log = logging.getLogger("finetune")

CACHE_VERSION = "1"


def cache_root(output_dir: str | os.PathLike) -> Path:
    """``<output>/finetune/.cache`` (hidden, so run listings skip it)."""
    return runs_root(output_dir) / ".cache"


def latents_cacheable(*, crop: CropMode | str, mode: CacheMode | str) -> bool:
    """Whether latents may be cached: asked for, and a center crop (a random crop differs per draw)."""
    return CacheMode(mode) != CacheMode.OFF and CropMode(crop) == CropMode.CENTER


def text_cacheable(*, mode: CacheMode | str, train_text_encoder: bool) -> bool:
    """Whether text-encoder outputs may be cached: asked for, and no text encoder is trained."""
    return CacheMode(mode) != CacheMode.OFF and not train_text_encoder


def _sha(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def latent_key(
    *, image_path: str | os.PathLike, bucket: tuple[int, int], crop: str, flipped: bool, vae_identity: str
) -> str:
    """sha256 over the image file's identity (path, size, mtime) and how it was encoded."""
    st = os.stat(image_path)
    return _sha(
        {
            "v": CACHE_VERSION,
            "path": os.path.abspath(image_path),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "bucket": list(bucket),
            "crop": str(crop),
            "flip": bool(flipped),
            "vae": vae_identity,
        }
    )


def text_key(*, text: str, encoder_identity: str) -> str:
    """sha256 of a caption text under one text-encoder setup."""
    return _sha({"v": CACHE_VERSION, "text": text, "te": encoder_identity})


@dataclass
class EncodedImage:
    """A cached latent with SDXL's size conditioning.

    Attributes:
        latents: ``[C, h, w]`` latents, already shifted and scaled for the denoiser.
        original_size, crop_top_left, target_size: ``(h, w)``, ``(top, left)``, ``(h, w)``.
    """

    latents: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        sizes = torch.tensor([*self.original_size, *self.crop_top_left, *self.target_size], dtype=torch.int64)
        return {"latents": self.latents.contiguous(), "sizes": sizes}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> EncodedImage:
        s = [int(v) for v in t["sizes"].tolist()]
        return cls(
            latents=t["latents"],
            original_size=(s[0], s[1]),
            crop_top_left=(s[2], s[3]),
            target_size=(s[4], s[5]),
        )


@dataclass
class EncodedText:
    """A cached text-encoder output: ``prompt_embeds`` ``[seq, dim]`` and ``pooled`` ``[dim]`` (or None)."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"prompt_embeds": self.prompt_embeds.contiguous()}
        if self.pooled is not None:
            out["pooled"] = self.pooled.contiguous()
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> EncodedText:
        return cls(prompt_embeds=t["prompt_embeds"], pooled=t.get("pooled"))


class TensorStore:
    """A key -> tensors store in memory or on disk (``<root>/<key[:2]>/<key>.safetensors``).

    Memory entries are kept on the CPU; disk entries survive the run and are shared between runs.
    A damaged disk entry is treated as missing (and rewritten), never as an error.
    """

    def __init__(self, *, mode: CacheMode | str, root: str | os.PathLike | None = None):
        self.mode = CacheMode(mode)
        if self.mode == CacheMode.DISK and root is None:
            raise ValueError("a disk cache needs a root folder")
        self.root = Path(root) if root is not None else None
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.mode != CacheMode.OFF

    def _path(self, key: str) -> Path:
        if self.root is None:
            raise RuntimeError("this cache has no disk folder")
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if self.mode == CacheMode.OFF:
            return None
        if self.mode == CacheMode.MEMORY:
            value = self._memory.get(key)
        else:
            path = self._path(key)
            try:
                value = load_file(str(path)) if path.is_file() else None
            except (SafetensorError, OSError) as e:
                log.warning("finetune: ignoring a damaged cache entry %s (%s)", path, e)
                value = None
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def has(self, key: str) -> bool:
        """Whether ``key`` is stored (without reading it or counting a hit or miss)."""
        if self.mode == CacheMode.MEMORY:
            return key in self._memory
        return self.mode == CacheMode.DISK and self._path(key).is_file()

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        if self.mode == CacheMode.MEMORY:
            self._memory[key] = cpu
        elif self.mode == CacheMode.DISK:
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            save_file(cpu, str(tmp))
            os.replace(tmp, path)

    def __len__(self) -> int:
        return len(self._memory)


def write_cache_readme(root: Path) -> None:
    """Explain the hidden folder to whoever finds it."""
    readme = root / "README.txt"
    if not readme.exists():
        atomic_write_bytes(
            readme,
            b"Cached VAE latents and text-encoder outputs of comfyui-finetune runs (safetensors).\n"
            b"Safe to delete: runs re-encode what is missing.\n",
        )
