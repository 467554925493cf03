"""Reading and writing weight files: safetensors headers, guarded pickle loading, atomic saves, hashes."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import ModelLoadError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# A safetensors header larger than this is not a header: it is a different file type.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _truncated(path: str) -> ModelLoadError:
    return ModelLoadError(f"file is truncated or not a safetensors file: {path}", path=path)


def read_safetensors_header(path: str) -> dict[str, dict]:
    """Parse a safetensors header without reading any tensor data.

    Checks that every tensor's byte range lies inside the file, so a truncated download fails here
    with a clear message instead of deep inside torch.

    Args:
        path: The ``.safetensors`` file.

    Returns:
        ``{tensor name: {"dtype", "shape", "data_offsets"}}``, plus ``"__metadata__"`` if present.

    Raises:
        ModelLoadError: The file is missing, truncated or not a safetensors file.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _truncated(path)
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise _truncated(path)
            raw = f.read(n)
    except FileNotFoundError:
        raise ModelLoadError(f"model file not found: {path}", path=path) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _truncated(path) from None
    if not isinstance(header, dict):
        raise _truncated(path)
    data_bytes = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not offsets or len(offsets) != 2 or offsets[1] > data_bytes:
            raise _truncated(path)
    return header


def safetensors_keys(path: str) -> list[str]:
    """The tensor names of a safetensors file (header only, no data read)."""
    return [k for k in read_safetensors_header(path) if k != "__metadata__"]


def safetensors_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` block of a safetensors file ({} when it has none)."""
    return dict(read_safetensors_header(path).get("__metadata__") or {})


def pickle_refused(path: str) -> ModelLoadError:
    """The error for a pickle weight file read without ``allow_pickle``."""
    return ModelLoadError(
        f"refusing to load pickle file {path}: pickle files can run code when opened. "
        "Convert it to .safetensors, or allow pickle files explicitly (loaded with torch.load(weights_only=True)).",
        path=path,
    )


def load_state_dict(path: str, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load every tensor of a single weight file onto the CPU.

    Args:
        path: A ``.safetensors`` file, or a pickle file (``.ckpt``/``.pt``/``.pth``/``.bin``).
        allow_pickle: Pickle files can run code when loaded; they are refused unless this is True,
            and even then read with ``torch.load(weights_only=True)``.

    Returns:
        A flat ``{name: tensor}`` dict (a ``"state_dict"`` wrapper of old checkpoints is unwrapped).

    Raises:
        ModelLoadError: Missing, truncated, refused or unreadable file.
    """
    suffix = Path(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise pickle_refused(path)
        if not os.path.isfile(path):
            raise ModelLoadError(f"model file not found: {path}", path=path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
            raise ModelLoadError(
                f"cannot read pickle checkpoint {path}: {type(e).__name__}: {e}", path=path
            ) from e
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a dict of tensors", path=path)
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if suffix not in SAFETENSORS_SUFFIXES:
        raise ModelLoadError(
            f"unsupported model file type '{suffix}' for {path}; use .safetensors (or .ckpt/.pt/.bin with pickle allowed)",
            path=path,
        )
    read_safetensors_header(path)  # fail early and clearly on truncated files
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors raises SafetensorError for corrupt data
        raise ModelLoadError(f"cannot read {path}: {e}", path=path) from e


def file_keys(path: str, *, allow_pickle: bool = False) -> list[str]:
    """Tensor names of a weight file, cheaply for safetensors (header only)."""
    if Path(path).suffix.lower() in SAFETENSORS_SUFFIXES:
        return safetensors_keys(path)
    return list(load_state_dict(path, allow_pickle=allow_pickle))


def sha256_file(path: str, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (what kohya stores as the base model's hash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str, *, metadata: Mapping[str, str] | None = None
) -> None:
    """Write tensors to ``path`` via a temporary file and ``os.replace``, so a crash never leaves half a file.

    Tensors are made contiguous and moved to the CPU; tensors sharing storage are copied apart
    (safetensors refuses shared storage).

    Args:
        tensors: ``{name: tensor}``.
        path: Destination file; its folder is created.
        metadata: String-to-string metadata for the header.

    Raises:
        TypeError: A metadata key or value is not a string (safetensors requires strings).
    """
    from safetensors.torch import save_file

    meta = dict(metadata or {})
    bad = {k: type(v).__name__ for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; not strings: {bad}")
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        save_file(out, str(tmp), metadata=meta or None)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
