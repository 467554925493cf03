"""Resume state: everything needed to continue a run exactly where a checkpoint left it.

One folder per saved step under the run's ``state/``::

    state/step-00800/
        state.json             position, scheduler, Python RNG, optimizer scalars and groups
        trainable.safetensors  the trainable weights (LoRA or full), by parameter name
        optimizer.safetensors  the optimizer's tensors, keyed ``<param index>/<key>``
        rng.safetensors        torch CPU/CUDA RNG and the noise generator's state

No pickle anywhere. A save writes ``state/.tmp-step-00800`` and renames it into place, so a crash
leaves the previous state whole; older states are then deleted (a full fine-tune's optimizer state
is twice the model).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("finetune")

STATE_VERSION = 1
_STATE_DIR = re.compile(r"^step-(\d{5,})$")


class StateError(RuntimeError):
    """A resume state that is missing, damaged or does not fit the run being resumed."""


@dataclass
class Position:
    """Where the run is: ``step`` optimizer steps done; the next one is batch group ``step_in_epoch``
    of ``epoch`` (both 0-based)."""

    step: int
    epoch: int
    step_in_epoch: int
    extra: dict[str, Any] = field(default_factory=dict)


def state_dir_for(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:05d}"


def list_states(root: str | Path) -> list[tuple[int, Path]]:
    """Complete states under ``root`` as ``(step, path)``, oldest first (temp folders ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STATE_DIR.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_state(root: str | Path) -> Path | None:
    """The newest complete state folder, or None."""
    states = list_states(root)
    return states[-1][1] if states else None


# ------------------------------------------------------------------------------------------------
# Optimizer state <-> (tensors, JSON)


def _split_entry(entry: dict, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Move an optimizer state entry's tensors into ``tensors`` (keyed ``prefix/key[/subkey…]``) and
    return the rest. Entries nest: bitsandbytes keeps its 8-bit state and quantisation maps in a
    dict of tensors under ``__bnb_optimizer_quant_state__``."""
    rest: dict[str, Any] = {}
    for key, value in entry.items():
        name = f"{prefix}/{key}"
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().to("cpu").contiguous()
        elif isinstance(value, dict):
            rest[key] = _split_entry(value, name, tensors)
        else:
            rest[key] = value
    return rest


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars = {str(pid): _split_entry(entry, str(pid), tensors) for pid, entry in sd["state"].items()}
    # safetensors refuses tensors that share memory, and bitsandbytes shares one quantisation map
    # among all its parameters: each gets its own copy (256 floats).
    stored: set[int] = set()
    for name, tensor in tensors.items():
        where = tensor.untyped_storage().data_ptr()
        if where in stored:
            tensors[name] = tensor.clone()
        else:
            stored.add(where)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {
        "scalars": {pid: rest for pid, rest in scalars.items() if rest},
        "param_groups": groups,
        "tensor_pids": sorted({int(k.split("/")[0]) for k in tensors}),
    }


def _merge(into: dict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            _merge(into.setdefault(key, {}), value)
        else:
            into[key] = value


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, *path, key = name.split("/")
        entry = state.setdefault(int(pid), {})
        for part in path:
            entry = entry.setdefault(part, {})
        entry[key] = value
    for pid, rest in meta["scalars"].items():
        _merge(state.setdefault(int(pid), {}), rest)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _jsonable(value: Any) -> Any:
    """Scheduler state dicts hold floats, ints, lists and None; anything else is refused loudly."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in the resume state's JSON")


# ------------------------------------------------------------------------------------------------
# Save / load


def save_state(
    root: str | Path,
    *,
    position: Position,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    noise_generator: torch.Generator,
    keep_previous: bool = False,
) -> Path:
    """Write the resume state of ``position.step`` atomically and return its folder.

    Args:
        root: the run's ``state/`` folder.
        position: where the run is.
        params: the trainable parameters by stable name (what :func:`load_state` fills again).
        optimizer, scheduler: their ``state_dict()`` is stored.
        noise_generator: the objective's noise generator.
        keep_previous: keep older states (default: delete them once this one is in place).

    Raises:
        OSError: the write failed (disk full...); the previous state is left as it was.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = state_dir_for(root, position.step)
    tmp = root / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in params.items()},
            str(tmp / "trainable.safetensors"),
        )
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch_cpu": torch.get_rng_state(), "noise": noise_generator.get_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        py_state = random.getstate()
        meta = {
            "version": STATE_VERSION,
            "saved_at": time.time(),
            "step": position.step,
            "epoch": position.epoch,
            "step_in_epoch": position.step_in_epoch,
            "extra": _jsonable(position.extra),
            "param_names": sorted(params),
            "optimizer": opt_meta,
            "scheduler": _jsonable(scheduler.state_dict()),
            "python_random": [py_state[0], list(py_state[1]), py_state[2]],
            "noise_device": str(noise_generator.device),
        }
        (tmp / "state.json").write_text(json.dumps(_jsonable(meta), indent=1), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not keep_previous:
        for step, path in list_states(root):
            if step != position.step:
                shutil.rmtree(path, ignore_errors=True)
    return final


def read_position(path: str | Path) -> Position:
    """The position stored in a state folder, without loading any tensors."""
    meta = _read_meta(Path(path))
    return Position(
        step=meta["step"],
        epoch=meta["epoch"],
        step_in_epoch=meta["step_in_epoch"],
        extra=meta.get("extra", {}),
    )


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StateError(f"resume state {path} has no state.json; it is incomplete") from None
    except json.JSONDecodeError as e:
        raise StateError(f"resume state {path / 'state.json'} is damaged: {e.msg}") from None
    if meta.get("version") != STATE_VERSION:
        raise StateError(
            f"resume state {path} has version {meta.get('version')!r}; this trainer reads version {STATE_VERSION}"
        )
    return meta


def load_state(
    path: str | Path,
    *,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    noise_generator: torch.Generator,
) -> Position:
    """Restore a state written by :func:`save_state` into live objects.

    Args:
        path: a state folder (``state/step-00800``).
        params: the run's trainable parameters by the same names as when saved; their values
            are overwritten in place.
        optimizer, scheduler, noise_generator: restored in place.

    Returns:
        The stored :class:`Position`.

    Raises:
        StateError: missing files or parameters that do not match (a different LoRA rank, targets
            or method than the run that saved it).
    """
    path = Path(path)
    meta = _read_meta(path)
    missing = sorted(set(params) - set(meta["param_names"]))
    extra = sorted(set(meta["param_names"]) - set(params))
    if missing or extra:
        raise StateError(
            f"resume state {path} does not fit this run: {len(missing)} trainable weights missing "
            f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}). "
            "Resume with the same method, LoRA rank and targets, or start a new run."
        )
    try:
        weights = load_file(str(path / "trainable.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except FileNotFoundError as e:
        raise StateError(f"resume state {path} is incomplete: {e.filename} is missing") from None
    with torch.no_grad():
        for name, p in params.items():
            value = weights[name]
            if value.shape != p.shape:
                raise StateError(
                    f"resume state {path}: {name} has shape {tuple(value.shape)}, the run has {tuple(p.shape)}"
                )
            p.copy_(value.to(device=p.device, dtype=p.dtype))
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(rng["torch_cpu"])
    noise_generator.set_state(rng["noise"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return Position(
        step=meta["step"],
        epoch=meta["epoch"],
        step_in_epoch=meta["step_in_epoch"],
        extra=meta.get("extra", {}),
    )
