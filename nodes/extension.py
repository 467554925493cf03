"""The pack's ComfyExtension: which node modules it serves and what it sets up at load time.

Node modules are optional so the pack keeps loading while parts are being written: a module that
does not exist is skipped; one that exists but fails to import is logged with its traceback under
:data:`LOAD_ERROR_MARKER` and the other modules still load.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from types import ModuleType

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

log = logging.getLogger("finetune")

# (module inside nodes/, the list of node classes it exports)
NODE_MODULES: tuple[tuple[str, str], ...] = (
    ("dataset_nodes", "DATASET_NODES"),
    ("train_nodes", "TRAIN_NODES"),
    ("model_train_nodes", "MODEL_TRAIN_NODES"),
    ("checkpoint_nodes", "CHECKPOINT_NODES"),
)

# Logged when part of the pack fails to load; the test harness fails on it like on IMPORT FAILED.
LOAD_ERROR_MARKER = "comfyui-finetune: failed to load"


def _optional_module(name: str) -> ModuleType | None:
    """Import ``nodes.<name>`` of this pack, or None if the file does not exist."""
    qualified = f"{__package__}.{name}"
    if importlib.util.find_spec(qualified) is None:
        return None
    return importlib.import_module(f".{name}", __package__)


def collect_nodes() -> list[type[io.ComfyNode]]:
    """Every node class of the pack's node modules, in :data:`NODE_MODULES` order."""
    nodes: list[type[io.ComfyNode]] = []
    for module_name, attribute in NODE_MODULES:
        try:
            module = _optional_module(module_name)
        except Exception:
            log.exception("%s nodes/%s.py; its nodes are missing", LOAD_ERROR_MARKER, module_name)
            continue
        if module is None:
            continue
        found = getattr(module, attribute, None)
        if not isinstance(found, (list, tuple)):
            log.error("%s nodes/%s.py: it has no list %s", LOAD_ERROR_MARKER, module_name, attribute)
            continue
        nodes.extend(found)
    return nodes


class FinetuneExtension(ComfyExtension):
    """Starts the pack's run service (run manager + HTTP routes) on load and lists its nodes."""

    @override
    async def on_load(self) -> None:
        global _SERVICE
        if _SERVICE is not None:  # the pack was loaded twice in one process: keep the first service
            return
        try:
            routes = _optional_module("routes")
        except Exception:
            log.exception(
                "%s nodes/routes.py; the pack's HTTP routes and run manager are missing", LOAD_ERROR_MARKER
            )
            return
        if routes is not None:
            _SERVICE = routes.setup()

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return collect_nodes()


# The process's one run service (DESIGN: one run manager per ComfyUI process), created by
# FinetuneExtension.on_load. Read it through running_service(); nothing else assigns it.
_SERVICE = None


def running_service():
    """The pack's ``routes.FinetuneService`` (run manager and websocket bridge) in this process.

    Raises:
        RuntimeError: the pack was not loaded by ComfyUI (no ``on_load`` ran), e.g. in a unit test;
            such tests should build their own ``RunManager`` instead.
    """
    if _SERVICE is None:
        raise RuntimeError(
            "the finetune run service is not running: ComfyUI did not load the pack (or nodes/routes.py failed; see the log)"
        )
    return _SERVICE
