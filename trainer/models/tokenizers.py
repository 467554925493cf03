"""Finding and loading the tokenizers of a base model, offline.

Diffusers folders carry their own (``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/``). Single files
do not, so they come from ``tokenizer_dir``: either a folder with those same sub-folders, or
ComfyUI's own tokenizer folders (``comfy/sd1_tokenizer`` with vocab.json + merges.txt, and
``comfy/text_encoders/t5_tokenizer`` — older ComfyUI: ``comfy/t5_tokenizer`` — beside it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import Arch
from .errors import ModelLoadError

CLIP_MAX_LENGTH = 77
SLOT_FOLDERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
CLIP_FILES = ("vocab.json", "merges.txt")
# SDXL's and SD3's second CLIP tokenizer pads with "!" (id 0), the first with <|endoftext|>;
# padding tokens go through the encoder, so this changes the embeddings.
_CLIP_PAD = {0: "<|endoftext|>", 1: "!"}


def n_slots(arch: Arch) -> int:
    """How many tokenizer / text-encoder slots an architecture has."""
    return {Arch.SD15: 1, Arch.SDXL: 2, Arch.SD3: 3}[arch]


def _has_bpe_files(d: Path) -> bool:
    return all((d / f).is_file() for f in CLIP_FILES)


def _is_clip_dir(d: Path) -> bool:
    # transformers >= 5 saves only tokenizer.json; older saves and ComfyUI ship vocab.json + merges.txt.
    return _has_bpe_files(d) or (d / "tokenizer.json").is_file()


def _is_t5_dir(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or (d / "spiece.model").is_file()


def _clip_candidates(slot: int, model_dir: str, tokenizer_dir: str) -> list[Path]:
    out: list[Path] = []
    if model_dir:
        out.append(Path(model_dir) / SLOT_FOLDERS[slot])
    if tokenizer_dir:
        t = Path(tokenizer_dir)
        out += [t / SLOT_FOLDERS[slot], t / "tokenizer", t, t / "sd1_tokenizer"]
    return out


def _t5_candidates(model_dir: str, tokenizer_dir: str) -> list[Path]:
    out: list[Path] = []
    if model_dir:
        out.append(Path(model_dir) / "tokenizer_3")
    if tokenizer_dir:
        t = Path(tokenizer_dir)
        # ComfyUI keeps T5's at comfy/text_encoders/t5_tokenizer, beside comfy/sd1_tokenizer.
        out += [
            t / "tokenizer_3",
            t / "t5_tokenizer",
            t.parent / "t5_tokenizer",
            t.parent / "text_encoders" / "t5_tokenizer",
            t,
        ]
    return out


def load_clip_tokenizer(folder: str | os.PathLike, *, slot: int = 0) -> Any:
    """A CLIP BPE tokenizer from a folder with vocab.json + merges.txt (or a diffusers tokenizer folder).

    Args:
        folder: The tokenizer folder.
        slot: 0 for the first text encoder, 1 for the second (pads with "!" unless the folder says otherwise).
    """
    from transformers import CLIPTokenizer

    d = Path(folder)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if not (d / "tokenizer_config.json").is_file():
        # A bare vocab/merges pair (ComfyUI's sd1_tokenizer style): say what the real configs say.
        kwargs.update(model_max_length=CLIP_MAX_LENGTH, pad_token=_CLIP_PAD.get(slot, "<|endoftext|>"))
    elif slot == 1 and d.name != "tokenizer_2":
        kwargs["pad_token"] = "!"
    tok = CLIPTokenizer.from_pretrained(str(d), **kwargs)
    # SD's CLIP encoders take 77 positions. Folders may record none (a huge sentinel) or more:
    # ComfyUI's comfy/sd1_tokenizer says 8192 because ComfyUI chunks long prompts itself.
    if tok.model_max_length > CLIP_MAX_LENGTH:
        tok.model_max_length = CLIP_MAX_LENGTH
    return tok


def load_t5_tokenizer(folder: str | os.PathLike) -> Any:
    """A T5 tokenizer from a folder with tokenizer.json or spiece.model."""
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(str(folder), local_files_only=True)


def load_tokenizers(
    arch: Arch, *, model_dir: str = "", tokenizer_dir: str = "", need_t5: bool = True
) -> list[Any]:
    """Load the tokenizers of every text-encoder slot of ``arch``.

    Args:
        arch: SD15 (1 CLIP), SDXL (2 CLIP) or SD3 (2 CLIP + T5).
        model_dir: A diffusers model folder (its tokenizer sub-folders are tried first).
        tokenizer_dir: A folder with tokenizer/, tokenizer_2/, tokenizer_3/ sub-folders, or a
            ComfyUI-style folder with vocab.json + merges.txt (and a t5_tokenizer folder inside or beside it,
            or in ``../text_encoders/``).
        need_t5: SD3 only: False leaves the T5 slot None (no T5 encoder loaded).

    Returns:
        One tokenizer per slot (the SD3 T5 slot may be None).

    Raises:
        ModelLoadError: A needed tokenizer was not found; the message lists where it was looked for.
    """
    out: list[Any] = []
    for slot in range(min(n_slots(arch), 2)):
        tried = _clip_candidates(slot, model_dir, tokenizer_dir)
        found = next((d for d in tried if d.is_dir() and _is_clip_dir(d)), None)
        if found is None:
            where = ", ".join(str(d) for d in tried) or "(no model folder and no tokenizer_dir given)"
            raise ModelLoadError(
                f"CLIP tokenizer for text encoder {slot + 1} not found: it needs vocab.json + merges.txt. "
                f"Looked in: {where}. Pass tokenizer_dir= a folder holding them, e.g. ComfyUI/comfy/sd1_tokenizer "
                "or a diffusers model folder.",
                path=tokenizer_dir or model_dir,
            )
        out.append(load_clip_tokenizer(found, slot=slot))
    if arch == Arch.SD3:
        if not need_t5:
            out.append(None)
        else:
            tried = _t5_candidates(model_dir, tokenizer_dir)
            found = next((d for d in tried if d.is_dir() and _is_t5_dir(d) and not _has_bpe_files(d)), None)
            if found is None:
                where = ", ".join(str(d) for d in tried) or "(no model folder and no tokenizer_dir given)"
                raise ModelLoadError(
                    "T5 tokenizer not found: it needs tokenizer.json or spiece.model. "
                    f"Looked in: {where}. Pass tokenizer_dir= a folder with a t5_tokenizer (ComfyUI/comfy/t5_tokenizer) "
                    "or tokenizer_3 sub-folder, or load without T5.",
                    path=tokenizer_dir or model_dir,
                )
            out.append(load_t5_tokenizer(found))
    return out
