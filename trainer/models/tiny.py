"""Tiny models of the real architectures, for tests and the demo workflow.

The classes are the real ones (diffusers UNet / SD3 transformer / AutoencoderKL, transformers CLIP
and T5); only the sizes shrink, so loading, conversion, LoRA injection and training exercise the same
code paths as the full models while a forward pass takes milliseconds on a CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..config import Arch
from .bundle import ModelBundle
from .configs import (
    CONFIG_ROOT,
    EMBEDDED_CONFIGS_KEY,
    EMBEDDED_TOKENIZER_KEY,
    embedded_configs,
    embedded_tokenizer,
    scheduler_for,
)
from .convert import bundle_to_original
from .files import save_safetensors_atomic
from .tokenizers import load_tokenizers

TINY_TOKENIZER_DIR = CONFIG_ROOT / "tiny_tokenizer"

# Words that get whole-word BPE merges in the tiny CLIP vocab; any other text still tokenizes
# (byte-level characters are all in the vocab), just into more pieces.
TINY_WORDS = (
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "with",
    "and",
    "photo",
    "painting",
    "drawing",
    "style",
    "portrait",
    "cat",
    "dog",
    "man",
    "woman",
    "red",
    "blue",
    "green",
    "hat",
    "sks",
    "k4s4",
    "low",
    "quality",
    "blurry",
)

# Sizes. The CLIP encoders differ in width on purpose, so swapping them fails loudly in tests.
CLIP_L = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
}
CLIP_G = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": 48,
    "hidden_act": "gelu",
}
T5 = {
    "d_model": 96,
    "d_kv": 16,
    "num_heads": 2,
    "d_ff": 128,
    "num_layers": 2,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "tie_word_embeddings": False,
}
ADD_TIME_DIM = 8


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (the byte-level BPE alphabet)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def tiny_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary laid out like the real one: 256 byte characters, the same with ``</w>``,
    merges for :data:`TINY_WORDS`, then ``<|startoftext|>`` and ``<|endoftext|>`` last."""
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            joined = pieces[0] + pieces[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(joined, len(vocab))
            pieces = [joined, *pieces[2:]]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def tiny_t5_vocab() -> list[tuple[str, float]]:
    """A unigram vocabulary for a tiny T5 tokenizer: T5's special ids (pad 0, eos 1, unk 2), single
    characters, and whole words preferred over spelling them out."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?-'()"
    pieces += [(c, -5.0) for c in alphabet]
    pieces += [("▁" + w, -1.0) for w in TINY_WORDS]
    return pieces


def write_tiny_tokenizer_files(folder: str | os.PathLike) -> Path:
    """Write the tiny tokenizers in ComfyUI's layout: vocab.json + merges.txt (+ tokenizer_config.json)
    in ``folder``, and a T5 tokenizer in ``folder/t5_tokenizer``.

    Returns:
        The folder.
    """
    from transformers import T5Tokenizer

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_clip_vocab()
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (d / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    t5 = T5Tokenizer(vocab=tiny_t5_vocab(), extra_ids=0, model_max_length=512)
    t5.save_pretrained(str(d / "t5_tokenizer"))
    return d


def tiny_tokenizers(arch: Arch) -> list[Any]:
    """The tiny tokenizers for ``arch`` from the shipped files (the same loader real models use)."""
    return load_tokenizers(arch, tokenizer_dir=str(TINY_TOKENIZER_DIR))


def _clip(cls: type, sizes: dict, tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        **sizes,
    )
    return cls(cfg).eval()


def _unet(arch: Arch, cross_dim: int, pooled_dim: int = 0) -> Any:
    from diffusers import UNet2DConditionModel

    if arch == Arch.SD15:
        return UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_dim,
            attention_head_dim=2,
        )
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=cross_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADD_TIME_DIM,
        projection_class_embeddings_input_dim=6 * ADD_TIME_DIM + pooled_dim,
    )


def _vae(arch: Arch) -> Any:
    from diffusers import AutoencoderKL

    common = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )
    if arch == Arch.SD3:
        return AutoencoderKL(
            **common,
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    return AutoencoderKL(
        **common, latent_channels=4, scaling_factor=0.18215 if arch == Arch.SD15 else 0.13025
    )


def tiny_bundle(arch: Arch, *, seed: int = 0, with_t5: bool = True) -> ModelBundle:
    """Build a tiny, randomly initialised model of the real architecture.

    SD1.5: UNet (32, 64) channels with cross-attention 32 from one CLIP (width 32).
    SDXL: UNet with "text_time" conditioning and two CLIP encoders (widths 32 and 48, the second
    with projection; cross-attention 80). SD3: a 2-layer MMDiT with 16 latent channels, CLIP-L
    (32) + CLIP-G (48) + T5 (96 = joint attention dim). VAEs downscale by 2.

    Args:
        arch: SD15, SDXL or SD3.
        seed: Initialisation seed (the global RNG is left untouched).
        with_t5: SD3 only: False leaves the T5 slot empty, as when T5 is not loaded.

    Returns:
        A :class:`ModelBundle` in fp32 on the CPU, ``source`` "".
    """
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if arch not in (Arch.SD15, Arch.SDXL, Arch.SD3):
        raise ValueError(f"tiny_bundle needs arch sd15, sdxl or sd3, got {arch!r}")
    tokenizers = tiny_tokenizers(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == Arch.SD15:
            encoders = [_clip(CLIPTextModel, CLIP_L, tokenizers[0])]
            denoiser = _unet(arch, CLIP_L["hidden_size"])
        elif arch == Arch.SDXL:
            encoders = [
                _clip(CLIPTextModel, CLIP_L, tokenizers[0]),
                _clip(CLIPTextModelWithProjection, CLIP_G, tokenizers[1]),
            ]
            denoiser = _unet(arch, CLIP_L["hidden_size"] + CLIP_G["hidden_size"], CLIP_G["projection_dim"])
        else:
            t5 = T5EncoderModel(
                T5Config(
                    vocab_size=len(tokenizers[2]),
                    pad_token_id=0,
                    eos_token_id=1,
                    decoder_start_token_id=0,
                    **T5,
                )
            ).eval()
            encoders = [
                _clip(CLIPTextModelWithProjection, CLIP_L, tokenizers[0]),
                _clip(CLIPTextModelWithProjection, CLIP_G, tokenizers[1]),
                t5 if with_t5 else None,
            ]
            if not with_t5:
                tokenizers[2] = None
            denoiser = SD3Transformer2DModel(
                sample_size=8,
                patch_size=2,
                in_channels=16,
                out_channels=16,
                num_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=T5["d_model"],
                caption_projection_dim=32,
                pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"],
                pos_embed_max_size=32,
            )
        vae = _vae(arch)
    prediction = "flow" if arch == Arch.SD3 else "epsilon"
    return ModelBundle(
        arch=arch,
        denoiser=denoiser.eval(),
        vae=vae.eval(),
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=scheduler_for(arch, prediction_type=prediction),
        prediction_type=prediction,
        source="",
        vae_scaling_factor=float(vae.config.scaling_factor),
        vae_shift_factor=float(vae.config.shift_factor or 0.0),
    )


def save_tiny_checkpoint(
    bundle: ModelBundle, path: str | os.PathLike, *, single_file: bool, include_text_encoders: bool = True
) -> str:
    """Save a bundle the way real models ship, so loading it exercises the real loaders.

    Args:
        bundle: Usually from :func:`tiny_bundle` (any bundle works).
        path: A folder (diffusers layout) or a ``.safetensors`` file (single file).
        single_file: True writes ONE safetensors in the original ldm/ComfyUI layout
            (``model.diffusion_model.*``, ``first_stage_model.*``, text encoders under their
            original prefixes, SDXL's second encoder in OpenCLIP layout); False writes a diffusers
            folder (``model_index.json``, one sub-folder per component, tokenizers).
        include_text_encoders: Single file only: False leaves the text encoders out (as in
            SD3 files shipped without them).

    Returns:
        The path written.
    """
    path = str(path)
    if single_file:
        save_safetensors_atomic(
            bundle_to_original(bundle, include_text_encoders=include_text_encoders),
            path,
            metadata={
                EMBEDDED_CONFIGS_KEY: embedded_configs(bundle),
                EMBEDDED_TOKENIZER_KEY: embedded_tokenizer(TINY_TOKENIZER_DIR),
            },
        )
        return path
    from .pipelines import make_pipeline

    pipe = make_pipeline(bundle)
    # Save the training scheduler (its config is what a loader reads back), not the sampler.
    pipe.register_modules(scheduler=bundle.noise_scheduler)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
