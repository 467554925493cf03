"""The ONE module of the pack that touches ComfyUI's own modules.

ComfyUI modules (``folder_paths``, ``comfy.model_management``, ``comfy.utils``,
``server.PromptServer``) are imported lazily inside functions, so the rest of the pack, and its
tests, import without a ComfyUI checkout. Everything else in ``nodes/`` asks this module.

The file is organised in sections; add new host services as a new section (or at the end of the
matching one) so parallel edits stay additive:

1. Folders: ComfyUI's input/output/temp directories and model folder lists.
2. User paths: checks for folder names typed into widgets (no ``..``, no escape).
3. Server: the PromptServer instance and its HTTP routes.
4. GPU sharing: :class:`ComfyHostHooks`, what background training asks of ComfyUI.
5. Model paths: runs' checkpoint folders registered with ComfyUI's loaders; tokenizer folder.
6. Websocket events: :func:`send_event`.
7. Sampling: encode, sample and decode like the stock nodes; apply a LoRA file; load a diffusion
   model; progress bar and cancel, for checkpoint sweeps.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from ..trainer.engine.events import HostHooks

log = logging.getLogger("finetune")


class UnsafePathError(ValueError):
    """A user-typed path that is empty, escapes its base folder or cannot be found."""


# --------------------------------------------------------------------------------------------
# 1. Folders


def output_directory() -> Path:
    """ComfyUI's output directory (``--output-directory``)."""
    import folder_paths

    return Path(folder_paths.get_output_directory())


def input_directory() -> Path:
    """ComfyUI's input directory (``--input-directory``)."""
    import folder_paths

    return Path(folder_paths.get_input_directory())


def temp_directory() -> Path:
    """ComfyUI's temp directory (``--temp-directory``); emptied when the server starts."""
    import folder_paths

    return Path(folder_paths.get_temp_directory())


def folder_paths_for(folder_name: str) -> list[Path]:
    """Every folder ComfyUI searches for ``folder_name`` ("checkpoints", "loras", "datasets", ...).

    Includes the folders added by ``extra_model_paths.yaml``. An unknown name gives an empty list.
    """
    import folder_paths

    if folder_name not in folder_paths.folder_names_and_paths:
        return []
    return [Path(p) for p in folder_paths.get_folder_paths(folder_name)]


def get_filename_list(folder_name: str) -> list[str]:
    """Files ComfyUI lists for a model folder (what a loader's drop-down shows), sorted."""
    import folder_paths

    return list(folder_paths.get_filename_list(folder_name))


def get_full_path(folder_name: str, filename: str) -> Path:
    """The full path of ``filename`` in ComfyUI's ``folder_name`` folders.

    Raises:
        FileNotFoundError: naming the file and every folder that was searched.
    """
    import folder_paths

    full = folder_paths.get_full_path(folder_name, filename)
    if full is None:
        searched = ", ".join(str(p) for p in folder_paths_for(folder_name)) or "(no such folder type)"
        raise FileNotFoundError(f"{filename!r} is not in ComfyUI's {folder_name!r} folders ({searched})")
    return Path(full)


def dataset_roots() -> list[Path]:
    """Where dataset folders may live: ComfyUI's input directory, then its ``datasets`` folders.

    Users add more roots with a ``datasets:`` entry in ``extra_model_paths.yaml``.
    """
    return [input_directory(), *folder_paths_for("datasets")]


# --------------------------------------------------------------------------------------------
# 2. User paths


def _looks_absolute(text: str) -> bool:
    return (
        PurePosixPath(text).is_absolute() or bool(PureWindowsPath(text).drive) or text.startswith(("/", "\\"))
    )


def is_within(directory: str | os.PathLike, target: str | os.PathLike) -> bool:
    """True if ``target`` resolves (symlinks followed) to ``directory`` or a path inside it."""
    try:
        base = os.path.realpath(directory)
        real = os.path.realpath(target)
        return os.path.commonpath((base, real)) == base
    except ValueError:  # a NUL byte, or different drives on Windows
        return False


def secure_subpath(
    base_dir: str | os.PathLike,
    value: str,
    *,
    field: str,
    allow_absolute: bool = False,
    allow_base: bool = False,
) -> Path:
    """Resolve a user-typed ``value`` inside ``base_dir`` the way ComfyUI's ``secure_subfolder_path`` does.

    Args:
        base_dir: The folder the value must stay inside.
        value: What the user typed, relative to ``base_dir``.
        field: The widget name, used in error messages.
        allow_absolute: Accept an absolute path if it lies inside ``base_dir``.
        allow_base: Accept a value that resolves to ``base_dir`` itself ("." or "").

    Returns:
        The absolute path (not symlink-resolved, so names stay what the user typed).

    Raises:
        UnsafePathError: for an empty value, ``..``, an absolute path, a NUL byte, or a symlink that
            leads outside ``base_dir``; the message quotes the offending value.
    """
    text = value.strip()
    base = Path(os.path.abspath(base_dir))
    if not text and not allow_base:
        raise UnsafePathError(f"{field}: is empty; give a folder name inside {base}")
    if "\x00" in text:
        raise UnsafePathError(f"{field}: {value!r} contains a NUL character")
    if _looks_absolute(text):
        if not allow_absolute:
            raise UnsafePathError(f"{field}: {value!r} is an absolute path; give a path relative to {base}")
        target = Path(os.path.abspath(text))
    else:
        parts = PurePosixPath(text.replace("\\", "/")).parts
        if ".." in parts:
            raise UnsafePathError(f"{field}: {value!r} contains '..'; give a path inside {base} without '..'")
        target = Path(os.path.abspath(base / text))
    if not is_within(base, target):
        raise UnsafePathError(
            f"{field}: {value!r} resolves to {os.path.realpath(target)}, outside {base} (through a symlink?)"
        )
    if not allow_base and os.path.realpath(target) == os.path.realpath(base):
        raise UnsafePathError(f"{field}: {value!r} is {base} itself; name a sub-folder of it")
    return target


def find_folder_in_roots(value: str, roots: Sequence[str | os.PathLike], *, field: str) -> Path:
    """Find an existing folder named by ``value`` under one of ``roots``.

    A relative value is looked up in each root in order; an absolute value is accepted only if it
    lies inside one of the roots (symlinks followed).

    Raises:
        UnsafePathError: the value escapes every root, or no root contains such a folder; the message
            lists the roots searched and how to add one.
    """
    text = value.strip()
    if not text:
        raise UnsafePathError(f"{field}: is empty; give a folder name inside {_list(roots)}")
    hint = "add its parent folder to extra_model_paths.yaml under 'datasets:' to allow it"
    if _looks_absolute(text):
        for root in roots:
            if is_within(root, text) and os.path.realpath(text) != os.path.realpath(root):
                if not os.path.isdir(text):
                    raise UnsafePathError(f"{field}: {value!r} is not a folder")
                return Path(os.path.abspath(text))
        raise UnsafePathError(f"{field}: {value!r} is not inside an allowed folder ({_list(roots)}); {hint}")
    for root in roots:
        target = secure_subpath(root, text, field=field)
        if target.is_dir():
            return target
    raise UnsafePathError(f"{field}: no folder {value!r} in {_list(roots)}")


def _list(paths: Sequence[str | os.PathLike]) -> str:
    return ", ".join(str(p) for p in paths) or "(none)"


def resolve_dataset_folder(value: str, *, field: str = "folder") -> Path:
    """A dataset folder typed into a widget: relative to ComfyUI's input or ``datasets`` folders,
    or absolute inside one of them (see :func:`find_folder_in_roots`)."""
    return find_folder_in_roots(value, dataset_roots(), field=field)


def resolve_output_subfolder(value: str, *, field: str) -> Path:
    """A folder (existing or not) inside ComfyUI's output directory, typed relative to it."""
    return secure_subpath(output_directory(), value, field=field)


# --------------------------------------------------------------------------------------------
# 3. Server


def prompt_server():
    """The running ``server.PromptServer`` instance (None when ComfyUI runs without a server)."""
    from server import PromptServer

    return getattr(PromptServer, "instance", None)


def server_routes():
    """The aiohttp ``RouteTableDef`` ComfyUI adds to its app after custom nodes are loaded."""
    server = prompt_server()
    if server is None:
        raise RuntimeError("ComfyUI's PromptServer is not running; HTTP routes cannot be registered")
    return server.routes


# --------------------------------------------------------------------------------------------
# 4. GPU sharing (the run manager's HostHooks)


class ComfyHostHooks(HostHooks):
    """Lets background training share the GPU with ComfyUI's own prompts.

    - ``free_memory``: unload ComfyUI's models before the trainer loads its own (waiting first for
      a running prompt to finish, since unloading under it would break that prompt).
    - ``reserve``: raise ComfyUI's ``EXTRA_RESERVED_VRAM`` by what the trainers are about to take
      (their cached blocks), so ComfyUI loads its models in low-VRAM mode instead of running out
      of memory; ``reserve(0)`` gives it back.
    - ``make_room``: unload ComfyUI's models until what a paused trainer lent is free again.
    - ``is_busy``: True while ComfyUI runs a prompt or has one queued (the trainer pauses between
      steps).

    Called from training threads. Never touches ``comfy.utils.ProgressBar`` or the interrupt
    flag, which belong to the executing prompt.

    Args:
        busy_wait_s: how long ``free_memory`` waits for a running prompt before giving up on
            unloading (it still empties the cache).
    """

    def __init__(self, *, busy_wait_s: float = 30.0):
        self.busy_wait_s = busy_wait_s
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}  # thread id -> bytes that trainer holds
        self._original_reserved: int | None = None

    def free_memory(self) -> None:
        import comfy.model_management as mm

        deadline = time.monotonic() + self.busy_wait_s
        while self.is_running() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.is_running():
            log.warning(
                "finetune: ComfyUI is still running a prompt; its models stay loaded while the trainer starts"
            )
        else:
            mm.unload_all_models()
        mm.soft_empty_cache()

    def reserve(self, nbytes: int) -> None:
        import comfy.model_management as mm

        with self._lock:
            if self._original_reserved is None:
                self._original_reserved = int(mm.EXTRA_RESERVED_VRAM)
            if nbytes > 0:
                self._held[threading.get_ident()] = int(nbytes)
            else:
                self._held.pop(threading.get_ident(), None)
            mm.EXTRA_RESERVED_VRAM = self._original_reserved + sum(self._held.values())
            if not self._held:
                self._original_reserved = None
        log.info(
            "finetune: ComfyUI now keeps %.0f MiB of VRAM free for training", mm.EXTRA_RESERVED_VRAM / 2**20
        )

    def make_room(self, nbytes: int, keep: tuple = ()) -> bool:
        import comfy.model_management as mm

        device = mm.get_torch_device()
        if nbytes <= 0 or getattr(device, "type", "") != "cuda":
            return True
        if self.is_running():  # never unload under a prompt
            return False
        loaded = [m for m in mm.current_loaded_models if m.model in keep]
        mm.free_memory(nbytes + self._comfy_reserve(), device, keep_loaded=loaded)
        return True

    def free_vram(self, device) -> int | None:
        """Free VRAM on ``device`` less what ComfyUI keeps free for itself (its own
        ``EXTRA_RESERVED_VRAM``, e.g. ``--reserve-vram``; not what trainers added to it)."""
        import comfy.model_management as mm

        if getattr(device, "type", "") != "cuda":
            return None
        return max(0, int(mm.get_free_memory(device)) - self._comfy_reserve())

    def _comfy_reserve(self) -> int:
        """ComfyUI's own ``EXTRA_RESERVED_VRAM`` (``--reserve-vram``), without what trainers added."""
        import comfy.model_management as mm

        with self._lock:
            if self._original_reserved is not None:
                return self._original_reserved
            return int(mm.EXTRA_RESERVED_VRAM)

    def is_busy(self) -> bool:
        """True while a prompt runs or waits in the queue: between back-to-back prompts the run
        stays paused instead of squeezing a step in beside the next render."""
        running, queued = _prompt_queue()
        return bool(running or queued)

    def is_running(self) -> bool:
        """True while a prompt executes (its models must not be unloaded under it)."""
        running, _ = _prompt_queue()
        return bool(running)


def _prompt_queue() -> tuple[list, list]:
    """ComfyUI's running and queued prompts (both empty without a server)."""
    queue = getattr(prompt_server(), "prompt_queue", None)
    if queue is None:
        return [], []
    if hasattr(queue, "get_current_queue_volatile"):  # v0.3.40+: no deep copy of the queue
        running, queued = queue.get_current_queue_volatile()
    else:
        running, queued = queue.get_current_queue()
    return list(running), list(queued)


def vram_for_a_new_run() -> tuple[Any, int | None]:
    """ComfyUI's compute device and the VRAM a run starting now could use: what is free, plus
    what unloading ComfyUI's models (as a run's start does) would free, less ComfyUI's own reserve.
    None for the VRAM when ComfyUI computes on the CPU."""
    import comfy.model_management as mm

    device = mm.get_torch_device()
    if getattr(device, "type", "") != "cuda":
        return device, None
    loaded = sum(m.model_loaded_memory() for m in mm.current_loaded_models if m.device == device)
    return device, max(0, int(mm.get_free_memory(device)) + int(loaded) - int(mm.EXTRA_RESERVED_VRAM))


# --------------------------------------------------------------------------------------------
# 5. Model paths (runs' checkpoint folders in the stock loaders' drop-downs)

#: The ComfyUI model folder a run's checkpoints are listed under, by training method.
MODEL_FOLDER_FOR_METHOD = {"lora": "loras", "full": "diffusion_models"}


def register_run_outputs(run_folder: str | os.PathLike, method: str) -> Path:
    """Add a run's ``checkpoints/`` folder to ComfyUI's model paths, so its files appear in
    *Load LoRA* (LoRA runs) or *Load Diffusion Model* (full runs) without copying or restarting.

    ComfyUI's file-list cache is invalidated when a registered folder is new or its mtime
    changes (a checkpoint renamed into place), so new checkpoints show up on the next listing.

    Args:
        run_folder: ``<output>/finetune/<run>``.
        method: "lora" or "full".

    Returns:
        The registered folder.

    Raises:
        ValueError: an unknown method, naming the valid ones.
    """
    import folder_paths

    kind = MODEL_FOLDER_FOR_METHOD.get(str(method))
    if kind is None:
        raise ValueError(
            f"method {method!r} has no model folder; use one of {', '.join(MODEL_FOLDER_FOR_METHOD)}"
        )
    folder = Path(run_folder) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path(kind, str(folder))
    return folder


def diffusers_model_names() -> list[str]:
    """Diffusers model folders (with a ``model_index.json``) under ComfyUI's ``diffusers`` model
    paths, as paths relative to their root, sorted (what the stock *DiffusersLoader* lists)."""
    names = set()
    for root in folder_paths_for("diffusers"):
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            if "model_index.json" in filenames:
                names.add(Path(os.path.relpath(dirpath, root)).as_posix())
                dirnames[:] = []  # a model's own sub-folders hold no further models
    return sorted(names)


def resolve_diffusers_model(name: str, *, field: str = "diffusers_model") -> Path:
    """The folder of a diffusers model listed by :func:`diffusers_model_names`.

    Raises:
        UnsafePathError: the name escapes the ``diffusers`` folders or is not a model there.
    """
    roots = folder_paths_for("diffusers")
    for root in roots:
        target = secure_subpath(root, name, field=field)
        if (target / "model_index.json").is_file():
            return target
    raise UnsafePathError(
        f"{field}: no diffusers model {name!r} (a folder with model_index.json) in {_list(roots)}"
    )


def comfy_tokenizer_dir() -> Path:
    """ComfyUI's CLIP tokenizer folder (``comfy/sd1_tokenizer``); the trainer finds T5's beside it
    in ``comfy/text_encoders/t5_tokenizer``. Used as ``TrainConfig.tokenizer_dir`` for single files."""
    spec = importlib.util.find_spec("comfy.sd1_clip")
    if spec is None or not spec.origin:
        raise RuntimeError("ComfyUI's comfy.sd1_clip module was not found; is this running inside ComfyUI?")
    return Path(spec.origin).parent / "sd1_tokenizer"


# --------------------------------------------------------------------------------------------
# 6. Websocket events


def send_event(event: str, data: dict) -> None:
    """Send a websocket message to every connected browser. Safe from any thread: ComfyUI's
    ``send_sync`` hands the message to the server's event loop with ``call_soon_threadsafe``."""
    server = prompt_server()
    if server is None:
        return
    server.send_sync(event, data)


# --------------------------------------------------------------------------------------------
# 7. Sampling (checkpoint sweeps): what the stock KSampler, VAEDecode, LoraLoader and
#    UNETLoader nodes do, as plain functions.


def sampler_names() -> list[str]:
    """The sampler names the stock KSampler offers (``comfy.samplers.KSampler.SAMPLERS``)."""
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names() -> list[str]:
    """The scheduler names the stock KSampler offers (``comfy.samplers.KSampler.SCHEDULERS``)."""
    import comfy.samplers

    return list(comfy.samplers.KSampler.SCHEDULERS)


def encode_text(clip, text: str):
    """CONDITIONING for ``text``, as the stock *CLIP Text Encode* node makes it."""
    if clip is None:
        raise ValueError(
            "the clip input is empty: the checkpoint loader gave no text encoder; connect a CLIP"
        )
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def same_text_encoders(clip, other) -> bool:
    """Whether ``other`` encodes text exactly as ``clip`` does: the same object, or a clone of it
    that a LoRA added no text-encoder patch to (stock *Load LoRA* clones the CLIP even for a LoRA
    of the denoiser alone)."""
    if other is clip:
        return True
    if clip is None or other is None:
        return False

    def patch_counts(c) -> dict:
        return {key: len(patches) for key, patches in c.patcher.patches.items()}

    return other.patcher.model is clip.patcher.model and patch_counts(other) == patch_counts(clip)


def sample_image(
    model,
    vae,
    positive,
    negative,
    *,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    width: int,
    height: int,
):
    """Render one image like EmptyLatentImage -> KSampler -> VAEDecode (``nodes.common_ksampler``).

    Returns:
        IMAGE, float [1, height, width, 3] in 0..1.
    """
    import comfy.model_management
    import comfy.sample
    import comfy.utils
    import latent_preview
    import torch

    latent = torch.zeros(
        [1, 4, height // 8, width // 8],
        device=comfy.model_management.intermediate_device(),
        dtype=comfy.model_management.intermediate_dtype(),
    )
    # SD3 has 16 latent channels: ComfyUI widens an empty latent to what the model expects.
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed, None)
    callback = latent_preview.prepare_callback(model, steps)
    samples = comfy.sample.sample(
        model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
        denoise=1.0, callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
    )  # fmt: skip
    images = vae.decode(samples)
    if images.ndim == 5:  # video VAEs give [B, T, H, W, C]
        images = images.reshape(-1, *images.shape[-3:])
    return images[:1]


def apply_lora_file(model, clip, path: str | os.PathLike, *, strength_model: float, strength_clip: float):
    """``(model, clip)`` with the LoRA file patched on, as the stock *Load LoRA* node does; the
    models passed in are not changed (ComfyUI clones them)."""
    import inspect

    import comfy.sd
    import comfy.utils

    lora, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    extra = {}
    # ComfyUI reads LoRA metadata only since 2026; older versions have no such argument.
    if "lora_metadata" in inspect.signature(comfy.sd.load_lora_for_models).parameters:
        extra["lora_metadata"] = metadata
    return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip, **extra)


def load_diffusion_model_file(path: str | os.PathLike):
    """A MODEL from a diffusion-model file, as the stock *Load Diffusion Model* node loads it."""
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(path))


def progress_bar(total: int):
    """The executing node's progress bar (``comfy.utils.ProgressBar``); call ``.update(1)``."""
    import comfy.utils

    return comfy.utils.ProgressBar(total)


def throw_if_interrupted() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel (between renders)."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()
