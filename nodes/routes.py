"""The pack's HTTP routes (all under ``/finetune/``) and its one run service.

Routes (JSON unless said otherwise; errors are ``{"error": message}``):

=======  ==========================================  =============================================
GET      /finetune/runs                              ``{"runs": [RunInfo...]}`` (no config/plan)
GET      /finetune/runs/{name}                       RunInfo with config and plan
GET      /finetune/runs/{name}/metrics?since=N       ``{"run", "rows": [...]}``: rows with step > N
POST     /finetune/runs/{name}/stop|pause|resume     the RunInfo after the action
GET      /finetune/runs/{name}/samples               ``{"run", "samples": [{"file","step","index","url"}]}``
GET      /finetune/runs/{name}/samples/{file}        the PNG
GET      /finetune/runs/{name}/checkpoints           ``{"run", "checkpoints": [{"file","label",...}]}``
=======  ==========================================  =============================================

A RunInfo is ``{name, state, step, total, loss, lr, samples_per_s, eta_s, epoch, message,
latest_sample, latest_sample_url, folder, external[, config, plan]}``; NaN values are null.

Status codes: 400 for a name or file that would leave the runs folder ('..', absolute,
symlink out) or a bad query value, 404 for an unknown run or file, 409 for an action the run's
state does not allow. ComfyUI also serves every route under ``/api``.

The handlers are thin: the logic is in :mod:`trainer.runs` (``RunManager``, ``queries``), which
tests drive without ComfyUI; :func:`register_routes` works on any aiohttp ``RouteTableDef``.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from ..trainer.engine.events import Callbacks, RunState
from ..trainer.runfolder import RunPathError
from ..trainer.runs import RunInfo, RunManager, RunNotFound, RunStateError
from ..trainer.runs.queries import json_safe, list_run_checkpoints, list_samples, open_run, sample_file
from .progress import WebsocketProgress, sample_url

log = logging.getLogger("finetune")

# How long ComfyUI's exit waits for running runs to finish their step and save. A full
# fine-tune's resume state is the largest write (SDXL: ~30 GB of fp32 weights and AdamW moments).
SHUTDOWN_TIMEOUT_S = 300.0


# --------------------------------------------------------------------------------------------
# Routes


class BadQuery(ValueError):
    """A query-string value the route cannot use; answered with 400 and the message."""


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _answer(fn: Callable[..., Any], *args: Any) -> web.Response:
    """Run ``fn`` off the event loop (it reads files) and turn its result or error into a response."""
    try:
        result = await asyncio.to_thread(fn, *args)
    except (RunPathError, BadQuery) as e:
        return _error(400, str(e))
    except RunNotFound as e:
        return _error(404, str(e))
    except FileNotFoundError as e:
        return _error(404, str(e))
    except RunStateError as e:
        return _error(409, str(e))
    if isinstance(result, web.StreamResponse):
        return result
    return web.json_response(json_safe(result))


def _since(request: web.Request) -> int:
    raw = request.query.get("since", "0")
    try:
        since = int(raw)
    except ValueError:
        raise BadQuery(f"since must be a whole step number, got {raw!r}") from None
    return since


def info_json(info: RunInfo, *, detail: bool = True) -> dict[str, Any]:
    """A RunInfo as the routes send it: ``latest_sample_url`` added (None before the first sample)."""
    data = info.to_dict(detail=detail)
    data["latest_sample_url"] = sample_url(info.name, info.latest_sample) if info.latest_sample else None
    return data


def register_routes(
    routes: web.RouteTableDef, manager: RunManager, runs_root: str | os.PathLike | None = None
) -> None:
    """Add the ``/finetune/`` routes to ``routes`` (ComfyUI's ``PromptServer.instance.routes``).

    Args:
        routes: an aiohttp route table; ComfyUI adds it to its app after loading custom nodes.
        manager: the run manager the routes control.
        runs_root: the folder of run folders; default ``manager.runs_root``.
    """
    root = Path(runs_root) if runs_root is not None else manager.runs_root

    @routes.get("/finetune/runs")
    async def runs(request: web.Request) -> web.Response:
        return await _answer(lambda: {"runs": [info_json(info, detail=False) for info in manager.list()]})

    @routes.get("/finetune/runs/{name}")
    async def run_detail(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return await _answer(lambda: info_json(manager.get(name)))

    @routes.get("/finetune/runs/{name}/metrics")
    async def metrics(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return await _answer(lambda: {"run": name, "rows": manager.metrics(name, _since(request))})

    def control(action: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            return await _answer(lambda: info_json(getattr(manager, action)(name)))

        handler.__name__ = f"{action}_run"
        return handler

    for action in ("stop", "pause", "resume"):
        routes.post(f"/finetune/runs/{{name}}/{action}")(control(action))

    @routes.get("/finetune/runs/{name}/samples")
    async def samples(request: web.Request) -> web.Response:
        name = request.match_info["name"]

        def listing() -> dict[str, Any]:
            folder = open_run(root, name)
            items = [{**s, "url": sample_url(folder.name, s["file"])} for s in list_samples(folder)]
            return {"run": folder.name, "samples": items}

        return await _answer(listing)

    @routes.get("/finetune/runs/{name}/samples/{file}")
    async def sample(request: web.Request) -> web.Response:
        name, file = request.match_info["name"], request.match_info["file"]
        return await _answer(
            lambda: web.FileResponse(sample_file(root, name, file), headers={"Cache-Control": "no-cache"})
        )

    @routes.get("/finetune/runs/{name}/checkpoints")
    async def checkpoints(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return await _answer(lambda: {"run": name, "checkpoints": list_run_checkpoints(open_run(root, name))})


# --------------------------------------------------------------------------------------------
# The service: one run manager per ComfyUI process, wired to websockets and model folders


class ModelFolderRegistrar(Callbacks):
    """Registers each newly queued run's checkpoint folder with ComfyUI's model paths.

    Args:
        manager: to look up the run's folder and method.
        register: ``register(run_folder, method)`` (``host.register_run_outputs``).
    """

    def __init__(self, manager: RunManager, register: Callable[[str, str], Any]):
        self._manager = manager
        self._register = register

    def on_state(self, run: str, state: RunState, message: str = "") -> None:
        if RunState(state) != RunState.QUEUED:
            return
        info = self._manager.get(run)
        self._register(info.folder, info.config.get("method", "lora"))

    def register_existing(self) -> int:
        """Register every run already in the runs folder; returns how many were registered."""
        count = 0
        for info in self._manager.list():
            try:
                self._register(info.folder, info.config.get("method", "lora"))
                count += 1
            except ValueError as e:
                log.warning(
                    "finetune: run %s: its checkpoints are not listed in the loaders: %s", info.name, e
                )
        return count


@dataclass
class FinetuneService:
    """What the pack keeps for the life of the ComfyUI process (held by ``nodes/extension.py``).

    Attributes:
        manager: the one run manager (queue and workers).
        progress: the websocket bridge listening to it.
    """

    manager: RunManager
    progress: WebsocketProgress

    def shutdown(self) -> None:
        """Stop the running runs, each saving a checkpoint and its resume state at its current
        step, so quitting ComfyUI (Ctrl-C) loses no training. Runs at interpreter exit."""
        self.manager.shutdown(timeout=SHUTDOWN_TIMEOUT_S, reason="ComfyUI shut down")


def setup(server: Any = None) -> FinetuneService:
    """Create the pack's run service inside ComfyUI: the run manager (runs in
    ``<output>/finetune``), GPU sharing hooks, websocket events, model folders of every run, and
    the HTTP routes on ``server.routes`` (``PromptServer.instance`` when not given).

    Call once per process (``nodes/extension.py`` does, on load).
    """
    from . import host

    if server is None:
        server = host.prompt_server()
    manager = RunManager(host.output_directory(), host=host.ComfyHostHooks())
    progress = WebsocketProgress(host.send_event)
    registrar = ModelFolderRegistrar(manager, host.register_run_outputs)
    manager.add_listener(progress)
    manager.add_listener(registrar)
    registered = registrar.register_existing()
    if manager.recovered:
        log.info(
            "finetune: %d run(s) were interrupted by the last shutdown: %s",
            len(manager.recovered),
            ", ".join(manager.recovered),
        )
    if server is not None:
        register_routes(server.routes, manager)
    log.info(
        "finetune: run manager ready in %s (%d earlier run(s) listed in the model loaders)",
        manager.runs_root,
        registered,
    )
    service = FinetuneService(manager=manager, progress=progress)
    # ComfyUI's main returns normally on Ctrl-C, so atexit runs while the (daemon) training
    # threads are still alive and can save; a second Ctrl-C skips the wait.
    atexit.register(service.shutdown)
    return service
