"""A small client of ComfyUI's HTTP + websocket API: queue a workflow, wait for it, fetch its image.

It does what ComfyUI's own ``script_examples/websockets_api_example.py`` does: open
``/ws?clientId=`` first, ``POST /prompt`` with that client id, wait for ``executing`` with node
null for our prompt id (or ``execution_error``), read ``/history/<id>`` and download the output
through ``/view``. Only the standard library and ``websocket-client`` are used.
"""

from __future__ import annotations

import io
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

from PIL import Image

log = logging.getLogger("finetune")


class SweepError(RuntimeError):
    """A sweep that cannot go on; the message says what went wrong and what to do."""


def _load_websocket_module():
    try:
        import websocket  # websocket-client
    except ImportError as exc:
        raise ImportError(
            "the sweep needs the 'websocket-client' package: pip install websocket-client"
        ) from exc
    return websocket


# --------------------------------------------------------------------------------------------
# HTTP + websocket


class ComfyClient:
    """The part of ComfyUI's HTTP API a sweep uses: /ws, /prompt, /history, /view.

    Args:
        server: ``host:port`` or a URL like ``http://127.0.0.1:8188``.
        timeout: seconds to wait for one HTTP answer or one render.
        client_id: the websocket session id (a fresh uuid when None).
    """

    def __init__(self, server: str, *, timeout: float = 600.0, client_id: str | None = None):
        server = server.strip().rstrip("/")
        if "://" not in server:
            server = f"http://{server}"
        parsed = urllib.parse.urlsplit(server)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise SweepError(f"--server {server!r} is not an address like 127.0.0.1:8188")
        self.base_url = f"{parsed.scheme}://{parsed.netloc}{parsed.path}"
        ws_scheme = "wss" if parsed.scheme == "https" else "ws"
        self.client_id = client_id or uuid.uuid4().hex
        self.ws_url = f"{ws_scheme}://{parsed.netloc}{parsed.path}/ws?clientId={self.client_id}"
        self.timeout = timeout
        self._ws = None

    def _unreachable(self, reason: object) -> SweepError:
        host = urllib.parse.urlsplit(self.base_url)
        return SweepError(
            f"could not reach ComfyUI at {self.base_url} ({reason}): is it running? start it with "
            f"python main.py --listen {host.hostname} --port {host.port or 8188}"
        )

    def _request(self, path: str, *, body: Any = None) -> bytes:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(
            self.base_url + path, data=data, method="POST" if data is not None else "GET"
        )
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError:
            raise  # the server answered; callers read its error body
        except (TimeoutError, urllib.error.URLError, ConnectionError) as exc:
            raise self._unreachable(getattr(exc, "reason", exc)) from None

    # websocket ------------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the websocket; do this before queueing so no message of our prompt is missed."""
        websocket = _load_websocket_module()
        try:
            self._ws = websocket.create_connection(self.ws_url, timeout=self.timeout)
        except (OSError, websocket.WebSocketException) as exc:
            raise self._unreachable(exc) from None

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def __enter__(self) -> ComfyClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # API ------------------------------------------------------------------------------------

    def queue_prompt(self, workflow: dict[str, Any], *, what: str = "the prompt") -> str:
        """POST /prompt; returns the prompt id.

        Raises:
            SweepError: ComfyUI refused the workflow, with its message and every node error.
        """
        try:
            answer = json.loads(
                self._request("/prompt", body={"prompt": workflow, "client_id": self.client_id})
            )
        except urllib.error.HTTPError as exc:
            raise SweepError(f"ComfyUI rejected {what}: {_rejection_text(exc, workflow)}") from None
        prompt_id = answer.get("prompt_id")
        if not prompt_id:
            raise SweepError(f"ComfyUI accepted {what} but returned no prompt_id: {answer!r}")
        return prompt_id

    def wait(self, prompt_id: str, *, what: str = "the prompt") -> None:
        """Block until ComfyUI says our prompt is done (``executing`` with node null).

        Raises:
            SweepError: the prompt failed (``execution_error``) or was interrupted, or took
                longer than ``timeout`` seconds.
        """
        if self._ws is None:
            raise RuntimeError("connect() the websocket before queueing, or messages are lost")
        websocket = _load_websocket_module()
        deadline = time.monotonic() + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SweepError(f"ComfyUI did not finish {what} within {self.timeout:g} s; raise --timeout")
            self._ws.settimeout(remaining)
            try:
                message = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (OSError, websocket.WebSocketException) as exc:
                raise SweepError(
                    f"lost the connection to ComfyUI at {self.base_url} while it ran {what}: {exc}"
                ) from None
            if not isinstance(message, str):
                continue  # binary frames are latent previews
            event = json.loads(message)
            kind, data = event.get("type"), event.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            if kind == "execution_error":
                raise SweepError(
                    f"ComfyUI failed on {what} in node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{data.get('exception_type', 'error')}: {str(data.get('exception_message', '')).strip()}"
                )
            if kind == "execution_interrupted":
                raise SweepError(f"{what} was interrupted in ComfyUI (node {data.get('node_id')})")
            if kind == "executing" and data.get("node") is None:
                return

    def history(self, prompt_id: str) -> dict[str, Any]:
        """GET /history/<id>: the prompt's record (outputs, status)."""
        try:
            answer = json.loads(self._request(f"/history/{urllib.parse.quote(prompt_id)}"))
        except urllib.error.HTTPError as exc:
            raise SweepError(f"ComfyUI answered /history/{prompt_id} with HTTP {exc.code}") from None
        if prompt_id not in answer:
            raise SweepError(f"ComfyUI has no history for prompt {prompt_id}; was the queue cleared?")
        return answer[prompt_id]

    def view(self, image: dict[str, Any]) -> Image.Image:
        """Download one output image (a ``{"filename", "subfolder", "type"}`` entry) via /view."""
        query = urllib.parse.urlencode(
            {
                "filename": image["filename"],
                "subfolder": image.get("subfolder", ""),
                "type": image.get("type", "output"),
            }
        )
        try:
            data = self._request(f"/view?{query}")
        except urllib.error.HTTPError as exc:
            raise SweepError(
                f"ComfyUI could not send image {image['filename']!r} (HTTP {exc.code})"
            ) from None
        img = Image.open(io.BytesIO(data))
        img.load()
        return img

    def render(
        self, workflow: dict[str, Any], *, output_node: str | None = None, what: str = "the prompt"
    ) -> Image.Image:
        """Queue ``workflow``, wait for it, and return its first output image."""
        prompt_id = self.queue_prompt(workflow, what=what)
        self.wait(prompt_id, what=what)
        outputs = self.history(prompt_id).get("outputs") or {}
        images = _output_images(outputs, output_node)
        if not images:
            where = f"node {output_node}" if output_node else "the workflow"
            raise SweepError(
                f"{what} finished but {where} produced no images; add a Save Image or Preview Image node"
            )
        if len(images) > 1:
            log.warning("finetune: %s produced %d images; the strip uses the first", what, len(images))
        return self.view(images[0])


def _output_images(outputs: dict[str, Any], output_node: str | None) -> list[dict[str, Any]]:
    if output_node is not None:
        return list((outputs.get(output_node) or {}).get("images") or [])
    return [img for node_id in outputs for img in (outputs[node_id].get("images") or [])]


def _rejection_text(exc: urllib.error.HTTPError, workflow: dict[str, Any]) -> str:
    """ComfyUI's ``error.message`` plus each node error, from a 400 answer to /prompt."""
    try:
        body = json.loads(exc.read() or b"{}")
    except (json.JSONDecodeError, OSError):
        return f"HTTP {exc.code}"
    error = body.get("error")
    if isinstance(error, dict):
        text = error.get("message") or error.get("type") or f"HTTP {exc.code}"
    else:
        text = str(error or f"HTTP {exc.code}")
    parts = [text]
    for node_id, node_error in (body.get("node_errors") or {}).items():
        class_type = node_error.get("class_type") or (workflow.get(node_id) or {}).get("class_type", "?")
        for err in node_error.get("errors") or []:
            parts.append(f"node {node_id} ({class_type}): {err.get('message', '')}: {err.get('details', '')}")
    return "; ".join(parts)
