"""Helpers for tests of the ComfyUI side: importing the pack as a package, and a real ComfyUI server.

Two things live here:

- :func:`import_pack` imports ``nodes/...`` modules the way ComfyUI does (the repo root as a
  package, so the pack's relative imports work) while sharing one copy of ``trainer`` with tests
  that ``import trainer...`` directly, so classes and enums compare equal across both.
- the session fixture ``comfy`` (bring it into a test module with
  ``from comfy_server import comfy_fixture  # noqa: F401``) starts the real ``main.py --cpu`` of the checkout in ``COMFYUI_PATH`` with
  every folder in a temp directory and the pack linked into its ``custom_nodes``, and yields a
  :class:`ComfyClient`. Tests that use it are skipped when ``COMFYUI_PATH`` is not set.

Environment:
    COMFYUI_PATH: a ComfyUI checkout (v0.33 or newer).
    COMFYUI_PYTHON: the python to run it with; default ``<COMFYUI_PATH>/../comfy-venv/bin/python``
        if that exists, else this interpreter.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK = "comfyui_finetune"  # the package name the repo root gets in tests
PACK_DIR_NAME = "comfyui-finetune"  # the folder name under custom_nodes/
LOAD_ERROR_MARKERS = (
    "IMPORT FAILED",
    "Cannot import",
    "Error while calling comfy_entrypoint",
    "comfyui-finetune: failed to load",
)
START_TIMEOUT_S = 180.0


# --------------------------------------------------------------------------------------------
# Importing the pack as a package


class _TrainerAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolve ``comfyui_finetune.trainer[.x]`` to the top-level ``trainer[.x]`` module object."""

    prefix = f"{PACK}.trainer"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.prefix and not fullname.startswith(self.prefix + "."):
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        real = importlib.import_module(spec.name[len(PACK) + 1 :])
        spec.loader_state = real.__spec__
        return real

    def exec_module(self, module):
        # The import system stamped the alias spec onto the shared module; give it its own back.
        module.__spec__ = module.__spec__.loader_state


def import_pack(module: str = "") -> types.ModuleType:
    """Import ``comfyui_finetune.<module>`` (e.g. ``"nodes.widgets"``) from this checkout.

    The repo root becomes the package ``comfyui_finetune``, loaded from its ``__init__.py`` the way
    ComfyUI's loader does (that file imports nothing from ComfyUI), so ``nodes/host.py`` imports
    anywhere; modules that use ``comfy_api`` need ComfyUI on ``sys.path``.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if not any(isinstance(f, _TrainerAlias) for f in sys.meta_path):
        sys.meta_path.insert(0, _TrainerAlias())
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PACK}.{module}" if module else PACK)


#: The fix when ComfyUI does not import in-process: it must import in the Python that runs pytest.
RUN_WITH_COMFY_PYTHON = "run pytest with ComfyUI's own Python (README: Tests that need a real ComfyUI)"
NO_COMFY_API = f"ComfyUI's comfy_api is not importable: set COMFYUI_PATH and {RUN_WITH_COMFY_PYTHON}"


def comfy_api_available() -> bool:
    """True if ComfyUI's ``comfy_api`` imports (``COMFYUI_PATH`` is put on ``sys.path`` first)."""
    path = os.environ.get("COMFYUI_PATH")
    if path and path not in sys.path:
        sys.path.append(path)
    try:
        importlib.import_module("comfy_api.latest")
    except ImportError:
        return False
    if path:
        # ComfyUI's comfy/ has no __init__.py: a namespace package whose search path follows
        # sys.path. pytest puts the repo's parent folder there (the repo root is a package), so a
        # checkout named "comfy" beside the repo would become part of it and <path>/utils would be
        # imported as comfy.utils. Pin it to the checkout's comfy/ folder.
        importlib.import_module("comfy").__path__ = [os.path.join(path, "comfy")]
    if "comfy.model_management" not in sys.modules:
        # Outside main.py, importing comfy.model_management (e.g. through comfy.samplers, which a
        # schema's sampler list needs) dies on a CPU-only torch unless --cpu is set first.
        importlib.import_module("comfy.cli_args").args.cpu = True
    return True


# --------------------------------------------------------------------------------------------
# A real ComfyUI server


class ComfyError(RuntimeError):
    """A prompt ComfyUI refused or that failed while executing; the message carries its error."""

    def __init__(self, message: str, payload: Any = None):
        super().__init__(message)
        self.payload = payload


@dataclass
class ComfyClient:
    """A minimal client of ComfyUI's HTTP and websocket API."""

    url: str
    base_dir: Path
    log_path: Path

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def models_dir(self) -> Path:
        """The folder ``extra_model_paths.yaml`` registers: drop checkpoints into ``checkpoints/`` etc."""
        return self.base_dir / "extra_models"

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=60) as resp:
            return json.loads(resp.read())

    def post_json(self, path: str, payload: Any) -> Any:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                detail: Any = json.loads(body)
            except ValueError:
                detail = body.decode(errors="replace")
            raise ComfyError(
                f"POST {path} -> HTTP {e.code}: {json.dumps(detail, indent=1)[:4000]}", detail
            ) from None
        return json.loads(body) if body else None

    def object_info(self, node_class: str | None = None) -> dict:
        """``/object_info`` (every node) or ``/object_info/<class>`` (that node's entry only)."""
        if node_class is None:
            return self.get_json("/object_info")
        return self.get_json(f"/object_info/{urllib.parse.quote(node_class)}")[node_class]

    def history(self, prompt_id: str) -> dict:
        """The ``/history`` entry of a prompt (``outputs``, ``status``), or {} if unknown."""
        return self.get_json(f"/history/{prompt_id}").get(prompt_id, {})

    def run(self, prompt: dict, *, timeout: float = 300.0) -> dict:
        """Queue an API-format prompt, wait for it, and return its history entry."""
        import websocket  # websocket-client

        client_id = uuid.uuid4().hex
        ws = websocket.create_connection(
            f"{self.url.replace('http', 'ws', 1)}/ws?clientId={client_id}", timeout=timeout
        )
        try:
            prompt_id = self.queue(prompt, client_id=client_id)
            self._wait(ws, prompt_id, timeout=timeout)
        finally:
            ws.close()
        return self.history(prompt_id)

    def queue(self, prompt: dict, *, client_id: str | None = None) -> str:
        """POST ``/prompt``; returns the prompt id. Raises ComfyError with the node errors if refused."""
        payload: dict[str, Any] = {"prompt": prompt}
        if client_id:
            payload["client_id"] = client_id
        return self.post_json("/prompt", payload)["prompt_id"]

    def wait(self, prompt_id: str, *, client_id: str, timeout: float = 300.0) -> dict:
        """Wait for a prompt queued with :meth:`queue` under ``client_id`` (prefer :meth:`run`, which
        opens the websocket before queuing so no message is missed). Returns its history entry."""
        import websocket

        ws = websocket.create_connection(
            f"{self.url.replace('http', 'ws', 1)}/ws?clientId={client_id}", timeout=timeout
        )
        try:
            if not self.history(prompt_id):
                self._wait(ws, prompt_id, timeout=timeout)
        finally:
            ws.close()
        return self.history(prompt_id)

    def _wait(self, ws, prompt_id: str, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = ws.recv()
            if not isinstance(raw, str):
                continue  # binary preview frames
            message = json.loads(raw)
            data = message.get("data", {})
            if data.get("prompt_id") != prompt_id:
                continue
            kind = message.get("type")
            if kind == "execution_error":
                raise ComfyError(
                    f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_type')}: {data.get('exception_message')}",
                    data,
                )
            if kind == "execution_interrupted":
                raise ComfyError(f"prompt {prompt_id} was interrupted", data)
            # Not "execution_success": it comes before ComfyUI writes the history entry.
            if kind == "executing" and data.get("node") is None:
                return
        raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comfy_python(comfy_path: Path) -> str:
    """The interpreter for the server: COMFYUI_PYTHON, else the sibling comfy-venv, else this one."""
    explicit = os.environ.get("COMFYUI_PYTHON")
    if explicit:
        return explicit
    sibling = comfy_path.parent / "comfy-venv" / "bin" / "python"
    return str(sibling) if sibling.exists() else sys.executable


def _write_extra_model_paths(base_dir: Path) -> Path:
    models = base_dir / "extra_models"
    kinds = ("checkpoints", "loras", "diffusion_models", "vae", "text_encoders", "clip", "embeddings")
    for kind in kinds:
        (models / kind).mkdir(parents=True, exist_ok=True)
    lines = ["finetune_tests:", f"  base_path: {models}"] + [f"  {kind}: {kind}" for kind in kinds]
    path = base_dir / "extra_model_paths.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def start_server(
    comfy_path: Path, base_dir: Path, *, extra_args: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, ComfyClient]:
    """Start ``main.py --cpu`` with every folder under ``base_dir`` and the pack in its custom_nodes.

    Returns:
        The process and a client, once ``/object_info`` answers.

    Raises:
        RuntimeError: the server died, did not answer in time, or logged that the pack failed to
            import; the message carries the log tail.
    """
    custom_nodes = base_dir / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    (custom_nodes / PACK_DIR_NAME).symlink_to(ROOT, target_is_directory=True)
    for name in ("input", "output", "temp", "user"):
        (base_dir / name).mkdir(exist_ok=True)
    extra_paths = _write_extra_model_paths(base_dir)
    port = _free_port()
    cmd = [
        comfy_python(comfy_path), "main.py", "--cpu",
        "--listen", "127.0.0.1", "--port", str(port),
        "--base-directory", str(base_dir),  # custom_nodes, models and user come from here
        "--input-directory", str(base_dir / "input"),
        "--output-directory", str(base_dir / "output"),
        "--temp-directory", str(base_dir),  # ComfyUI appends "temp"
        "--extra-model-paths-config", str(extra_paths),
        "--database-url", "sqlite:///:memory:",  # parallel servers must not share ComfyUI's db file
        "--disable-auto-launch",
        *extra_args,
    ]  # fmt: skip
    log_path = base_dir / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=comfy_path, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    client = ComfyClient(url=f"http://127.0.0.1:{port}", base_dir=base_dir, log_path=log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"ComfyUI exited with code {proc.returncode} while starting:\n{client.log_tail()}"
            )
        try:
            client.get_json("/object_info/PrimitiveInt")
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                stop_server(proc)
                raise RuntimeError(
                    f"ComfyUI did not answer within {START_TIMEOUT_S:.0f} s:\n{client.log_tail()}"
                ) from None
            time.sleep(0.5)
    failures = pack_load_errors(log_path.read_text(encoding="utf-8", errors="replace"))
    if failures:
        stop_server(proc)
        raise RuntimeError(
            "the pack failed to load in ComfyUI:\n"
            + "\n".join(failures)
            + f"\n--- log tail ---\n{client.log_tail()}"
        )
    return proc, client


def pack_load_errors(log_text: str) -> list[str]:
    """Log lines saying that our pack (not some other ComfyUI module) failed to load."""
    return [
        line
        for line in log_text.splitlines()
        if any(marker in line for marker in LOAD_ERROR_MARKERS)
        and (PACK_DIR_NAME in line or "finetune" in line)
    ]


def stop_server(proc: subprocess.Popen) -> None:
    """Terminate the server, killing it if it does not exit within 10 s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def comfyui_path() -> Path:
    """The ComfyUI checkout in ``COMFYUI_PATH``; skips the test when it is not set."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set; point it at a ComfyUI checkout to run real-host tests")
    comfy_path = Path(path).resolve()
    if not (comfy_path / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={path!r} has no main.py; point it at a ComfyUI checkout")
    return comfy_path


@pytest.fixture(scope="session", name="comfy")
def comfy_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyClient]:
    """A running real ComfyUI with the pack loaded (skipped without COMFYUI_PATH)."""
    proc, client = start_server(comfyui_path(), tmp_path_factory.mktemp("comfy"))
    try:
        yield client
    finally:
        stop_server(proc)
