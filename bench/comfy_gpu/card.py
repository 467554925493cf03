"""Card emulation: make one ComfyUI process see an N GiB GPU on a bigger one.

How it is done (the harness prints this):

- PyTorch's allocator: ``torch.cuda.set_per_process_memory_fraction`` caps what the caching
  allocator may reserve at N GiB less the CUDA context the process already holds (a real N GiB
  card holds its context too), so an allocation past the card fails with the usual
  ``OutOfMemoryError``.
- Everything that plans with the driver's numbers (ComfyUI's ``get_total_memory`` /
  ``get_free_memory``, the trainer's memory mode): ``torch.cuda.mem_get_info`` answers
  ``(N - context - reserved by this process, N)``, never more than the real free memory. ComfyUI
  keeps its own default ``--reserve-vram`` headroom on top, as on a real card of that size.
- ComfyUI's DynamicVRAM (comfy-aimdo, on by default in v0.33 on CUDA) stages model weights with
  its own allocator, outside PyTorch's fraction, and budgets from NVML's view of the whole GPU.
  The server is started with ``--vram-headroom`` = real size − N GiB (:func:`dynamic_vram_headroom`),
  which aimdo keeps free "counting VRAM from other apps", so its budget is the card too. That
  headroom is fixed at start: lifting the cap for the uncapped twin run (``/harness/card``) frees
  the trainer, not ComfyUI's staging.

The hook is a ``sitecustomize.py`` the harness writes into a folder that only the server's
``PYTHONPATH`` names; it reads ``FINETUNE_CARD_GIB`` and applies the cap at the first CUDA memory
query (ComfyUI's start-up ``get_total_memory``), then proves it: an allocation of N GiB must
fail and one of N − 1.5 GiB must succeed. It logs one ``finetune-card:`` line with the outcome.

The arithmetic lives in pure functions here (tested on the CPU); :data:`HOOK_SOURCE` is the hook.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 2**30
#: What the probe leaves below the cap: it must fit beside the context and allocator slack.
PROBE_MARGIN_GIB = 1.5
LOG_PREFIX = "finetune-card:"


@dataclass(frozen=True)
class CardPlan:
    """The numbers of one emulated card.

    Attributes:
        card_bytes: the card's size (what ``mem_get_info`` reports as total).
        real_total_bytes: the GPU's real size.
        context_bytes: what the process held before its first allocation (the CUDA context).
        fraction: the per-process memory fraction given to PyTorch's allocator.
        cap_bytes: what the allocator may reserve (``fraction × real_total_bytes``).
    """

    card_bytes: int
    real_total_bytes: int
    context_bytes: int
    fraction: float
    cap_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def plan_card(card_gib: float, real_total_bytes: int, context_bytes: int) -> CardPlan:
    """The allocator cap for an N GiB card on a GPU of ``real_total_bytes``.

    Raises:
        ValueError: the card is not smaller than the GPU, or leaves nothing beside the context.
    """
    card = int(card_gib * GIB)
    if card <= 0:
        raise ValueError(f"--card-gib must be positive, got {card_gib}")
    if card >= real_total_bytes:
        raise ValueError(
            f"--card-gib {card_gib:g} is not smaller than the GPU ({real_total_bytes / GIB:.1f} GiB); "
            f"pass 0 for the whole card"
        )
    cap = card - max(0, context_bytes)
    if cap <= 0:
        raise ValueError(
            f"--card-gib {card_gib:g} leaves nothing beside the CUDA context ({context_bytes / GIB:.2f} GiB)"
        )
    fraction = cap / real_total_bytes
    return CardPlan(card, real_total_bytes, context_bytes, fraction, int(fraction * real_total_bytes))


def dynamic_vram_headroom(card_gib: float, real_total_bytes: int) -> float:
    """``--vram-headroom`` in GiB that leaves ComfyUI's DynamicVRAM an N GiB card's room."""
    return max(0.0, real_total_bytes / GIB - card_gib)


def gpu_total_bytes(index: int = 0) -> int | None:
    """The GPU's size from NVML (no CUDA context in the harness's process), or None without one."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML or no GPU: the CPU smoke
        return None


def clamped_mem_info(plan: CardPlan, real_free: int, reserved: int) -> tuple[int, int]:
    """``(free, total)`` as the emulated card reports them: the card's room left beside what this
    process's allocator reserved, never more than the real GPU has free."""
    return max(0, min(real_free, plan.cap_bytes - reserved)), plan.card_bytes


def probe_sizes(plan: CardPlan) -> tuple[int, int]:
    """(bytes that must fail, bytes that must fit) for the start-up probe."""
    return plan.card_bytes, max(0, plan.cap_bytes - int(PROBE_MARGIN_GIB * GIB))


def parse_log_line(text: str) -> dict | None:
    """The hook's report from a server log (the last ``finetune-card:`` line), or None."""
    found = None
    for line in text.splitlines():
        if line.startswith(LOG_PREFIX):
            found = line[len(LOG_PREFIX) :].strip()
    if found is None:
        return None
    return json.loads(found)


def describe(report: dict) -> str:
    """One sentence saying how the card was emulated and whether the probe held."""
    if not report.get("card_gib"):
        return "card emulation: off (the whole GPU)"
    plan = report["plan"]
    held = report.get("probe_fail_refused") and report.get("probe_fit_allowed")
    return (
        f"card emulation: {report['card_gib']:g} GiB on a {plan['real_total_bytes'] / GIB:.1f} GiB GPU: "
        f"torch.cuda.set_per_process_memory_fraction({plan['fraction']:.4f}) caps the allocator at "
        f"{plan['cap_bytes'] / GIB:.2f} GiB (+{plan['context_bytes'] / GIB:.2f} GiB CUDA context), and "
        f"torch.cuda.mem_get_info reports a {plan['card_bytes'] / GIB:.1f} GiB total to ComfyUI and the "
        f"trainer; probe: {report['probe_fail_bytes'] / GIB:.2f} GiB "
        f"{'refused' if report.get('probe_fail_refused') else 'NOT refused'}, "
        f"{report['probe_fit_bytes'] / GIB:.2f} GiB {'allowed' if report.get('probe_fit_allowed') else 'NOT allowed'}"
        f" -> {'holds' if held else 'DOES NOT HOLD'}"
    )


def write_hook(folder: Path) -> Path:
    """Write the ``sitecustomize.py`` hook (and this module, which it imports) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "finetune_card.py").write_text(Path(__file__).read_text(encoding="utf-8"), encoding="utf-8")
    path = folder / "sitecustomize.py"
    path.write_text(HOOK_SOURCE, encoding="utf-8")
    return path


HOOK_SOURCE = '''"""Written by bench/comfy_gpu: emulates a FINETUNE_CARD_GIB GiB card in this process.

``set_card(gib)`` changes the card later (0: the whole GPU); the harness's route calls it.
"""
import os

if os.environ.get("FINETUNE_CARD_GIB", "") != "":
    import json
    import sys

    import torch

    import finetune_card as _card

    _real_mem_get_info = torch.cuda.mem_get_info
    _state = {"gib": float(os.environ["FINETUNE_CARD_GIB"])}

    def _probe(device, plan):
        fail, fit = _card.probe_sizes(plan)
        report = {"probe_fail_bytes": fail, "probe_fit_bytes": fit}
        try:
            x = torch.empty(fail, dtype=torch.uint8, device=device)
            del x
            report["probe_fail_refused"] = False
        except torch.OutOfMemoryError:
            report["probe_fail_refused"] = True
        try:
            x = torch.empty(fit, dtype=torch.uint8, device=device)
            del x
            report["probe_fit_allowed"] = True
        except torch.OutOfMemoryError:
            report["probe_fit_allowed"] = False
        torch.cuda.empty_cache()
        return report

    def set_card(gib, device=None):
        """Cap this process at ``gib`` GiB (0: uncapped), probe it and return the report."""
        if device is None:
            device = torch.cuda.current_device()
        torch.cuda.empty_cache()
        free, total = _real_mem_get_info(device)
        if "context" not in _state:
            _state["context"] = max(0, total - free - torch.cuda.memory_reserved(device))
        _state["gib"] = float(gib)
        if not gib:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            _state["plan"] = None
            report = {"card_gib": 0, "real_total_bytes": total}
        else:
            plan = _card.plan_card(float(gib), total, _state["context"])
            torch.cuda.set_per_process_memory_fraction(plan.fraction, device)
            _state["plan"] = plan
            report = {"card_gib": float(gib), "plan": plan.to_dict(), **_probe(device, plan)}
        _state["report"] = report
        print(_card.LOG_PREFIX, json.dumps(report), file=sys.stderr, flush=True)
        return report

    def report():
        return _state.get("report")

    def mem_get_info(device=None):
        if device is None:
            device = torch.cuda.current_device()
        if "report" not in _state:
            set_card(_state["gib"], device)
        free, total = _real_mem_get_info(device)
        if _state["plan"] is None:
            return free, total
        return _card.clamped_mem_info(_state["plan"], free, torch.cuda.memory_reserved(device))

    torch.cuda.mem_get_info = mem_get_info
    torch.cuda.memory.mem_get_info = mem_get_info
'''


#: A harness-only custom node (never part of the pack): ``GET /harness/card`` returns the hook's
#: report, ``POST /harness/card {"gib": N}`` re-caps the process (0: uncapped) and probes again.
ROUTE_NODE_SOURCE = '''"""Written by bench/comfy_gpu: the card-emulation route (harness only)."""
import asyncio

from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS = {}


def _hook():
    try:
        import sitecustomize
    except ImportError:
        return None
    return sitecustomize if hasattr(sitecustomize, "set_card") else None


@PromptServer.instance.routes.get("/harness/card")
async def card_report(request):
    hook = _hook()
    return web.json_response({"card_gib": 0} if hook is None else (hook.report() or {"card_gib": 0}))


@PromptServer.instance.routes.post("/harness/card")
async def card_set(request):
    hook = _hook()
    if hook is None:
        return web.json_response({"error": "the server was started without the card hook"}, status=409)
    body = await request.json()
    return web.json_response(await asyncio.to_thread(hook.set_card, float(body.get("gib", 0))))
'''


def write_route_node(custom_nodes: Path) -> Path:
    """Write the harness's route node into ``custom_nodes/finetune_harness_card``."""
    folder = custom_nodes / "finetune_harness_card"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "__init__.py"
    path.write_text(ROUTE_NODE_SOURCE, encoding="utf-8")
    return path
