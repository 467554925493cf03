"""Start the real ComfyUI with the pack installed as a user installs it, and talk to it over HTTP
and the websocket only (``/prompt``, ``/history``, ``/finetune/…``, ws events)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import card

ROOT = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "comfyui-finetune"
START_TIMEOUT_S = 300.0
MODEL_KINDS = ("checkpoints", "loras", "diffusion_models", "vae", "text_encoders", "clip", "embeddings")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layout_base(base: Path) -> Path:
    """Make ComfyUI's folders under ``base``: the pack linked into ``custom_nodes`` (what a user's
    ``git clone`` there gives), the harness's card route beside it, an empty front-end folder."""
    custom = base / "custom_nodes"
    custom.mkdir(parents=True, exist_ok=True)
    link = custom / PACK_DIR_NAME
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    card.write_route_node(custom)
    for name in ("input", "output", "temp", "user", "frontend", *(f"models/{k}" for k in MODEL_KINDS)):
        (base / name).mkdir(parents=True, exist_ok=True)
    return base


@dataclass
class Server:
    """A running ComfyUI and the harness's view of it.

    Attributes:
        url: ``http://127.0.0.1:<port>``.
        proc: the ``main.py`` process.
        log_path: its stdout + stderr.
        base: its base directory (models, input, output, custom_nodes).
        events: every websocket text message received since start (``(time, type, data)``).
    """

    url: str
    proc: subprocess.Popen
    log_path: Path
    base: Path
    events: list = field(default_factory=list)
    _ws: Any = None
    _thread: threading.Thread | None = None
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    # HTTP -----------------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=120) as resp:
            return json.loads(resp.read())

    def post(self, path: str, payload: Any) -> Any:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(
                f"POST {path} -> HTTP {e.code}: {e.read().decode(errors='replace')[:3000]}"
            ) from None
        return json.loads(body) if body else None

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    # websocket ------------------------------------------------------------------------------

    def listen(self) -> None:
        """Open ``/ws`` and record every text message in :attr:`events` from a thread."""
        import websocket  # websocket-client

        self._ws = websocket.create_connection(
            f"{self.url.replace('http', 'ws', 1)}/ws?clientId={self.client_id}", timeout=5
        )

        def pump() -> None:
            while self._ws is not None:
                try:
                    raw = self._ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                except (OSError, websocket.WebSocketException):
                    return
                if not isinstance(raw, str) or not raw:
                    continue  # binary frames are previews; an empty one comes at close
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                self.events.append((time.monotonic(), msg.get("type"), msg.get("data") or {}))

        self._thread = threading.Thread(target=pump, daemon=True, name="harness-ws")
        self._thread.start()

    def prompt_times(self, prompt_id: str) -> tuple[float | None, float | None, str | None]:
        """(started, ended, error) of a prompt from the websocket events (monotonic times)."""
        start = end = None
        error = None
        for t, kind, data in list(self.events):
            if data.get("prompt_id") != prompt_id:
                continue
            if kind == "execution_start":
                start = t
            elif kind == "execution_error":
                error = (
                    f"{data.get('exception_type')}: {str(data.get('exception_message', '')).strip()[:300]}"
                )
                end = t
            elif kind == "executing" and data.get("node") is None:
                end = t
        return start, end, error

    def wait_prompt(self, prompt_id: str, *, timeout: float) -> tuple[float, float, str | None]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            start, end, error = self.prompt_times(prompt_id)
            if end is not None:
                return start if start is not None else end, end, error
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited (code {self.proc.returncode}):\n{self.tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.tail()}")

    def run_states(self, run: str) -> list[tuple[float, str, str]]:
        """(time, state, message) of every ``finetune.state`` event of ``run``."""
        return [
            (t, d.get("state", ""), d.get("message", ""))
            for t, kind, d in list(self.events)
            if kind == "finetune.state" and d.get("run") == run
        ]

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self) -> None:
        if self._ws is not None:
            ws, self._ws = self._ws, None
            ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)


def dynamic_vram_args(card_gib: float, real_total_bytes: int | None) -> list[str]:
    """ComfyUI's DynamicVRAM budgets from NVML's whole GPU, past PyTorch's cap: the headroom that
    leaves it the card (see :mod:`bench.comfy_gpu.card`); nothing when the GPU's size is unknown."""
    if real_total_bytes is None:
        return []
    return ["--vram-headroom", f"{card.dynamic_vram_headroom(card_gib, real_total_bytes):.2f}"]


def start(
    comfy: Path,
    python: str,
    base: Path,
    *,
    card_gib: float | None,
    site: Path | None,
    cpu: bool,
    hook_dir: Path,
    log_name: str = "server.log",
    extra_env: dict | None = None,
) -> Server:
    """Start ``main.py`` of ``comfy`` with everything under ``base``; returns once it answers.

    Args:
        card_gib: the emulated card (0: the whole GPU with the hook's route; None: no hook).
        site: packages carried for the device (put on PYTHONPATH after the hook).
        cpu: ``--cpu`` (``--smoke``).
    """
    layout_base(base)
    card.write_hook(hook_dir)
    port = _free_port()
    cmd = [
        python, "main.py", "--listen", "127.0.0.1", "--port", str(port),
        "--base-directory", str(base),
        "--input-directory", str(base / "input"), "--output-directory", str(base / "output"),
        "--temp-directory", str(base),
        "--front-end-root", str(base / "frontend"),  # the harness needs no browser
        "--database-url", "sqlite:///:memory:", "--disable-auto-launch",
        # PyTorch's native allocator: its memory fraction is a hard cap (cudaMallocAsync's is not).
        "--disable-cuda-malloc",
    ]  # fmt: skip
    if cpu:
        cmd.append("--cpu")
    elif card_gib:
        cmd += dynamic_vram_args(card_gib, card.gpu_total_bytes())
    paths = [str(hook_dir)] if card_gib is not None else []
    if site is not None:
        paths.append(str(site))
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(paths),
        **(extra_env or {}),
    }
    if card_gib is not None:
        env["FINETUNE_CARD_GIB"] = f"{card_gib:g}"
    log_path = base / log_name
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=comfy, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = Server(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, base=base)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with code {proc.returncode} while starting:\n{server.tail()}")
        try:
            server.get("/object_info/FinetuneTrainLoRA")
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(
                    f"ComfyUI did not answer within {START_TIMEOUT_S:.0f} s:\n{server.tail()}"
                ) from None
            time.sleep(0.5)
        except urllib.error.HTTPError:
            time.sleep(0.5)
    failed = [
        line for line in server.log_text().splitlines()
        if ("IMPORT FAILED" in line or "Cannot import" in line) and ("finetune" in line)
    ]  # fmt: skip
    if failed:
        server.stop()
        raise RuntimeError("the pack failed to load:\n" + "\n".join(failed) + "\n" + server.tail())
    server.listen()
    return server


class VramSampler:
    """Peak GPU memory of one process (NVML), sampled from a thread; ``peak_gib`` per phase.

    Falls back to the device's used memory when NVML lists no processes (some VMs), and reports
    NaN without NVML (CPU smoke).
    """

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.how = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML (CPU smoke, or no driver): the row says n/a
            self._nvml = None

    def _read(self) -> int:
        nv = self._nvml
        for p in nv.nvmlDeviceGetComputeRunningProcesses(self._handle):
            if p.pid == self.pid and p.usedGpuMemory:
                self.how = "nvml process"
                return int(p.usedGpuMemory)
        self.how = "nvml device used"
        return int(nv.nvmlDeviceGetMemoryInfo(self._handle).used)

    def reset(self) -> None:
        self.peak = 0

    def start(self) -> VramSampler:
        if self._nvml is None:
            return self

        def loop() -> None:
            while not self._stop.wait(self.interval):
                try:
                    self.peak = max(self.peak, self._read())
                except self._nvml.NVMLError:
                    return

        self._thread = threading.Thread(target=loop, daemon=True, name="harness-nvml")
        self._thread.start()
        return self

    def peak_gib(self) -> float:
        return self.peak / 2**30 if self._nvml is not None else float("nan")

    def stop(self) -> None:
        self._stop.set()
