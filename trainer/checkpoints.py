"""The one checkpoint store: how checkpoint files are named, found, ordered, labelled and pruned.

Nobody else parses checkpoint names. Our own runs write ``<run>-step00800.safetensors`` (five digits
at least) and a final ``<run>.safetensors``; folders written by other trainers are read too:

=============================  ==========  ===================================
name (extension removed)        kind        written by
=============================  ==========  ===================================
``run-step00800``               step 800    this pack
``run-step00000800``            step 800    kohya sd-scripts (``--save_every_n_steps``)
``checkpoint-800``              step 800    diffusers / accelerate example scripts (a folder)
``run_000000800``               step 800    ai-toolkit (nine digits)
``run_800_steps``               step 800    various
``run-000004``                  epoch 4     kohya sd-scripts (six digits)
``run-e000004``, ``run_epoch4``  epoch 4     various
``run``                         final       any: a model file with no number
=============================  ==========  ===================================
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("finetune")

Kind = Literal["base", "step", "epoch", "final"]

#: File extensions ComfyUI's model loaders accept (``folder_paths.supported_pt_extensions``) and we list.
MODEL_EXTENSIONS = frozenset({".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin"})
#: Left by an interrupted or in-progress write; never a checkpoint.
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".incomplete", ".crdownload", "~")

# Sort order of kinds: the base model first, then numbered checkpoints, the final file last.
_KIND_RANK = {"base": 0, "step": 1, "epoch": 2, "final": 3}

# Tried in order on the name without its extension; the first match wins.
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("step", re.compile(r"(?:^|[-_.])step[-_]?(\d+)$", re.IGNORECASE)),
    ("step", re.compile(r"^checkpoint[-_](\d+)$", re.IGNORECASE)),
    ("step", re.compile(r"[-_.](\d+)[-_]steps?$", re.IGNORECASE)),
    ("epoch", re.compile(r"(?:^|[-_.])epoch[-_]?(\d+)$", re.IGNORECASE)),
    ("epoch", re.compile(r"[-_.]e(\d+)$", re.IGNORECASE)),
    ("step", re.compile(r"_(\d{9})$")),
    ("epoch", re.compile(r"-(\d{6})$")),
)


@dataclass(frozen=True)
class StepInfo:
    """What a checkpoint's name says about when it was written.

    Attributes:
        kind: "step", "epoch" or "final" (a model file without a number).
        number: the step or epoch number; 0 for "final".
    """

    kind: Kind
    number: int

    @property
    def sort_key(self) -> tuple[int, int]:
        return (_KIND_RANK[self.kind], self.number)


@dataclass(frozen=True)
class CheckpointInfo:
    """One entry of a sweep: a checkpoint file (or folder), or the base model (``path`` None).

    Attributes:
        path: the file or folder; None for the base model (the sweep renders the loaded model).
        step: the training step for "step" checkpoints, else None.
        kind: "base", "step", "epoch" or "final".
        label: what a strip shows under the render: "base", "step 800", "epoch 4", "final".
        number: the step or epoch number (0 for base and final); used for ordering.
    """

    path: Path | None
    step: int | None
    kind: Kind
    label: str
    number: int = 0

    @property
    def sort_key(self) -> tuple[int, int, str]:
        return (_KIND_RANK[self.kind], self.number, self.path.name if self.path else "")

    @property
    def is_base(self) -> bool:
        return self.kind == "base"


BASE = CheckpointInfo(path=None, step=None, kind="base", label="base")


def is_partial(name: str) -> bool:
    """True for hidden files and files an unfinished write leaves behind (``.x.tmp``, ``x.part``)."""
    return name.startswith(".") or name.lower().endswith(PARTIAL_SUFFIXES)


def _stem_if_model(name: str) -> str | None:
    """The name without a model extension; the name itself when it has no extension (a folder);
    None for any other file type (``run.json``, ``sample.png``)."""
    suffix = Path(name).suffix.lower()
    if suffix in MODEL_EXTENSIONS:
        return name[: -len(suffix)]
    # A dotted folder name like "sd1.5-step00800" has a "suffix" that is no extension.
    if re.fullmatch(r"\.[a-z][a-z0-9]{0,4}", suffix):
        return None
    return name


def parse_step(filename: str | os.PathLike) -> StepInfo | None:
    """Read the step or epoch number from a checkpoint's file or folder name.

    Args:
        filename: a name or a path; only its last component is read.

    Returns:
        ``StepInfo("step", 800)`` for ``run-step00800.safetensors``, ``StepInfo("epoch", 4)`` for
        kohya's ``run-000004.safetensors``, ``StepInfo("final", 0)`` for a model file without a
        number (``run.safetensors``), and None for anything that is not a checkpoint: other file
        types, hidden or partial files, and folders without a number.
    """
    name = Path(filename).name
    if not name or is_partial(name):
        return None
    stem = _stem_if_model(name)
    if stem is None:
        return None
    for kind, pattern in _PATTERNS:
        match = pattern.search(stem)
        if match:
            return StepInfo(kind, int(match.group(1)))  # type: ignore[arg-type]
    if stem == name:  # no model extension: a folder (or extensionless file) without a number
        return None
    return StepInfo("final", 0)


def label_for(info: StepInfo) -> str:
    """The strip label: "step 800", "epoch 4" or "final"."""
    return "final" if info.kind == "final" else f"{info.kind} {info.number}"


def checkpoint_info(path: str | os.PathLike) -> CheckpointInfo | None:
    """A :class:`CheckpointInfo` for one path, or None if its name is not a checkpoint's."""
    path = Path(path)
    info = parse_step(path.name)
    if info is None:
        return None
    return CheckpointInfo(
        path=path,
        step=info.number if info.kind == "step" else None,
        kind=info.kind,
        label=label_for(info),
        number=info.number,
    )


# Substrings of tensor names that only LoRA files have (kohya, diffusers, PEFT naming).
_LORA_KEY_MARKERS = (
    "lora_down",
    "lora_up",
    "lora_A.",
    "lora_B.",
    ".lora.down.",
    ".lora.up.",
    "lora_unet_",
    "lora_te",
)
_MAX_HEADER_BYTES = 100 * 2**20


def read_safetensors_header(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """The tensor names and the ``__metadata__`` of a .safetensors file, without loading tensors.

    Raises:
        ValueError: the file is not a readable safetensors file, naming it.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if not 0 < size <= _MAX_HEADER_BYTES:
                raise ValueError(f"header size {size}")
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise ValueError(
            f"{str(path)!r} is not a readable .safetensors file ({exc}); was it written completely?"
        ) from None
    metadata = header.pop("__metadata__", None) or {}
    return list(header), dict(metadata)


def checkpoint_method(path: str | os.PathLike) -> Literal["lora", "full"]:
    """Whether a checkpoint file is a LoRA (patched onto a loaded model) or full model weights.

    Reads only the safetensors header: kohya's ``ss_network_module`` metadata, else LoRA tensor
    names (``lora_down``/``lora_up``, ``lora_A``/``lora_B``).

    Raises:
        ValueError: not a .safetensors file (other formats need unpickling to inspect), naming it.
    """
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ValueError(
            f"cannot tell whether {path.name!r} is a LoRA or a full model: only .safetensors files can be inspected"
        )
    keys, metadata = read_safetensors_header(path)
    if "network" in metadata.get("ss_network_module", "") or any(
        m in k for k in keys for m in _LORA_KEY_MARKERS
    ):
        return "lora"
    return "full"


def _scan(folder: Path) -> list[CheckpointInfo]:
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist or is not a folder")
    found = []
    for entry in folder.iterdir():
        info = checkpoint_info(entry)
        if info is None:
            continue
        if entry.is_dir() and info.kind == "final":
            continue
        found.append(info)
    found.sort(key=lambda c: c.sort_key)
    finals = [c for c in found if c.kind == "final"]
    if len(finals) > 1:
        # Several unnumbered files (a shared LoRA folder): "final" alone would not tell them apart.
        relabelled = {
            id(c): CheckpointInfo(c.path, None, "final", c.path.stem if c.path else "final") for c in finals
        }
        found = [relabelled.get(id(c), c) for c in found]
    return found


def list_checkpoints(
    folder: str | os.PathLike,
    *,
    every_k: int = 1,
    step_min: int | None = None,
    step_max: int | None = None,
    include_base: bool = False,
) -> list[CheckpointInfo]:
    """The checkpoints in ``folder`` (not recursive), ordered base, steps, epochs, final.

    Args:
        folder: a run's ``checkpoints/`` folder or any folder of checkpoints.
        every_k: keep every k-th numbered checkpoint, counted back from the newest so the newest
            is always kept (with 800..4000 every 800 and k=2: 800, 2400, 4000).
        step_min: leave out numbered checkpoints below this step (or epoch) number.
        step_max: leave out numbered checkpoints above it; the final file is left out too when set.
        include_base: put a "base" entry (``path`` None) first.

    Returns:
        The selected entries; hidden and partial files (``.x.tmp``, ``*.part``) never appear.

    Raises:
        ValueError: every_k below 1, or step_min above step_max.
        FileNotFoundError: ``folder`` is missing, naming it.
    """
    if every_k < 1:
        raise ValueError(f"every_k must be 1 or more (got {every_k}); 1 keeps every checkpoint")
    if step_min is not None and step_max is not None and step_min > step_max:
        raise ValueError(f"step_min {step_min} is above step_max {step_max}; swap them or clear one")
    found = _scan(Path(folder))
    numbered = [
        c
        for c in found
        if c.kind in ("step", "epoch")
        and (step_min is None or c.number >= step_min)
        and (step_max is None or c.number <= step_max)
    ]
    n = len(numbered)
    numbered = [c for i, c in enumerate(numbered) if (n - 1 - i) % every_k == 0]
    finals = [c for c in found if c.kind == "final"] if step_max is None else []
    return ([BASE] if include_base else []) + numbered + finals


def fingerprint(folder: str | os.PathLike) -> str:
    """A short hash of the names, sizes and modification times in ``folder`` (not recursive).

    It changes when a checkpoint is added, removed or rewritten, which is what a node cache needs;
    a missing folder has a fingerprint of its own.
    """
    folder = Path(folder)
    digest = hashlib.sha1(usedforsecurity=False)
    if not folder.is_dir():
        digest.update(f"missing:{folder}".encode())
        return digest.hexdigest()[:16]
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if is_partial(entry.name):
            continue
        try:
            st = entry.stat()
        except FileNotFoundError:  # deleted between listing and stat (a prune running)
            continue
        digest.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


class CheckpointStore:
    """The checkpoints of one run: ``<run_dir>/checkpoints/<run>-step00800.safetensors`` and
    ``<run>.safetensors`` for the final one.

    Only files with this run's name are listed or pruned; anything else a user drops in the
    folder is left alone.
    """

    def __init__(self, run_dir: str | os.PathLike, run_name: str):
        if not run_name or "/" in run_name or "\\" in run_name:
            raise ValueError(f"run_name {run_name!r} must be a plain name without slashes")
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self.dir = self.run_dir / "checkpoints"
        self._own = re.compile(rf"^{re.escape(run_name)}(?:-step(\d{{5,}}))?$")

    def path_for(self, step: int) -> Path:
        """Where the checkpoint of ``step`` goes: five digits at least, more when needed."""
        if step < 0:
            raise ValueError(f"step must be 0 or more (got {step})")
        return self.dir / f"{self.run_name}-step{step:05d}.safetensors"

    def final_path(self) -> Path:
        """Where the final checkpoint goes: ``checkpoints/<run>.safetensors``."""
        return self.dir / f"{self.run_name}.safetensors"

    def _is_own(self, info: CheckpointInfo) -> bool:
        return (
            info.path is not None
            and info.path.suffix == ".safetensors"
            and bool(self._own.match(info.path.stem))
        )

    def list(self) -> list[CheckpointInfo]:
        """This run's checkpoints, oldest step first and the final one last ([] if none yet)."""
        if not self.dir.is_dir():
            return []
        return [c for c in _scan(self.dir) if self._is_own(c)]

    def latest(self, *, include_final: bool = True) -> CheckpointInfo | None:
        """The newest checkpoint: the final one if written (and ``include_final``), else the
        highest step; None when there is none."""
        entries = [c for c in self.list() if include_final or c.kind != "final"]
        return entries[-1] if entries else None

    def prune(self, keep: int, *, protect: set[int] | frozenset[int] | tuple[int, ...] = ()) -> list[Path]:
        """Delete all but the newest ``keep`` step checkpoints.

        Args:
            keep: how many step checkpoints to keep; 0 keeps all.
            protect: steps never deleted (e.g. the best validation step); they do not count
                toward ``keep``. The final checkpoint is never deleted.

        Returns:
            The deleted paths, oldest first.
        """
        if keep < 0:
            raise ValueError(f"keep must be 0 (keep all) or more (got {keep})")
        if keep == 0:
            return []
        protected = set(protect)
        steps = [c for c in self.list() if c.kind == "step" and c.step not in protected]
        doomed = steps[:-keep] if len(steps) > keep else []
        deleted = []
        for c in doomed:
            if c.path is None:
                continue
            try:
                c.path.unlink()
            except FileNotFoundError:
                continue
            log.info("finetune: pruned old checkpoint %s", c.path.name)
            deleted.append(c.path)
        return deleted
