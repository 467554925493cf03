"""The harness's table: one markdown row per scenario, and the targets each row is checked against."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict

from .runner import Row, loss_gap

COLUMNS = (
    "scenario", "card", "peak process (NVML)", "peak trainer", "samples/s alone", "samples/s w/ prompts",
    "render idle", "render during run (median / max)", "pauses", "OOMs", "wall growth / allowed",
    "sweep; stock loaders", "lora key not loaded", "loss vs uncapped",
)  # fmt: skip


def _f(x: float | None, spec: str = ".2f", unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{format(x, spec)}{unit}"


def growth(row: Row) -> tuple[float, float]:
    """(how much longer the steady window took with prompts, what the target allows: the renders
    that ran inside the run plus 5 % of the window alone), in seconds."""
    if not row.alone or not row.busy:
        return math.nan, math.nan
    a, b = row.alone, row.busy
    if a.window != b.window or math.isnan(a.window_s) or math.isnan(b.window_s):
        return math.nan, math.nan
    in_run = sorted(row.render_during_s)[: row.renders_in_run]
    return b.window_s - a.window_s, sum(in_run) + 0.05 * a.window_s


def cells(row: Row) -> list[str]:
    a, b, u = row.alone, row.busy, row.uncapped
    peaks = [r.process_peak_gib for r in (a, b) if r]
    peak_process = max(peaks) if peaks and not all(math.isnan(p) for p in peaks) else math.nan
    trainer = [r.trainer_peak_gib for r in (a, b) if r and not math.isnan(r.trainer_peak_gib)]
    during = row.render_during_s
    grow, allowed = growth(row)
    if a and u:
        gap, mean_a, mean_u, n = loss_gap(a.losses, u.losses)
        loss = f"max {gap:.2e} over {n} steps (mean {mean_a:.4f} vs {mean_u:.4f})" if n else "n/a"
    else:
        loss = "not run"
    pauses = b.pauses if b else 0
    card = f"{row.card_gib:g} GiB" if row.card_gib else "whole GPU"
    if row.card_held is False:
        card += " (cap NOT held)"
    return [
        row.scenario,
        card,
        _f(peak_process, ".2f", " GiB"),
        _f(max(trainer) if trainer else math.nan, ".2f", " GiB"),
        _f(a.samples_per_s if a else math.nan),
        _f(b.samples_per_s if b else math.nan),
        _f(row.idle_render_s, ".2f", " s"),
        f"{_f(statistics.median(during) if during else math.nan, '.2f')} / {_f(max(during) if during else math.nan, '.2f')} s"
        + (f" ({row.renders_in_run}/{len(during)} in run)" if during else ""),
        str(pauses),
        str(row.ooms),
        f"{_f(grow, '.1f')} / {_f(allowed, '.1f')} s",
        f"{row.sweep or 'not run'}; {row.stock or 'not run'}",
        str(row.lora_not_loaded) if row.sweep else "n/a",
        loss,
    ]


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def targets(row: Row) -> list[str]:
    """Issue 14's targets for one row: 'met', 'MISSED' or 'n/a' each, with the numbers."""
    out = [
        f"no OOM: {'met' if row.ooms == 0 and not row.render_errors else 'MISSED'} ({row.ooms} in the log, {len(row.render_errors)} prompt errors)"
    ]
    grow, allowed = growth(row)
    if not math.isnan(grow):
        out.append(
            f"wall growth <= renders + 5 %: {'met' if grow <= allowed else 'MISSED'} ({grow:.1f} <= {allowed:.1f} s)"
        )
    if row.render_during_s and not math.isnan(row.idle_render_s):
        worst = max(row.render_during_s[: max(1, row.renders_in_run)])
        ratio = worst / row.idle_render_s
        out.append(
            f"render during run <= 1.25x idle: {'met' if ratio <= 1.25 else 'MISSED'} (worst {ratio:.2f}x)"
        )
    if row.sweep:
        out.append(
            f"zero 'lora key not loaded': {'met' if row.lora_not_loaded == 0 else 'MISSED'} ({row.lora_not_loaded})"
        )
    return out


def to_json(rows: list[Row]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=1, default=str)
