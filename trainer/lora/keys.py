"""Key names of shipped LoRA files, and the conversion from and to peft-style names.

Inside the trainer a LoRA is a "peft-style" dict keyed by module path::

    down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   (rank, in[, k, k])
    down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight   (out, rank[, 1, 1])
    down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.alpha           0-d float

Files use the names that both stock ComfyUI's *Load LoRA* and diffusers' ``load_lora_weights``
apply in full (read from both loaders and measured by ``tests/test_interop_*.py``):

- SD1.5 / SDXL: kohya names, ``lora_unet_`` / ``lora_te_`` (``lora_te1_``, ``lora_te2_`` for SDXL)
  followed by the module path with ``.`` replaced by ``_``, and ``.lora_down.weight`` (= lora_A),
  ``.lora_up.weight`` (= lora_B), ``.alpha``. Raw peft names would lose every UNet attention layer
  in ComfyUI; diffusers converts kohya names itself, alphas included.
- SD3: diffusers/peft names, ``transformer.`` (ComfyUI maps to_q/k/v onto its fused qkv),
  ``text_encoder.`` (CLIP-L) and ``text_encoder_2.`` (CLIP-G), with ``.lora_A.weight`` /
  ``.lora_B.weight`` and **no** ``.alpha``: diffusers' SD3 loader converts nothing and refuses any
  key without "lora" in it, so the scale alpha/rank is multiplied into ``lora_B`` ("folded"), and
  every loader (which applies scale 1.0 without an alpha) applies exactly the trained update. T5
  is never trained (diffusers cannot load a T5 LoRA); it keeps ComfyUI's kohya name ``lora_te3_``.
  Files of earlier versions (``transformer.*.alpha``, ``lora_te1_``/``lora_te2_`` text encoders)
  are still read: see :func:`legacy_layouts`.

Conv layers need no reshaping: peft's lora_A is the k x k conv and lora_B the 1 x 1 conv, exactly
kohya's lora_down / lora_up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from torch import Tensor

from ..config import Arch

# The three per-module entries of a peft-style dict, and their kohya names.
LORA_A = "lora_A.weight"
LORA_B = "lora_B.weight"
ALPHA = "alpha"
_KOHYA_SUFFIX = {LORA_A: "lora_down.weight", LORA_B: "lora_up.weight", ALPHA: "alpha"}
_PEFT_SUFFIX = {v: k for k, v in _KOHYA_SUFFIX.items()}


class KeyStyle(str, Enum):
    KOHYA = "kohya"  # prefix + module path with '_' + .lora_down/.lora_up/.alpha
    PEFT = "peft"  # prefix + module path with '.' + .lora_A/.lora_B/.alpha


@dataclass(frozen=True)
class PartLayout:
    """Where one model part's LoRA lives in a file.

    Attributes:
        part: ``"denoiser"`` or ``"text_encoder"``.
        index: which text encoder (position in ``text_encoders``); 0 for the denoiser.
        prefix: the key prefix, e.g. ``"lora_unet_"`` or ``"transformer."``.
        style: how module paths and suffixes are spelled after the prefix.
    """

    part: str
    index: int
    prefix: str
    style: KeyStyle

    @property
    def label(self) -> str:
        """A short name for messages: ``denoiser``, ``text_encoder[1]``."""
        return "denoiser" if self.part == "denoiser" else f"text_encoder[{self.index}]"


_LAYOUTS: dict[Arch, tuple[PartLayout, ...]] = {
    Arch.SD15: (
        PartLayout("denoiser", 0, "lora_unet_", KeyStyle.KOHYA),
        PartLayout("text_encoder", 0, "lora_te_", KeyStyle.KOHYA),
    ),
    Arch.SDXL: (
        PartLayout("denoiser", 0, "lora_unet_", KeyStyle.KOHYA),
        PartLayout("text_encoder", 0, "lora_te1_", KeyStyle.KOHYA),
        PartLayout("text_encoder", 1, "lora_te2_", KeyStyle.KOHYA),
    ),
    Arch.SD3: (
        PartLayout("denoiser", 0, "transformer.", KeyStyle.PEFT),
        PartLayout("text_encoder", 0, "text_encoder.", KeyStyle.PEFT),
        PartLayout("text_encoder", 1, "text_encoder_2.", KeyStyle.PEFT),
        PartLayout("text_encoder", 2, "lora_te3_", KeyStyle.KOHYA),
    ),
}
# Layouts written by earlier versions, still read (and still loaded by ComfyUI): the SD3 text
# encoders under kohya names, with an .alpha per module.
_LEGACY: dict[Arch, tuple[PartLayout, ...]] = {
    Arch.SD3: (
        PartLayout("text_encoder", 0, "lora_te1_", KeyStyle.KOHYA),
        PartLayout("text_encoder", 1, "lora_te2_", KeyStyle.KOHYA),
    ),
}
# Archs whose files carry alpha/rank multiplied into lora_B and no .alpha key (see the module doc).
_FOLDED: frozenset[Arch] = frozenset({Arch.SD3})


def file_layout(arch: Arch | str) -> tuple[PartLayout, ...]:
    """The parts a LoRA file of ``arch`` holds: the denoiser first, then each text encoder in order.

    Raises:
        ValueError: for ``auto`` or an unknown arch.
    """
    arch = Arch(arch)
    if arch not in _LAYOUTS:
        raise ValueError(
            f"arch: {arch.value!r} has no LoRA file layout; use one of {', '.join(a.value for a in _LAYOUTS)}"
        )
    return _LAYOUTS[arch]


def legacy_layouts(arch: Arch | str) -> tuple[PartLayout, ...]:
    """Other names earlier versions wrote a part of an ``arch`` file under (read, never written)."""
    return _LEGACY.get(Arch(arch), ())


def folds_scale(arch: Arch | str) -> bool:
    """Whether ``arch`` files hold lora_B already multiplied by alpha/rank, with no ``.alpha`` keys."""
    return Arch(arch) in _FOLDED


def canonical_module_name(name: str, *, part: str) -> str:
    """The module path a file names, independent of wrappers and library versions.

    ``torch.compile`` inserts ``_orig_mod.``; transformers 5 dropped the ``text_model.`` level of
    ``CLIPTextModel`` (but not of ``CLIPTextModelWithProjection``), while every loader expects
    ``text_model.encoder.layers.N...`` for CLIP and ``encoder.block.N...`` for T5.
    """
    name = name.replace("_orig_mod.", "")
    if part == "text_encoder":
        for anchor, head in (("encoder.layers.", "text_model."), ("encoder.block.", "")):
            at = name.find(anchor)
            if at == 0 or (at > 0 and name[at - 1] == "."):
                return head + name[at:]
    return name


def split_key(key: str) -> tuple[str, str]:
    """Split a peft-style key into (module path, entry), entry being lora_A.weight, lora_B.weight or alpha.

    Raises:
        KeyError: when the key is not a LoRA entry.
    """
    for entry in (LORA_A, LORA_B, ALPHA):
        if key.endswith("." + entry):
            return key[: -len(entry) - 1], entry
    raise KeyError(f"{key!r} is not a LoRA key (expected it to end in .{LORA_A}, .{LORA_B} or .{ALPHA})")


def peft_to_kohya(state_dict: Mapping[str, Tensor], *, prefix: str) -> dict[str, Tensor]:
    """Rename a peft-style dict to kohya names.

    Args:
        state_dict: ``<module path>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha`` entries.
        prefix: e.g. ``"lora_unet_"``, ``"lora_te1_"``.

    Returns:
        ``<prefix><module_path_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
    """
    out = {}
    for key, tensor in state_dict.items():
        module, entry = split_key(key)
        out[f"{prefix}{module.replace('.', '_')}.{_KOHYA_SUFFIX[entry]}"] = tensor
    return out


def kohya_to_peft(
    state_dict: Mapping[str, Tensor], *, prefix: str, module_names: Iterable[str]
) -> tuple[dict[str, Tensor], list[str]]:
    """Rename kohya keys with ``prefix`` back to peft-style names.

    kohya names are lossy (module names contain ``_`` too), so the real module paths are needed to
    invert them.

    Args:
        state_dict: a file's tensors; keys without ``prefix`` are ignored.
        prefix: the part's prefix, e.g. ``"lora_te_"``.
        module_names: the module paths of the model part (canonical names).

    Returns:
        (peft-style dict, keys with the prefix that name no module or no LoRA entry).
    """
    by_kohya = {name.replace(".", "_"): name for name in module_names}
    out: dict[str, Tensor] = {}
    unmatched: list[str] = []
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        stem, _, suffix = key[len(prefix) :].partition(".")
        module = by_kohya.get(stem)
        if module is None or suffix not in _PEFT_SUFFIX:
            unmatched.append(key)
            continue
        out[f"{module}.{_PEFT_SUFFIX[suffix]}"] = tensor
    return out, unmatched


def peft_to_prefixed(state_dict: Mapping[str, Tensor], *, prefix: str) -> dict[str, Tensor]:
    """Keep peft names and put ``prefix`` (e.g. ``"transformer."``) in front of each key."""
    for key in state_dict:
        split_key(key)
    return {prefix + key: tensor for key, tensor in state_dict.items()}


def prefixed_to_peft(
    state_dict: Mapping[str, Tensor], *, prefix: str, module_names: Iterable[str]
) -> tuple[dict[str, Tensor], list[str]]:
    """Strip ``prefix`` from peft-named keys; the inverse of :func:`peft_to_prefixed`.

    Returns:
        (peft-style dict, keys with the prefix that name no module or no LoRA entry).
    """
    known = set(module_names)
    out: dict[str, Tensor] = {}
    unmatched: list[str] = []
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        inner = key[len(prefix) :]
        try:
            module, _ = split_key(inner)
        except KeyError:
            unmatched.append(key)
            continue
        if module not in known:
            unmatched.append(key)
            continue
        out[inner] = tensor
    return out, unmatched


def to_file_keys(state_dict: Mapping[str, Tensor], layout: PartLayout) -> dict[str, Tensor]:
    """Name a part's peft-style dict the way files of its layout do."""
    if layout.style is KeyStyle.KOHYA:
        return peft_to_kohya(state_dict, prefix=layout.prefix)
    return peft_to_prefixed(state_dict, prefix=layout.prefix)


def from_file_keys(
    state_dict: Mapping[str, Tensor], layout: PartLayout, *, module_names: Iterable[str]
) -> tuple[dict[str, Tensor], list[str]]:
    """Pick a part's entries out of a file's tensors and give them peft-style names.

    Returns:
        (peft-style dict, keys with the part's prefix that match no module).
    """
    if layout.style is KeyStyle.KOHYA:
        return kohya_to_peft(state_dict, prefix=layout.prefix, module_names=module_names)
    return prefixed_to_peft(state_dict, prefix=layout.prefix, module_names=module_names)
