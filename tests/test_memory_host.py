"""memory_mode on the ComfyUI side, against stand-ins for ComfyUI's modules: the free VRAM the
host hands the trainer, the room it makes when a paused run takes its memory back, and the memory
line of the Train and Step Plan nodes."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from comfy_server import import_pack

from trainer.config import TrainConfig
from trainer.engine.memory import GiB


@pytest.fixture
def fake_mm(monkeypatch):
    """A fake ``comfy.model_management`` on a 12 GiB card with one 2 GiB model loaded."""
    cuda = torch.device("cuda", 0)
    model = types.SimpleNamespace(device=cuda, model_loaded_memory=lambda: 2 * GiB, model="patcher")
    mm = types.SimpleNamespace(
        EXTRA_RESERVED_VRAM=int(0.5 * GiB),
        current_loaded_models=[model],
        get_torch_device=lambda: cuda,
        get_free_memory=lambda dev=None: 9 * GiB,
        freed=[],
    )
    mm.free_memory = lambda required, device, keep_loaded=(): mm.freed.append((required, device, keep_loaded))
    comfy_pkg = types.ModuleType("comfy")
    comfy_pkg.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", comfy_pkg)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    return mm


def test_the_host_hands_the_trainer_free_vram_less_its_own_reserve(fake_mm):
    host = import_pack("nodes.host")
    hooks = host.ComfyHostHooks()
    assert hooks.free_vram(torch.device("cuda", 0)) == int(8.5 * GiB)
    assert hooks.free_vram(torch.device("cpu")) is None
    # While a trainer holds memory, EXTRA_RESERVED_VRAM counts it too; only ComfyUI's own is left out.
    hooks.reserve(3 * GiB)
    assert fake_mm.EXTRA_RESERVED_VRAM == int(3.5 * GiB)
    assert hooks.free_vram(torch.device("cuda", 0)) == int(8.5 * GiB)
    hooks.reserve(0)
    # A run queued now would also get what unloading ComfyUI's loaded model frees.
    device, free = host.vram_for_a_new_run()
    assert (device.type, free) == ("cuda", int(10.5 * GiB))


def test_a_run_taking_back_its_memory_has_comfyui_unload_all_but_the_model_it_trains(fake_mm, monkeypatch):
    host = import_pack("nodes.host")
    monkeypatch.setattr(host, "_prompt_queue", lambda: ([], []))
    hooks = host.ComfyHostHooks()
    hooks.reserve(3 * GiB)  # reserved before the run lent its memory: not counted as ComfyUI's own
    assert hooks.make_room(2 * GiB, keep=("patcher",))
    cuda = torch.device("cuda", 0)
    # Free: the 2 GiB asked for, plus what ComfyUI keeps free for itself.
    assert fake_mm.freed == [(int(2.5 * GiB), cuda, fake_mm.current_loaded_models)]
    assert hooks.make_room(2 * GiB, keep=("another patcher",))
    assert fake_mm.freed[-1][2] == []
    # Never under a running prompt: the run is told to wait and ask again.
    monkeypatch.setattr(host, "_prompt_queue", lambda: ([("prompt",)], []))
    assert not hooks.make_room(2 * GiB)
    assert len(fake_mm.freed) == 2
    monkeypatch.setattr(host, "_prompt_queue", lambda: ([], []))
    fake_mm.get_torch_device = lambda: torch.device("cpu")
    assert hooks.make_room(2 * GiB)
    assert len(fake_mm.freed) == 2


def test_the_train_node_line_says_what_auto_would_choose_now(fake_mm, monkeypatch):
    preview = import_pack("nodes.memory_preview")
    # The figures below are without bitsandbytes (installed or not here).
    monkeypatch.setattr(
        sys.modules[preview.plan_memory.__module__], "bitsandbytes_usable", lambda device: False
    )
    lora = TrainConfig(arch="sdxl", batch_size=4)
    assert preview.memory_line(lora) == (
        "memory auto: 10.5 GiB free; SDXL LoRA 1024 b4 needs ~26.6 GiB → gradient checkpointing (~7.9 GiB)"
    )
    full = TrainConfig(arch="sdxl", method="full")
    assert preview.memory_line(full).startswith(
        "refused at start: memory_mode: SDXL full 1024 b1 needs at least ~23.2 GiB of GPU memory"
    )
    assert preview.memory_line(TrainConfig(base_model="")) == (
        "memory auto: chosen when the run starts (the model family is not known yet)"
    )
    fake_mm.get_torch_device = lambda: torch.device("cpu")
    assert preview.memory_line(lora) == "memory auto: no GPU, nothing to fit (SDXL LoRA 1024 b4)"
