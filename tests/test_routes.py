"""The /finetune/ HTTP routes on a plain aiohttp app (no ComfyUI), the websocket bridge, and the
model-folder registrar."""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from comfy_server import import_pack
from fake_train import FakeTrain
from PIL import Image
from yarl import URL

from trainer.config import TrainConfig
from trainer.engine.events import Progress, RunState
from trainer.runfolder import RunFolder
from trainer.runs import RunManager

routes_mod = import_pack("nodes.routes")
progress_mod = import_pack("nodes.progress")


def request_all(manager: RunManager, requests: list[tuple[str, str]]) -> list[tuple[int, object]]:
    """Send (method, raw path) requests to an app with the routes; returns (status, JSON or bytes)."""

    async def run():
        table = web.RouteTableDef()
        routes_mod.register_routes(table, manager)
        app = web.Application()
        app.add_routes(table)
        out = []
        async with TestClient(TestServer(app)) as client:
            for method, path in requests:
                resp = await client.request(method, URL(path, encoded=True))
                body = await resp.read()
                if resp.content_type == "application/json":
                    body = json.loads(body)
                out.append((resp.status, body))
        return out

    return asyncio.run(run())


def one(manager, method, path):
    return request_all(manager, [(method, path)])[0]


@pytest.fixture
def fake():
    return FakeTrain()


@pytest.fixture
def manager(tmp_path, fake):
    m = RunManager(tmp_path / "output", train_fn=fake)
    yield m
    m.shutdown(timeout=5)


def finished_run(manager, name="cat", **kw) -> RunFolder:
    cfg = TrainConfig(run_name=name, max_steps=8, checkpoint_every=4, validation_every=4, **kw)
    manager.submit(cfg)
    assert manager.wait(name, timeout=10).state == "finished"
    return RunFolder(manager.runs_root / name)


def test_list_detail_metrics_samples_and_checkpoints(manager):
    finished_run(manager)
    answers = request_all(
        manager,
        [
            ("GET", "/finetune/runs"),
            ("GET", "/finetune/runs/cat"),
            ("GET", "/finetune/runs/cat/metrics?since=6"),
            ("GET", "/finetune/runs/cat/samples"),
            ("GET", "/finetune/runs/cat/samples/step00004-0.png"),
            ("GET", "/finetune/runs/cat/checkpoints"),
        ],
    )
    (s1, listing), (s2, detail), (s3, metrics), (s4, samples), (s5, png), (s6, ckpts) = answers
    assert (s1, s2, s3, s4, s5, s6) == (200, 200, 200, 200, 200, 200)
    assert [r["name"] for r in listing["runs"]] == ["cat"]
    run = listing["runs"][0]
    assert (run["state"], run["step"], run["total"], run["latest_sample"]) == (
        "finished",
        8,
        8,
        "step00008-0.png",
    )
    assert "config" not in run
    assert run["latest_sample_url"] == "/finetune/runs/cat/samples/step00008-0.png"
    assert (detail["config"]["max_steps"], detail["plan"]["total_steps"]) == (8, 8)
    assert metrics == {"run": "cat", "rows": [{"step": 7, "loss": 1 / 7, "lr": 1e-4, "samples_per_s": 100.0},
                                              {"step": 8, "loss": 1 / 8, "lr": 1e-4, "samples_per_s": 100.0}]}  # fmt: skip
    assert samples["samples"] == [
        {
            "file": "step00004-0.png",
            "step": 4,
            "index": 0,
            "url": "/finetune/runs/cat/samples/step00004-0.png",
        },
        {
            "file": "step00008-0.png",
            "step": 8,
            "index": 0,
            "url": "/finetune/runs/cat/samples/step00008-0.png",
        },
    ]
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from io import BytesIO

    assert Image.open(BytesIO(png)).getpixel((0, 0)) == (4, 0, 0)
    assert [(c["file"], c["label"], c["step"]) for c in ckpts["checkpoints"]] == [
        ("cat-step00004.safetensors", "step 4", 4),
        ("cat-step00008.safetensors", "step 8", 8),
        ("cat.safetensors", "final", None),
    ]


def test_stop_pause_resume_routes(manager, fake):
    manager.submit(TrainConfig(run_name="long", max_steps=100_000, checkpoint_every=0))
    deadline = threading.Event()
    while manager.get("long").step < 3 and not deadline.wait(0.002):
        pass
    (sp, paused), (sr, resumed), (ss, stopping), (sp2, again) = request_all(
        manager,
        [
            ("POST", "/finetune/runs/long/pause"),
            ("POST", "/finetune/runs/long/resume"),
            ("POST", "/finetune/runs/long/stop"),
            ("POST", "/finetune/runs/long/pause"),
        ],
    )
    assert (sp, paused["state"]) == (200, "paused")
    assert (sr, resumed["state"]) == (200, "running")
    assert (ss, stopping["state"]) == (200, "stopping")
    assert sp2 == 409
    assert again["error"] in (
        "run 'long' is stopping; only a running run can be paused",
        "run 'long' is stopped; cannot pause it",
    )
    assert manager.wait("long", timeout=10).state == "stopped"
    status, body = one(manager, "POST", "/finetune/runs/long/resume")
    assert status == 200 and body["state"] in ("queued", "running")
    manager.stop("long")
    manager.wait("long", timeout=10)


def test_unknown_runs_and_bad_queries(manager):
    finished_run(manager)
    answers = request_all(
        manager,
        [
            ("GET", "/finetune/runs/nope"),
            ("POST", "/finetune/runs/nope/stop"),
            ("GET", "/finetune/runs/cat/metrics?since=abc"),
            ("GET", "/finetune/runs/cat/samples/step99999-0.png"),
            ("POST", "/finetune/runs/cat/pause"),
        ],
    )
    assert answers[0] == (
        404,
        {"error": f"no run named 'nope' in {str(manager.runs_root)!r}; GET /finetune/runs lists the runs"},
    )
    assert answers[1][0] == 404
    assert answers[2] == (400, {"error": "since must be a whole step number, got 'abc'"})
    assert answers[3] == (404, {"error": "run 'cat' has no sample 'step99999-0.png'"})
    assert answers[4] == (409, {"error": "run 'cat' is finished; cannot pause it"})


def test_path_attacks_are_refused(manager, tmp_path):
    folder = finished_run(manager)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG secret")
    os.symlink(secret, folder.samples_dir / "link.png")
    outside_run = tmp_path / "elsewhere"
    outside_run.mkdir()
    (outside_run / "run.json").write_text("{}")
    os.symlink(outside_run, manager.runs_root / "escape")
    answers = request_all(
        manager,
        [
            ("GET", "/finetune/runs/cat/samples/..%2F..%2F..%2Fsecret.png"),
            ("GET", "/finetune/runs/cat/samples/%2Fetc%2Fpasswd"),
            ("GET", "/finetune/runs/cat/samples/link.png"),
            ("GET", "/finetune/runs/..%2F..%2Fsecret.png"),
            ("GET", "/finetune/runs/%2E%2E/metrics"),
            ("GET", "/finetune/runs/escape"),
            ("GET", "/finetune/runs/escape/checkpoints"),
            ("GET", "/finetune/runs/cat/samples/..%5C..%5Csecret.png"),
        ],
    )
    statuses = [a[0] for a in answers]
    assert statuses == [400, 400, 400, 400, 400, 400, 400, 400]
    assert answers[0][1] == {
        "error": "sample '../../../secret.png' must be a .png file name from GET /finetune/runs/cat/samples"
    }
    assert answers[2][1] == {
        "error": "'cat/samples/link.png' points outside the runs folder (through a symlink?)"
    }
    assert answers[5][1] == {"error": "'escape' points outside the runs folder (through a symlink?)"}
    assert all(set(body) == {"error"} for _, body in answers)  # JSON errors only: no file was served
    assert [r["name"] for r in one(manager, "GET", "/finetune/runs")[1]["runs"]] == [
        "cat"
    ]  # the symlinked run is left out


def test_nan_metrics_are_sent_as_null(manager, fake):
    fake.nan_at["nan"] = 2
    manager.submit(TrainConfig(run_name="nan", max_steps=4))
    manager.wait("nan", timeout=10)
    RunFolder(manager.runs_root / "nan").append_metrics({"step": 2, "loss": float("nan")})
    status, body = one(manager, "GET", "/finetune/runs/nan/metrics")
    assert status == 200
    assert body["rows"][-1] == {"step": 2, "loss": None}


# The websocket bridge ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_is_throttled_and_the_last_one_is_flushed_before_a_state():
    sent = []
    clock = FakeClock()
    bridge = progress_mod.WebsocketProgress(lambda event, data: sent.append((event, data)), clock=clock)
    for step in range(1, 11):  # ten steps within 0.09 s: only the first goes out at once
        bridge.on_progress(Progress("r", step, 10, 0, 1.0 / step, 1e-4, 50.0, 10.0 - step))
        clock.now += 0.01
    clock.now += 0.3
    bridge.on_progress(Progress("r", 11, 20, 0, float("nan"), 1e-4, 50.0, None))
    bridge.on_progress(Progress("other", 1, 5, 0, 0.5, 1e-4, 50.0, 4.0))
    bridge.on_progress(Progress("r", 12, 20, 1, 0.25, 1e-4, 50.0, 8.0))
    bridge.on_state("r", RunState.FAILED, "loss became NaN at step 13")
    assert [(e, d.get("step"), d["run"]) for e, d in sent] == [
        ("finetune.progress", 1, "r"),
        ("finetune.progress", 11, "r"),
        ("finetune.progress", 1, "other"),
        ("finetune.progress", 12, "r"),
        ("finetune.state", None, "r"),
        ("finetune.error", None, "r"),
    ]
    assert sent[0][1] == {
        "run": "r",
        "step": 1,
        "total": 10,
        "loss": 1.0,
        "lr": 1e-4,
        "samples_per_s": 50.0,
        "eta_s": 9.0,
        "epoch": 0,
    }
    assert sent[1][1]["loss"] is None and sent[1][1]["eta_s"] is None
    assert sent[4][1] == {"run": "r", "state": "failed", "message": "loss became NaN at step 13"}
    assert sent[5][1] == {"run": "r", "message": "loss became NaN at step 13"}
    assert not any(isinstance(v, float) and math.isnan(v) for _, d in sent for v in d.values())


def test_sample_and_checkpoint_events():
    sent = []
    bridge = progress_mod.WebsocketProgress(lambda event, data: sent.append((event, data)))
    bridge.on_sample("my run", 200, ["/x/finetune/my run/samples/step00200-0.png", "/x/step00200-1.png"])
    bridge.on_checkpoint("my run", 200, "/x/finetune/my run/checkpoints/my-run-step00200.safetensors")
    assert sent == [
        ("finetune.sample", {"run": "my run", "step": 200, "urls": [
            "/finetune/runs/my%20run/samples/step00200-0.png", "/finetune/runs/my%20run/samples/step00200-1.png"]}),
        ("finetune.checkpoint", {"run": "my run", "step": 200, "file": "my-run-step00200.safetensors"}),
    ]  # fmt: skip


def test_the_manager_feeds_the_bridge(manager):
    sent = []
    manager.add_listener(
        progress_mod.WebsocketProgress(lambda event, data: sent.append((event, data)), max_per_s=1000)
    )
    finished_run(manager, "wired")
    events = [e for e, _ in sent]
    assert events[0] == "finetune.state" and sent[0][1] == {
        "run": "wired",
        "state": "queued",
        "message": "queued",
    }
    assert events.count("finetune.checkpoint") == 2
    assert events.count("finetune.sample") == 2
    assert sent[-1] == ("finetune.state", {"run": "wired", "state": "finished", "message": "finished"})
    steps = [d["step"] for e, d in sent if e == "finetune.progress"]
    assert steps[-1] == 8


def test_registrar_registers_new_and_existing_runs(manager, tmp_path):
    finished_run(manager, "old-lora")
    registered = []
    registrar = routes_mod.ModelFolderRegistrar(
        manager, lambda folder, method: registered.append((os.path.basename(folder), method))
    )
    assert registrar.register_existing() == 1
    manager.add_listener(registrar)
    manager.submit(TrainConfig(run_name="new-full", method="full", max_steps=2))
    manager.wait("new-full", timeout=10)
    assert registered == [("old-lora", "lora"), ("new-full", "full")]


# The ComfyUI host hooks, against stand-ins for ComfyUI's modules ---------------------------------


@pytest.fixture
def fake_comfy(monkeypatch, tmp_path):
    """Fake ``comfy.model_management``, ``server`` and ``folder_paths`` modules in sys.modules."""
    import sys
    import types

    mm = types.SimpleNamespace(EXTRA_RESERVED_VRAM=400 * 2**20, calls=[])
    mm.unload_all_models = lambda: mm.calls.append("unload_all_models")
    mm.soft_empty_cache = lambda: mm.calls.append("soft_empty_cache")
    comfy_pkg = types.ModuleType("comfy")
    comfy_pkg.model_management = mm
    running: list = []
    queued: list = []
    queue = types.SimpleNamespace(get_current_queue_volatile=lambda: (list(running), list(queued)))
    server_mod = types.ModuleType("server")
    server_mod.PromptServer = types.SimpleNamespace(instance=types.SimpleNamespace(prompt_queue=queue))
    registered: list = []
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.add_model_folder_path = lambda kind, path, is_default=False: registered.append((kind, path))
    monkeypatch.setitem(sys.modules, "comfy", comfy_pkg)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setitem(sys.modules, "server", server_mod)
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    return types.SimpleNamespace(mm=mm, running=running, queued=queued, registered=registered)


def test_reserve_raises_comfyui_reserved_vram_per_trainer_and_restores_it(fake_comfy):
    host = import_pack("nodes.host")
    hooks = host.ComfyHostHooks()
    hooks.reserve(3 * 2**30)
    assert fake_comfy.mm.EXTRA_RESERVED_VRAM == 400 * 2**20 + 3 * 2**30
    hooks.reserve(2 * 2**30)  # the same trainer's new footprint replaces its old one
    assert fake_comfy.mm.EXTRA_RESERVED_VRAM == 400 * 2**20 + 2 * 2**30
    with ThreadPoolExecutor(max_workers=1) as other_worker:  # a second device's worker thread
        other_worker.submit(hooks.reserve, 2**30).result()
        assert fake_comfy.mm.EXTRA_RESERVED_VRAM == 400 * 2**20 + 3 * 2**30
        hooks.reserve(0)
        assert fake_comfy.mm.EXTRA_RESERVED_VRAM == 400 * 2**20 + 2**30
        other_worker.submit(hooks.reserve, 0).result()
    assert fake_comfy.mm.EXTRA_RESERVED_VRAM == 400 * 2**20


def test_is_busy_and_free_memory_follow_the_prompt_queue(fake_comfy):
    host = import_pack("nodes.host")
    hooks = host.ComfyHostHooks(busy_wait_s=0.0)
    assert hooks.is_busy() is False
    hooks.free_memory()
    assert fake_comfy.mm.calls == ["unload_all_models", "soft_empty_cache"]
    # A prompt waiting in the queue keeps the run paused, but nothing runs that unloading would break.
    fake_comfy.queued.append((1, "prompt-2", {}, {}, []))
    assert hooks.is_busy() is True
    fake_comfy.mm.calls.clear()
    hooks.free_memory()
    assert fake_comfy.mm.calls == ["unload_all_models", "soft_empty_cache"]
    fake_comfy.queued.clear()
    fake_comfy.running.append((0, "prompt-1", {}, {}, []))
    assert hooks.is_busy() is True
    fake_comfy.mm.calls.clear()
    hooks.free_memory()  # never unload models under a running prompt
    assert fake_comfy.mm.calls == ["soft_empty_cache"]


def test_run_outputs_are_registered_as_model_folders(fake_comfy, tmp_path):
    host = import_pack("nodes.host")
    lora = host.register_run_outputs(tmp_path / "finetune" / "a", "lora")
    full = host.register_run_outputs(tmp_path / "finetune" / "b", "full")
    assert fake_comfy.registered == [("loras", str(lora)), ("diffusion_models", str(full))]
    assert lora.is_dir() and lora.name == "checkpoints"
    with pytest.raises(ValueError, match="method 'dreambooth' has no model folder; use one of lora, full"):
        host.register_run_outputs(tmp_path / "finetune" / "c", "dreambooth")
