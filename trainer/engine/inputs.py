"""Turning a micro-batch of draws into the denoiser's inputs: latents, text embeddings, time ids.

Images are decoded, fitted to their bucket (flip and crop seeded per draw), and encoded by the VAE
unless the latent cache has them. Captions are encoded per draw, or looked up in the text cache:
with a caption policy that varies (shuffle, dropout), each item gets ``caption_variants`` pre-drawn
variants plus the empty caption, and each draw picks one by ``(seed, epoch, position)``, so the
policy is honoured with a cache too.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from PIL import Image

from ..config import CacheMode, CropMode, TrainConfig
from ..data.buckets import Bucket, PreparedImage, prepare_image
from ..data.captions import caption_variants, caption_varies, choose_variant, draw_caption
from ..data.errors import DatasetError
from ..data.order import Sample
from ..data.scan import ScannedDataset
from ..models.bundle import ModelBundle
from ..models.text import encode_prompts, sdxl_time_ids
from .batches import StepBatches
from .caching import (
    EncodedImage,
    EncodedText,
    TensorStore,
    cache_root,
    latent_key,
    latents_cacheable,
    text_cacheable,
    text_key,
)
from .failures import ImageReadFailure

log = logging.getLogger("finetune")


@dataclass
class DenoiserInputs:
    """One micro-batch ready for the denoiser (all on the training device).

    Attributes:
        latents: ``[B, C, h, w]`` clean latents (shifted and scaled).
        prompt_embeds: ``[B, seq, dim]``.
        pooled: ``[B, dim]`` (SDXL, SD3) or None (SD1.5).
        time_ids: ``[B, 6]`` SDXL size conditioning, else None.
        captions: the caption text each draw used (for logs and tests).
        extras: per draw, what a backend conditions on in its own form (the ComfyUI-model backend:
            the CLIP's outputs and the size conditioning), else None.
    """

    latents: torch.Tensor
    prompt_embeds: torch.Tensor | None
    pooled: torch.Tensor | None
    time_ids: torch.Tensor | None
    captions: list[str]
    extras: list[dict] | None = None


@dataclass(frozen=True)
class PendingImage:
    """A decoded, bucket-fitted image still to be encoded (and cached under ``key``, if set)."""

    key: str | None
    image: PreparedImage


@dataclass(frozen=True)
class InputSettings:
    """The options of the input path (taken from the run's TrainConfig)."""

    seed: int
    crop: CropMode
    flip: bool
    caption_variants: int = 8
    t5_max_length: int = 77

    @classmethod
    def of(cls, config) -> InputSettings:
        """The input options of a run's config (a TrainConfig or anything with its fields)."""
        return cls(
            seed=config.seed,
            crop=config.crop,
            flip=config.flip,
            caption_variants=config.caption_variants,
            t5_max_length=config.t5_max_length,
        )


class InputBuilder:
    """Makes :class:`DenoiserInputs` for draws, through the latent and text caches.

    Args:
        dataset: the scanned dataset.
        buckets: the bucket of every item.
        bundle: the model (its VAE and text encoders are used here).
        settings: seed, crop, flip, variants.
        device: the training device.
        dtype: the dtype embeddings and latents are handed over in.
        latent_store: latent cache (mode OFF when not cacheable).
        text_store: text cache (mode OFF when a text encoder trains).
        vae_identity, text_identity: what cache keys include to tell models apart.
    """

    def __init__(
        self,
        *,
        dataset: ScannedDataset,
        buckets: Sequence[Bucket],
        bundle: ModelBundle,
        settings: InputSettings,
        device: torch.device,
        dtype: torch.dtype,
        latent_store: TensorStore,
        text_store: TensorStore,
        vae_identity: str,
        text_identity: str,
    ):
        self.dataset = dataset
        self.buckets = list(buckets)
        self.bundle = bundle
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.latent_store = latent_store
        self.text_store = text_store
        self.vae_identity = vae_identity
        self.text_identity = text_identity
        self._variants: dict[int, list[str]] = {}

    # ---------------------------------------------------------------------------------------
    # Captions

    def variants(self, item: int) -> list[str]:
        """The pre-drawn caption variants of ``item`` (one when its policy never varies)."""
        cached = self._variants.get(item)
        if cached is None:
            it = self.dataset.items[item]
            policy = self.dataset.policy(item)
            if caption_varies(policy):
                cached = caption_variants(
                    it.caption, policy, seed=self.settings.seed, index=item, k=self.settings.caption_variants
                )
            else:
                cached = [draw_caption(it.caption, policy, seed=self.settings.seed, epoch=1, index=0)]
            self._variants[item] = cached
        return cached

    def caption_for(self, sample: Sample) -> str:
        """The caption text a draw trains with: a cached variant, or a fresh draw without a cache."""
        if not self.text_store.enabled:
            return sample.caption
        variants = self.variants(sample.index)
        if len(variants) == 1:
            return variants[0]
        return choose_variant(
            variants,
            self.dataset.policy(sample.index),
            seed=self.settings.seed,
            epoch=sample.epoch,
            index=sample.position,
        )

    def _encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds = encode_prompts(
            self.bundle, texts, device=self.device, t5_max_length=self.settings.t5_max_length
        )
        return embeds.prompt_embeds, embeds.pooled_embeds

    def text_inputs(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings of ``captions``: from the cache (filling it), or encoded with gradients when
        a text encoder trains."""
        if not self.text_store.enabled:
            return self._encode_texts(captions)
        found: dict[str, EncodedText] = {}
        missing = []
        for text in dict.fromkeys(captions):
            hit = self.text_store.get(text_key(text=text, encoder_identity=self.text_identity))
            if hit is None:
                missing.append(text)
            else:
                found[text] = EncodedText.from_tensors(hit)
        if missing:
            with torch.no_grad():
                prompt, pooled = self._encode_texts(missing)
            for i, text in enumerate(missing):
                # On the CPU like the cache hits, so one batch can mix both; in the compute dtype
                # the encoders ran in (SD3's T5 states are large: bf16 halves the cache).
                enc = EncodedText(
                    prompt[i].to("cpu", self.dtype),
                    pooled[i].to("cpu", self.dtype) if pooled is not None else None,
                )
                self.text_store.put(
                    text_key(text=text, encoder_identity=self.text_identity), enc.to_tensors()
                )
                found[text] = enc
        prompt = torch.stack([found[t].prompt_embeds for t in captions]).to(self.device, self.dtype)
        pooled = None
        if found[captions[0]].pooled is not None:
            pooled = torch.stack([found[t].pooled for t in captions]).to(self.device, self.dtype)  # type: ignore[misc]
        return prompt, pooled

    # ---------------------------------------------------------------------------------------
    # Images

    def _flip_and_rng(self, sample: Sample) -> tuple[bool, random.Random]:
        # One private RNG per draw: the flip is decided first, so the cache key is known before decoding.
        rng = random.Random(f"augment:{self.settings.seed}:{sample.epoch}:{sample.position}")
        flipped = self.settings.flip and rng.random() < 0.5
        return flipped, rng

    def _load(self, item: int) -> Image.Image:
        try:
            return self.dataset.load_image(item)
        except DatasetError as e:
            raise ImageReadFailure(self.dataset.items[item].image_path, str(e)) from e
        except OSError as e:
            raise ImageReadFailure(self.dataset.items[item].image_path, e.strerror or str(e)) from e

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE latents of ``[B, 3, H, W]`` pixels in ``[-1, 1]``: the posterior mean, shifted and
        scaled (the mean, not a sample, so cached and uncached runs train on the same numbers)."""
        vae = self.bundle.vae
        x = pixels.to(device=self.device, dtype=vae.dtype)
        mean = vae.encode(x).latent_dist.mean
        return ((mean.float() - self.bundle.vae_shift_factor) * self.bundle.vae_scaling_factor).float()

    def _latent_key(self, item: int, flipped: bool) -> str:
        return latent_key(
            image_path=self.dataset.items[item].image_path,
            bucket=self.buckets[item],
            crop=self.settings.crop.value,
            flipped=flipped,
            vae_identity=self.vae_identity,
        )

    def _pending(self, item: int, flipped: bool, rng: random.Random, key: str | None) -> PendingImage:
        img = self._load(item)
        if flipped:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        prepared = prepare_image(img, self.buckets[item], crop=self.settings.crop, flip=False, rng=rng)
        return PendingImage(key=key, image=prepared)

    def prepare(self, sample: Sample) -> EncodedImage | PendingImage:
        """The CPU half of a draw's image (safe in a worker thread): a latent-cache hit, or the
        decoded image fitted to its bucket, waiting for the VAE."""
        flipped, rng = self._flip_and_rng(sample)
        key = None
        if self.latent_store.enabled:
            key = self._latent_key(sample.index, flipped)
            hit = self.latent_store.get(key)
            if hit is not None:
                return EncodedImage.from_tensors(hit)
        return self._pending(sample.index, flipped, rng, key)

    def fill_caches(self, *, text_batch: int = 8) -> tuple[int, int]:
        """Encode every caption variant and every (image, flip) latent any draw can ask for and
        the caches lack, so that the encoders can leave the GPU for the rest of the run.

        Images are encoded one at a time: a 1024² VAE encoding alone peaks near 1 GiB, and this
        runs next to the denoiser already on the GPU. Latents are only cached for center crops,
        so the crop needs no random numbers here.

        Returns:
            (latents encoded, texts encoded).
        """
        texts = 0
        if self.text_store.enabled:
            wanted = dict.fromkeys(t for i in range(len(self.dataset.items)) for t in self.variants(i))
            missing = [
                t
                for t in wanted
                if not self.text_store.has(text_key(text=t, encoder_identity=self.text_identity))
            ]
            for start in range(0, len(missing), text_batch):
                self.text_inputs(missing[start : start + text_batch])
            texts = len(missing)
        latents = 0
        if self.latent_store.enabled:
            flips = (False, True) if self.settings.flip else (False,)
            for item in range(len(self.dataset.items)):
                for flipped in flips:
                    key = self._latent_key(item, flipped)
                    if not self.latent_store.has(key):
                        self.encode_pending([self._pending(item, flipped, random.Random(0), key)])
                        latents += 1
        return latents, texts

    def encode_pending(self, items: Sequence[EncodedImage | PendingImage]) -> list[EncodedImage]:
        """The device half: encode the pending images in one VAE batch and fill the latent cache."""
        out: list = list(items)
        pending = [i for i, x in enumerate(items) if isinstance(x, PendingImage)]
        if pending:
            latents = self.encode_pixels(torch.stack([out[i].image.pixels for i in pending]))
            for i, lat in zip(pending, latents, strict=True):
                p = out[i]
                enc = EncodedImage(
                    lat.cpu(), p.image.original_size, p.image.crop_top_left, p.image.target_size
                )
                if p.key is not None:
                    self.latent_store.put(p.key, enc.to_tensors())
                out[i] = enc
        return out

    def image_inputs(self, samples: Sequence[Sample]) -> list[EncodedImage]:
        """Latents and size conditioning of each draw, through the latent cache."""
        return self.encode_pending([self.prepare(s) for s in samples])

    # ---------------------------------------------------------------------------------------

    def build(
        self, samples: Sequence[Sample], prepared: Sequence[EncodedImage | PendingImage] | None = None
    ) -> DenoiserInputs:
        """The denoiser inputs of one micro-batch (all draws share a bucket).

        Args:
            samples: the draws.
            prepared: their images from :meth:`prepare` (e.g. done ahead by a worker); prepared
                here when None.
        """
        images = self.encode_pending(prepared if prepared is not None else [self.prepare(s) for s in samples])
        captions = [self.caption_for(s) for s in samples]
        prompt, pooled = self.text_inputs(captions)
        prompt = prompt.to(self.device, self.dtype)
        pooled = pooled.to(self.device, self.dtype) if pooled is not None else None
        latents = torch.stack([e.latents for e in images]).to(self.device, torch.float32)
        time_ids = None
        if self.bundle.arch.value == "sdxl":
            time_ids = torch.stack(
                [sdxl_time_ids(e.original_size, e.crop_top_left, e.target_size) for e in images]
            ).to(self.device, self.dtype)
        return DenoiserInputs(
            latents=latents, prompt_embeds=prompt, pooled=pooled, time_ids=time_ids, captions=captions
        )


def input_builder_for(
    config: TrainConfig,
    *,
    bundle: ModelBundle,
    dataset: ScannedDataset,
    buckets: Sequence[Bucket],
    device: torch.device,
    dtype: torch.dtype,
    trains_text_encoder: bool,
) -> InputBuilder:
    """The run's :class:`InputBuilder`, with caches turned off where they are not allowed.

    A model built in memory (no source file) has no identity to key a disk cache with, so its
    caches stay in memory.
    """
    identity = f"{bundle.arch.value}:{bundle.source_hash or bundle.source}"
    latent_mode, text_mode = config.cache_latents, config.cache_text
    if not bundle.source:
        latent_mode = CacheMode.MEMORY if latent_mode == CacheMode.DISK else latent_mode
        text_mode = CacheMode.MEMORY if text_mode == CacheMode.DISK else text_mode
    if not latents_cacheable(crop=config.crop, mode=latent_mode):
        latent_mode = CacheMode.OFF
    if not text_cacheable(mode=text_mode, train_text_encoder=trains_text_encoder):
        text_mode = CacheMode.OFF
    root = cache_root(config.output_dir)
    return InputBuilder(
        dataset=dataset,
        buckets=buckets,
        bundle=bundle,
        settings=InputSettings.of(config),
        device=device,
        dtype=dtype,
        latent_store=TensorStore(mode=latent_mode, root=root / "latents"),
        text_store=TensorStore(mode=text_mode, root=root / "text"),
        vae_identity=f"{identity}:{bundle.vae.dtype}:{bundle.vae_scaling_factor}:{bundle.vae_shift_factor}",
        text_identity=f"{identity}:{dtype}:t5={config.use_t5}:{config.t5_max_length}",
    )


class Prefetcher:
    """Prepares the images of the next optimizer step in worker threads while this one trains.

    Decoding and resizing (PIL) release the GIL, so threads overlap them with the GPU work. Each
    draw's flip and crop are seeded by the draw itself, so the result does not depend on timing.
    With ``workers`` 0 everything is prepared on the calling thread, when asked.

    Args:
        builder: the run's input builder.
        workers: worker threads (the config's ``dataloader_workers``).
    """

    def __init__(self, builder: InputBuilder, *, workers: int):
        self.builder = builder
        self.pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="finetune-data")
            if workers > 0
            else None
        )
        self._ahead: tuple[StepBatches, list[list[Future]]] | None = None

    def submit(self, step: StepBatches) -> None:
        """Start preparing ``step``'s images (no-op without workers)."""
        if self.pool is None:
            return
        futures = [[self.pool.submit(self.builder.prepare, s) for s in micro] for micro in step.micro_batches]
        self._ahead = (step, futures)

    def take(self, step: StepBatches) -> list[list[EncodedImage | PendingImage]]:
        """The prepared images of ``step``'s micro-batches: the workers' results if ``step`` was
        submitted, else prepared now. A worker's error is raised here."""
        if self._ahead is not None and self._ahead[0] is step:
            futures = self._ahead[1]
            self._ahead = None
            return [[f.result() for f in micro] for micro in futures]
        return [[self.builder.prepare(s) for s in micro] for micro in step.micro_batches]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
