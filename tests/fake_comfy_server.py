"""A tiny stand-in for ComfyUI's HTTP + websocket API, enough for the sweep client.

It speaks what ``server.py`` / ``execution.py`` of ComfyUI v0.33 send: ``/ws?clientId=`` with
``status`` on connect, ``execution_start``, ``executing`` (each node, then node null),
``executed``, ``execution_success``, ``execution_error``; ``POST /prompt`` with its validation
answer shapes; ``/history/<id>``; ``/view``. Instead of rendering, every image is one flat colour
computed from the loader value, the LoRA strength and the prompt text (:func:`colour_for`), so a
test can tell which checkpoint made which tile.

Use it as a context manager; it runs on 127.0.0.1 at a free port in a daemon thread and stops
when the block ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from PIL import Image

LOADER_INPUTS = ("lora_name", "unet_name", "ckpt_name")
OUTPUT_CLASSES = ("SaveImage", "PreviewImage")


def colour_for(model: str, strength: float, prompt: str) -> tuple[int, int, int]:
    """The colour the fake renders for a loader value, a LoRA strength and a prompt."""
    if strength == 0:
        model = "<base>"
    digest = hashlib.sha1(f"{model}|{prompt}".encode()).digest()
    return digest[0], digest[1], digest[2]


def _render_key(prompt: dict[str, Any]) -> tuple[str, float, str]:
    model, strength, text = "", 1.0, ""
    for node in prompt.values():
        inputs = node.get("inputs", {})
        for name in LOADER_INPUTS:
            if name in inputs:
                model = str(inputs[name])
                strength = float(inputs.get("strength_model", 1.0))
        if node.get("class_type") == "CLIPTextEncode" and not text:
            text = str(inputs.get("text", ""))
    return model, strength, text


@dataclass
class FakeComfy:
    """Settings a test may change between prompts, and what the server saw.

    Attributes:
        known_models: loader values /prompt accepts (others get ComfyUI's value_not_in_list).
        fail_when: a substring; a prompt whose loader value contains it fails while running
            (``execution_error`` from the KSampler node).
        size: (width, height) of the images it "renders".
        events: a log of what happened, e.g. ``ws:<cid>``, ``prompt:<cid>``, ``view:<file>``.
    """

    known_models: set[str] | None = None
    fail_when: str | None = None
    size: tuple[int, int] = (32, 32)
    events: list[str] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._sockets: dict[str, web.WebSocketResponse] = {}
        self._history: dict[str, Any] = {}
        self._images: dict[str, bytes] = {}
        self._number = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> FakeComfy:
        started = threading.Event()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="fake-comfy", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the fake ComfyUI server did not start within 10 s")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()
        self._loop = None

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        app.router.add_post("/prompt", self._prompt)
        app.router.add_get("/history/{prompt_id}", self._history_for)
        app.router.add_get("/view", self._view)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the free port the OS picked

    async def _stop(self) -> None:
        for ws in list(self._sockets.values()):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # routes ---------------------------------------------------------------------------------

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId") or uuid.uuid4().hex
        self._sockets[sid] = ws
        self.events.append(f"ws:{sid}")
        await ws.send_json(
            {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": sid}}
        )
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
        self._sockets.pop(sid, None)
        return ws

    def _validate(self, prompt: Any) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """ComfyUI's answer shapes: (error, node_errors); error None when valid."""
        if not isinstance(prompt, dict) or not prompt:
            return {"type": "no_prompt", "message": "No prompt provided", "details": "", "extra_info": {}}, {}
        node_errors: dict[str, Any] = {}
        for node_id, node in prompt.items():
            errors = []
            inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
            if not isinstance(node, dict) or "class_type" not in node:
                return {
                    "type": "invalid_prompt",
                    "message": f"Cannot execute because node {node_id} has no class_type.",
                    "details": "",
                    "extra_info": {},
                }, {}
            for name, value in inputs.items():
                if isinstance(value, list) and len(value) == 2 and str(value[0]) not in prompt:
                    errors.append(
                        {
                            "type": "bad_linked_input",
                            "message": "Bad linked input",
                            "details": f"{name}: node {value[0]} does not exist",
                            "extra_info": {},
                        }
                    )
                if name in LOADER_INPUTS and self.known_models is not None and value not in self.known_models:
                    options = sorted(self.known_models)
                    errors.append(
                        {
                            "type": "value_not_in_list",
                            "message": "Value not in list",
                            "details": f"{name}: {value!r} not in {options}",
                            "extra_info": {"input_name": name, "received_value": value},
                        }
                    )
            if errors:
                node_errors[node_id] = {
                    "errors": errors,
                    "dependent_outputs": [],
                    "class_type": node["class_type"],
                }
        if node_errors:
            details = "\n".join(
                f"{e['message']}: {e['details']}" for ne in node_errors.values() for e in ne["errors"]
            )
            return {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                "details": details,
                "extra_info": {},
            }, node_errors
        return None, {}

    async def _prompt(self, request: web.Request) -> web.Response:
        body = await request.json()
        client_id = body.get("client_id", "")
        self.events.append(f"prompt:{client_id}")
        error, node_errors = self._validate(body.get("prompt"))
        if error is not None:
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        prompt_id = str(uuid.uuid4())
        number = self._number
        self._number += 1
        asyncio.get_running_loop().create_task(self._execute(prompt_id, body["prompt"], client_id))
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    async def _send(self, client_id: str, kind: str, data: dict[str, Any]) -> None:
        ws = self._sockets.get(client_id)
        if ws is not None and not ws.closed:
            await ws.send_json({"type": kind, "data": data})

    async def _execute(self, prompt_id: str, prompt: dict[str, Any], client_id: str) -> None:
        await self._send(client_id, "execution_start", {"prompt_id": prompt_id, "timestamp": 0})
        # Another client's prompt: the sweep client must ignore messages that are not its own.
        await self._send(client_id, "executing", {"node": None, "prompt_id": "someone-else"})
        model, strength, text = _render_key(prompt)
        outputs: dict[str, Any] = {}
        status = "success"
        for node_id, node in prompt.items():
            await self._send(
                client_id, "executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id}
            )
            ws = self._sockets.get(client_id)
            if ws is not None and not ws.closed:
                await ws.send_bytes(b"\x00\x00\x00\x01preview")  # a latent preview frame
            if node["class_type"] == "KSampler" and self.fail_when and self.fail_when in model:
                await self._send(
                    client_id,
                    "execution_error",
                    {
                        "prompt_id": prompt_id,
                        "node_id": node_id,
                        "node_type": "KSampler",
                        "executed": [],
                        "exception_message": "Expected all tensors to be on the same device\n",
                        "exception_type": "RuntimeError",
                        "traceback": [],
                        "current_inputs": {},
                        "current_outputs": [],
                    },
                )
                status = "error"
                break
            if node["class_type"] in OUTPUT_CLASSES:
                name = f"ComfyUI_{len(self._images):05d}_.png"
                buf = io.BytesIO()
                Image.new("RGB", self.size, colour_for(model, strength, text)).save(buf, format="PNG")
                self._images[name] = buf.getvalue()
                kind = "output" if node["class_type"] == "SaveImage" else "temp"
                outputs[node_id] = {"images": [{"filename": name, "subfolder": "", "type": kind}]}
                await self._send(
                    client_id,
                    "executed",
                    {
                        "node": node_id,
                        "display_node": node_id,
                        "output": outputs[node_id],
                        "prompt_id": prompt_id,
                    },
                )
        self._history[prompt_id] = {
            "prompt": [0, prompt_id, prompt, {"client_id": client_id}, list(outputs)],
            "outputs": outputs,
            "status": {"status_str": status, "completed": status == "success", "messages": []},
        }
        if status == "success":
            await self._send(client_id, "execution_success", {"prompt_id": prompt_id, "timestamp": 0})
        await self._send(client_id, "executing", {"node": None, "prompt_id": prompt_id})

    async def _history_for(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self._history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def _view(self, request: web.Request) -> web.Response:
        name = request.rel_url.query.get("filename", "")
        self.events.append(f"view:{name}:{request.rel_url.query.get('type', '')}")
        if name not in self._images:
            return web.Response(status=404)
        return web.Response(body=self._images[name], content_type="image/png")
