"""``python -m bench``: our trainer's step against the plain diffusers + peft loop, side by side.

On the GPU (real-size models with random weights, built from the shipped configs)::

    python -m bench                       # issue 7's table: reference, peer (compiled reference), our defaults
    python -m bench --cases sdxl-lora-b4 --variants ref,eager,blocks,regions,default
    python -m bench --e2e sdxl-lora-b4:240:20 --cases none   # end to end through train()
    accelerate launch --num_processes 2 -m bench --cases none --e2e sdxl-lora-b4:90:30
                                          # the same run on two GPUs (samples/s of both)

On the CPU (tiny models, no compilation; checks that everything runs)::

    python -m bench --smoke

Prints one table row per (case, variant) as it goes and the whole table at the end; ``--out``
also gets ``results.json``. ``--budget-s`` skips what would start after that many seconds, so
a time-limited machine still prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from .cases import CASES, SMOKE_CASES, TABLE, VARIANTS, BenchCase
from .measure import Measurement, card_check, measure, profile_steps, train_flops
from .ours import our_step, variant_settings
from .reference import reference_step

log = logging.getLogger("finetune")
#: Variants that run the plain loop rather than our trainer: the reference and the peer (compiled).
REFERENCES = ("ref", "peer")


def _free(device: torch.device, *, reset_compiled: bool = True) -> None:
    """Drop what the last measurement left: compiled code (unless kept for the next run of the
    same model, as one process training again would), Python garbage, cached GPU blocks."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    if reset_compiled:
        torch._dynamo.reset()
        counters.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _environment(device: torch.device) -> dict:
    import diffusers
    import peft

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = "missing"
        env["card"] = card_check(device)
    return env


def _count_flops(step, model, case: BenchCase, device: torch.device) -> float:
    """FLOPs of one forward + backward (without gradient-checkpointing recomputation)."""
    if device.type != "cuda":
        return 0.0
    # Switched off and on by the flag diffusers' blocks read, so the run's own checkpointing
    # function (see trainer.engine.setup) stays in place.
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in checkpointed:
        m.gradient_checkpointing = False
    try:
        return float(train_flops(step))
    finally:
        for m in checkpointed:
            m.gradient_checkpointing = True


def _compile_stats() -> str:
    """Graphs compiled, recompilations and graph breaks so far (dynamo's counters)."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"].get("unique_graphs", 0)
    if not graphs:
        return ""
    breaks = sum(counters["graph_break"].values())
    recompiles = sum(v for k, v in counters["recompiles"].items()) if "recompiles" in counters else 0
    return f" graphs {graphs} breaks {breaks} recompiles {recompiles}"


def run_case(
    case: BenchCase,
    variants: list[str],
    device: torch.device,
    *,
    smoke: bool,
    warmup: int,
    timed: int,
    deadline: float,
    flops_cache: dict,
    print_row,
    profile: bool = False,
    profile_top: int = 0,
    trace_dir: Path | None = None,
    keep_compiled: bool = False,
) -> list[Measurement]:
    """Measure every variant of one case ("ref" = the reference loop, "peer" = it compiled)."""
    rows: list[Measurement] = []
    for variant in variants:
        name = f"{case.name} {variant}"
        if time.monotonic() > deadline:
            rows.append(
                Measurement(
                    name, math.nan, math.nan, math.nan, math.nan, math.nan, note="skipped: time budget"
                )
            )
            print_row(rows[-1])
            continue
        t_build = time.perf_counter()
        session = graphs = None
        try:
            if variant in REFERENCES:
                step, model = reference_step(case, device, smoke=smoke, peer=variant == "peer")
                count = step
                note = "whole denoiser under torch.compile" if variant == "peer" else ""
            else:
                settings = variant_settings(variant, VARIANTS[variant], device=device)
                ours = our_step(case, device, settings, smoke=smoke)
                step, model, session, count = ours.step, ours.model, ours.session, ours.fwd_bwd
                graphs = ours.graphs
                r = ours.report
                note = (
                    f"compiled {r.compiled_regions}"
                    + (f"+{r.compiled_methods}" if r.compiled_methods else "")
                    + (f" grouped {r.grouped_attentions}" if r.grouped_attentions else "")
                    + (f" geglu {r.split_geglus}" if r.split_geglus else "")
                    + (" cl" if r.channels_last else "")
                    + (f" ({r.compile_skipped})" if r.compile_skipped and settings.compile else "")
                    + (
                        f" (no graphs: {r.cuda_graphs_skipped})"
                        if r.cuda_graphs_skipped and settings.cuda_graphs
                        else ""
                    )
                )
            build_s = time.perf_counter() - t_build
            key = (case.arch, case.method, case.batch, case.resolution)
            if key not in flops_cache and (
                variant == "ref" or (variant != "peer" and not VARIANTS[variant].compile)
            ):
                flops_cache[key] = _count_flops(count, model, case, device)
            m = measure(
                name,
                step,
                device=device,
                batch=case.batch,
                flops_per_step=flops_cache.get(key, 0.0),
                warmup=warmup,
                timed=timed,
                note=note,
            )
            m.note = (m.note + f" build {build_s:.0f}s" + _compile_stats()).strip()
            if graphs is not None:
                st = graphs.stats
                m.note += f" graphs {st.captured}/{st.replayed}/{st.eager}" + (
                    f" OFF: {st.disabled}" if st.disabled else ""
                )
            if key not in flops_cache:
                m.mfu = math.nan
            if profile:
                m.profile = profile_steps(
                    step,
                    device,
                    top=profile_top,
                    # Letters, digits, '.', '_' and '-' only: "+" in a variant name trips file tools.
                    trace=trace_dir / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.json.gz"
                    if trace_dir
                    else None,
                )
        except torch.OutOfMemoryError as e:
            m = Measurement(
                name,
                math.nan,
                math.nan,
                math.nan,
                math.nan,
                math.nan,
                note=f"out of memory: {str(e).splitlines()[0][:120]}",
            )
        except Exception as e:  # a failing variant is a row of the table, not the end of the bench
            log.exception("bench: %s failed", name)
            m = Measurement(
                name,
                math.nan,
                math.nan,
                math.nan,
                math.nan,
                math.nan,
                note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}",
            )
        finally:
            if session is not None:
                session.restore()
            if graphs is not None:
                graphs.release()
            step = model = count = graphs = None  # noqa: F841 - drop the references before freeing
            _free(device, reset_compiled=not keep_compiled)
        rows.append(m)
        print_row(m)
        if m.profile:
            print(f"  profile {m.name}: {m.profile}", flush=True)
    ref = next((r for r in rows if r.name.endswith(" ref") and not math.isnan(r.samples_per_s)), None)
    peer = next((r for r in rows if r.name.endswith(" peer") and not math.isnan(r.samples_per_s)), None)
    for r in rows:
        if ref is not None and not math.isnan(r.samples_per_s):
            r.ratio = r.samples_per_s / ref.samples_per_s
        if peer is not None and not math.isnan(r.samples_per_s):
            r.peer_ratio = r.samples_per_s / peer.samples_per_s
    return rows


def parity(rows: list[Measurement], a: str = "eager", b: str = "default") -> str:
    """Step-by-step loss agreement of two variants of one case (same seeds, same batches)."""
    by = {r.name.split(" ", 1)[1]: r for r in rows}
    if a not in by or b not in by or not by[a].losses or not by[b].losses:
        return ""
    la, lb = by[a].losses, by[b].losses
    n = min(len(la), len(lb))
    rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(la[:n], lb[:n], strict=True)]
    return (
        f"parity {rows[0].name.split()[0]} {a} vs {b} over {n} steps: max |dloss|/loss {max(rel):.2e}, "
        f"median {sorted(rel)[n // 2]:.2e}; mean loss {sum(la[:n]) / n:.5f} vs {sum(lb[:n]) / n:.5f}"
    )


def _fmt(x: float, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


HEADER = f"{'case / variant':34} {'samples/s':>9} {'x ref':>6} {'x peer':>6} {'step ms':>8} {'peak GiB':>8} {'busy':>5} {'MFU':>5} {'compile s':>9}  note"


def row_text(m: Measurement) -> str:
    return (
        f"{m.name:34} {_fmt(m.samples_per_s, '9.2f')} {_fmt(m.ratio, '6.2f') if m.ratio else '     -'} {_fmt(m.peer_ratio, '6.2f') if m.peer_ratio else '     -'} {_fmt(m.step_ms, '8.1f')} "
        f"{_fmt(m.peak_gib, '8.2f')} {_fmt(m.gpu_busy, '5.2f')} {_fmt(m.mfu, '5.2f')} {_fmt(m.compile_s, '9.1f')}  {m.note}"
    )


def _parse_e2e(spec: str) -> list[tuple[str, int, int]]:
    out = []
    for part in filter(None, spec.split(",")):
        bits = part.split(":")
        if len(bits) != 3:
            raise SystemExit(f"--e2e: {part!r} must be CASE:STEPS:WARM, e.g. sdxl-lora-b4:240:20")
        out.append((bits[0], int(bits[1]), int(bits[2])))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny models on the CPU, no compilation (checks the plumbing)"
    )
    p.add_argument(
        "--cases", default=",".join(TABLE), help=f"comma list, 'none' or 'all' (known: {', '.join(CASES)})"
    )
    p.add_argument(
        "--variants",
        default="ref,peer,default",
        help=f"comma list: ref, peer (ref with the denoiser compiled) and/or {', '.join(VARIANTS)}",
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--timed", type=int, default=20)
    p.add_argument(
        "--parity",
        default="",
        help="comma list of cases whose eager and default variants run 50 steps and are compared step by step",
    )
    p.add_argument("--e2e", default="", help="end-to-end runs through train(): CASE:STEPS:WARM,...")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--no-t5", action="store_true", help="SD3 end to end without T5-XXL")
    p.add_argument(
        "--e2e-no-compile", action="store_true", help="end-to-end runs without compile (quick checks)"
    )
    p.add_argument(
        "--verbose", action="store_true", help="the trainer's log at DEBUG (tracebacks of fallbacks)"
    )
    p.add_argument(
        "--keep-compiled",
        action="store_true",
        help="keep compiled blocks between measurements (as one process training again would): saves compile time",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile 2 steps of each variant: kernel time by kind, idle time",
    )
    p.add_argument("--profile-top", type=int, default=0, help="with --profile: list the N costliest kernels")
    p.add_argument(
        "--trace", default="", help="with --profile: a folder for each variant's gzipped Chrome trace"
    )
    p.add_argument("--budget-s", type=float, default=1e9, help="start nothing new after this many seconds")
    p.add_argument("--out", default="", help="folder for results.json")
    p.add_argument(
        "--workdir", default="/tmp/finetune-bench", help="datasets and run folders of the end-to-end runs"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("finetune").setLevel(logging.DEBUG)

    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    device = torch.device("cpu") if args.smoke else torch.device("cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on the CPU", file=sys.stderr)
        return 2
    from trainer.engine.runtime import launched_world_size

    world = launched_world_size()
    # Under accelerate launch every rank runs this; rank 0 alone prints.
    say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None)
    if world > 1:
        if args.cases != "none":
            print(
                "under accelerate launch only end-to-end runs are measured: pass --cases none --e2e ...",
                file=sys.stderr,
            )
            return 2
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    table = SMOKE_CASES if args.smoke else CASES
    names = (
        list(table)
        if args.cases == "all"
        else []
        if args.cases == "none"
        else [c for c in args.cases.split(",") if c]
    )
    unknown = [n for n in names if n not in table]
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in REFERENCES and v not in VARIANTS]
    parity_cases = set(filter(None, args.parity.split(",")))
    if stray := sorted(parity_cases - set(names)):
        say(f"--parity {stray}: also name them in --cases", file=sys.stderr)
        return 2
    if unknown or bad:
        say(
            f"unknown cases {unknown} or variants {bad}; cases: {list(table)}; variants: ref, peer, {list(VARIANTS)}",
            file=sys.stderr,
        )
        return 2
    warmup, timed = (1, 2) if args.smoke else (args.warmup, args.timed)
    env = _environment(device)
    say("environment:", json.dumps(env), flush=True)
    say(HEADER, flush=True)

    results: dict = {"environment": env, "rows": [], "parity": [], "e2e": []}
    out = Path(args.out) if args.out else None

    def save() -> None:
        if out is not None and say is print:
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    def print_row(m: Measurement) -> None:
        say(row_text(m), flush=True)

    flops_cache: dict = {}
    all_rows: list[Measurement] = []
    for name in names:
        case = table[name]
        case_variants = variants
        case_timed = timed
        if name in parity_cases:
            case_variants = list(dict.fromkeys([*variants, "eager", "default"]))
            case_timed = max(timed, 50 - warmup) if not args.smoke else timed
        rows = run_case(
            case,
            case_variants,
            device,
            smoke=args.smoke,
            warmup=warmup,
            timed=case_timed,
            deadline=deadline,
            flops_cache=flops_cache,
            print_row=print_row,
            profile=args.profile,
            profile_top=args.profile_top,
            trace_dir=Path(args.trace) if args.trace else None,
            keep_compiled=args.keep_compiled,
        )
        all_rows += rows
        results["rows"] += [r.to_dict() for r in rows]
        if name in parity_cases:
            line = parity(rows)
            results["parity"].append(line)
            say(line, flush=True)
        save()

    from .e2e import run_e2e

    step_only = {
        r.name.split(" ")[0]: r
        for r in all_rows
        if r.name.endswith(" default") and not math.isnan(r.samples_per_s)
    }
    e2e_lines = []
    runs = _parse_e2e(args.e2e)
    for i, (case_name, steps, warm) in enumerate(runs):
        if case_name not in table:
            print(f"--e2e: unknown case {case_name!r}", file=sys.stderr)
            return 2
        if time.monotonic() > deadline:
            e2e_lines.append(f"{case_name} e2e: skipped (time budget)")
            say(e2e_lines[-1], flush=True)
            continue
        case = table[case_name]
        if args.smoke:
            steps, warm = min(steps, 6), min(warm, 3)
        try:
            r = run_e2e(
                case,
                device,
                steps=steps,
                warm=warm,
                checkpoint_every=args.checkpoint_every,
                workdir=Path(args.workdir),
                smoke=args.smoke,
                with_t5=not args.no_t5,
                compile=not args.e2e_no_compile,
            )
            ref = step_only.get(case_name)
            vs = (
                f", {r.samples_per_s / ref.samples_per_s:.2f}x step-only ({ref.samples_per_s:.2f})"
                if ref
                else ""
            )
            line = (
                f"{r.name}: {r.state}; {_fmt(r.samples_per_s, '.2f')} samples/s over steps {r.window[0]}-{r.window[1]}{vs}; "
                f"peak {_fmt(r.peak_gib, '.2f')} GiB; GPU busy {_fmt(r.gpu_busy, '.2f')}; caching+compile {r.first_steps_s:.0f}s; "
                f"model build {r.setup_s:.0f}s; checkpoints at {r.checkpoints}; median step {r.step_ms:.1f} ms"
                + (
                    f"; checkpoint costs {', '.join(f'{c:.2f}s' for c in r.checkpoint_s)}"
                    if r.checkpoint_s
                    else ""
                )
                + (
                    f"; {r.processes} processes, plan {r.plan}, files {r.checkpoint_files}"
                    if r.processes > 1
                    else ""
                )
            )
            results["e2e"].append(r.to_dict())
        except Exception as e:  # report and go on with the next run
            log.exception("bench: e2e %s failed", case_name)
            line = f"{case_name} e2e: failed: {type(e).__name__}: {e}"
        finally:
            # Runs of one architecture share compiled blocks, as runs in one ComfyUI process do.
            following = table.get(runs[i + 1][0]) if i + 1 < len(runs) else None
            same_model_next = following is not None and following.arch == case.arch
            _free(device, reset_compiled=not (args.keep_compiled or same_model_next))
        e2e_lines.append(line)
        say(line, flush=True)
        save()

    card = ""
    if env.get("card"):
        results["card_at_end"] = end = card_check(device)
        card = f", bf16 matmul {env['card']['matmul_tflops']} TFLOP/s at start, {end['matmul_tflops']} at end"
        save()
    say(
        f"\n=== table ({env.get('gpu', 'cpu')}, torch {env['torch']}, {time.monotonic() - t0:.0f}s{card}) ==="
    )
    say(HEADER)
    for m in all_rows:
        say(row_text(m))
    for m in all_rows:
        if m.profile:
            say(f"profile {m.name}: {m.profile}")
    for line in results["parity"] + e2e_lines:
        say(line)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
