"""The real-ComfyUI GPU harness (issue 14).

    python -m bench.comfy_gpu prepare                        # here: fill .comfy_gpu/ (ComfyUI + wheels)
    python -m bench.comfy_gpu run --scenarios sd15-lora      # on the device (card from the targets)
    python -m bench.comfy_gpu run --scenarios sdxl-lora --card-gib 12 --out $OUT
    python -m bench.comfy_gpu run --smoke                    # CPU: the real ComfyUI, tiny settings
    python -m bench.comfy_gpu run --smoke --scenarios flux-lora   # CPU: reduced-depth Flux files

``run`` unpacks the pinned ComfyUI from ``.comfy_gpu/`` (or uses ``--comfy``), builds real-size
random-weight checkpoints with ComfyUI's own classes (``tests/comfy_models.py build``; Flux.1-dev
is a folder of its four files, reduced to one double and one single block for ``--smoke``), and per
scenario starts ``main.py`` with the pack linked into ``custom_nodes`` and the card emulation hook
(:mod:`.card`), then drives it over HTTP and the websocket only. It prints how the card was
emulated, one table row per scenario and the issue's targets, and writes ``table.md``,
``rows.json`` and each server's log into ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import bundle, table
from .runner import ScenarioRunner, Settings, write_dataset
from .scenarios import (
    BUILT_ARCHS,
    DATASET_FOLDER,
    FLUX_FILES,
    MODEL_FILES,
    SCENARIOS,
    T5_FILE,
    Scenario,
    select,
)

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("comfy_gpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.comfy_gpu", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="fill .comfy_gpu/ with ComfyUI's archive and the wheels (needs pip)")
    r = sub.add_parser("run", help="run scenarios against a real ComfyUI")
    r.add_argument("--scenarios", default="sd15-lora", help=f"comma list or all: {', '.join(SCENARIOS)}")
    r.add_argument(
        "--card-gib", type=float, default=None,
        help="emulated card size in GiB for every scenario (0: the whole GPU); default: each scenario's target card",
    )  # fmt: skip
    r.add_argument("--parts", default=None, help="subset of 'abcu' (default: each scenario's)")
    r.add_argument("--steps", type=int, default=None, help="max_steps of each run (default: the scenario's)")
    r.add_argument("--prompts", type=int, default=10, help="txt2img prompts queued during run (b)")
    r.add_argument("--render-steps", type=int, default=20)
    r.add_argument("--smoke", action="store_true", help="CPU ComfyUI, 64 px, a few steps (no GPU)")
    r.add_argument(
        "--comfy", default=None, help="a ComfyUI checkout (default: unpack .comfy_gpu/comfyui.tar.gz)"
    )
    r.add_argument("--python", default=None, help="the server's python (default: this one)")
    r.add_argument(
        "--workdir", default="/tmp/comfy_gpu", help="servers' folders, models, the unpacked ComfyUI"
    )
    r.add_argument(
        "--model-cache",
        default=None,
        help="folder of built models (<arch>.safetensors; flux/, flux-depth1x1/)",
    )
    r.add_argument("--out", default=None, help="folder for table.md, rows.json and the server logs")
    r.add_argument("--timeout", type=float, default=1200.0, help="seconds for one run or prompt")
    r.add_argument(
        "--prebuild",
        default="",
        help="comma list of archs to build in the background for a later call (sdxl,sd3,flux,t5xxl)",
    )
    args = p.parse_args(argv)
    if args.command == "run":
        if args.card_gib is not None and args.card_gib < 0:
            p.error("--card-gib must be 0 (the whole GPU) or a size in GiB")
        if args.parts is not None and (not args.parts or set(args.parts) - set("abcu")):
            p.error(f"--parts takes letters of 'abcu', got {args.parts!r}")
        if args.prompts < 0 or args.render_steps < 1:
            p.error("--prompts must be >= 0 and --render-steps >= 1")
    return args


def card_for(scenario: Scenario, override: float | None, *, smoke: bool) -> float:
    """The card a scenario runs on: ``--card-gib`` if given, else its target card; the CPU has none."""
    if smoke:
        return 0.0
    return scenario.card_gib if override is None else override


def settings_for(args: argparse.Namespace) -> Settings:
    if args.smoke:
        return Settings(
            steps=args.steps or 4, prompts=min(args.prompts, 2), render_steps=2, render_size=64,
            idle_renders=1, warm_fraction=0.25, images=3, timeout=args.timeout, smoke=True,
        )  # fmt: skip
    return Settings(
        steps=args.steps, prompts=args.prompts, render_steps=args.render_steps, timeout=args.timeout
    )


#: Scenarios --smoke can run on the CPU: SD1.5 at real size, Flux at one double and one single block.
SMOKE_ARCHS = ("sd15", "flux")
SMOKE_FLUX_DEPTH = (1, 1)


def cache_name(arch: str, *, smoke: bool) -> str:
    """The built model's name in the cache: a checkpoint file, T5-XXL's file, or Flux's folder (by
    its depth)."""
    if arch in MODEL_FILES:
        return f"{arch}.safetensors"
    if arch == "t5xxl":
        return T5_FILE
    return "flux-depth{}x{}".format(*SMOKE_FLUX_DEPTH) if smoke else "flux"


def link_models(models_dir: Path, arch: str, built: Path) -> list[Path]:
    """Put a built model where the row's workflows load it (symlinks): a checkpoint under its
    shipped name in ``checkpoints``, T5-XXL in ``text_encoders``, Flux's four files in their
    folders. Returns the links."""
    if arch in MODEL_FILES:
        pairs = [(models_dir / "checkpoints" / MODEL_FILES[arch], built)]
    elif arch == "t5xxl":
        pairs = [(models_dir / "text_encoders" / T5_FILE, built)]
    else:
        pairs = [(models_dir / kind / name, built / name) for kind, name in FLUX_FILES.values()]
    for link, target in pairs:
        if not target.exists():
            raise SystemExit(f"the built {arch} model lacks {target}; delete {built} to build it again")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    return [link for link, _ in pairs]


def _build_command(
    arch: str, path: Path, comfy: Path, python: str, site: Path | None, *, smoke: bool = False
) -> tuple[list, dict]:
    paths = [str(site)] if site else []
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env = {
        **os.environ,
        "COMFYUI_PATH": str(comfy),
        "FINETUNE_COMPAT_THREADS": str(os.cpu_count() or 1),
        "PYTHONPATH": os.pathsep.join(paths),
    }
    cmd = [python, str(ROOT / "tests" / "comfy_models.py"), "build", "--arch", arch, "--out", str(path)]
    if arch == "flux" and smoke:
        cmd += ["--depth", str(SMOKE_FLUX_DEPTH[0]), "--single-depth", str(SMOKE_FLUX_DEPTH[1])]
    return cmd, env


def build_models(
    archs: set[str], cache: Path, comfy: Path, python: str, site: Path | None, *, smoke: bool = False
) -> dict[str, Path]:
    """Real-size random-weight models built with ComfyUI's classes, one per arch (cached; a
    checkpoint file, or Flux's folder of four files, written whole or not at all)."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for arch in sorted(archs):
        path = cache / cache_name(arch, smoke=smoke)
        if not path.exists():
            t0 = time.monotonic()
            cmd, env = _build_command(arch, path, comfy, python, site, smoke=smoke)
            subprocess.run(cmd, cwd=comfy, env=env, check=True)
            log.info("built %s in %.0f s", path.name, time.monotonic() - t0)
        out[arch] = path
    return out


def prebuild(
    archs: list[str], cache: Path, comfy: Path, python: str, site: Path | None, *, smoke: bool = False
) -> dict[str, subprocess.Popen]:
    """Start building ``archs`` in the background, in their own session so that they outlive this
    command (a later device call on the same machine finds them; the writes are atomic).

    Returns:
        The builds started, by arch (:func:`run` waits for one before its scenario).
    """
    cache.mkdir(parents=True, exist_ok=True)
    started = {}
    for arch in dict.fromkeys(archs):
        path = cache / cache_name(arch, smoke=smoke)
        if not path.exists():
            cmd, env = _build_command(arch, path, comfy, python, site, smoke=smoke)
            with open(cache / f"{arch}.build.log", "wb") as f:
                started[arch] = subprocess.Popen(
                    cmd, cwd=comfy, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
                )
    return started


def _install(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path | None]:
    if args.comfy:
        return Path(args.comfy).resolve(), None
    if not (bundle.BUNDLE / "comfyui.tar.gz").is_file():
        raise SystemExit("no .comfy_gpu/comfyui.tar.gz: run `python -m bench.comfy_gpu prepare` here first")
    comfy, site = bundle.install(bundle.BUNDLE, workdir, wheels=not args.smoke)
    return comfy, site


def run(args: argparse.Namespace) -> int:
    scenarios = select(args.scenarios)
    if args.smoke:
        scenarios = [s for s in scenarios if s.arch in SMOKE_ARCHS] or [SCENARIOS["sd15-lora"]]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    comfy, site = _install(args, workdir)
    if site is not None and str(site) not in sys.path:
        sys.path.append(str(site))  # websocket-client for this process
    python = args.python or sys.executable
    if site is not None and not args.smoke:
        print(bundle.check_bitsandbytes(site, python), flush=True)
    cache = Path(args.model_cache) if args.model_cache else workdir / "models"
    # The first scenario's model is built now; the others' (and --prebuild's) in the background.
    models = build_models(set(scenarios[0].builds), cache, comfy, python, site, smoke=args.smoke)
    later = [a for s in scenarios[1:] for a in s.builds] + [
        a for a in args.prebuild.split(",") if a in BUILT_ARCHS
    ]
    building = prebuild(later, cache, comfy, python, site, smoke=args.smoke)
    settings = settings_for(args)
    rows = []
    from . import comfy_process as srv

    for scenario in scenarios:
        card_gib = card_for(scenario, args.card_gib, smoke=args.smoke)
        base = workdir / f"server-{scenario.name}"
        shutil.rmtree(base, ignore_errors=True)
        srv.layout_base(base)
        for arch in scenario.builds:
            if arch in building:
                t0 = time.monotonic()
                if building.pop(arch).wait() != 0:
                    raise SystemExit(f"building the {arch} model failed: see {cache}/{arch}.build.log")
                log.info("waited %.0f s for the %s model", time.monotonic() - t0, arch)
        models.update(build_models(set(scenario.builds), cache, comfy, python, site, smoke=args.smoke))
        for arch in scenario.builds:
            link_models(base / "models", arch, models[arch])
        size = settings.render_size or scenario.resolution
        write_dataset(base / "input" / DATASET_FOLDER, size=size, count=settings.images)
        print(
            f"== {scenario.name}: card {card_gib:g} GiB, {settings.steps or scenario.steps} steps", flush=True
        )
        server = srv.start(
            comfy, python, base, card_gib=card_gib, site=site, cpu=args.smoke, hook_dir=workdir / "hook",
            extra_env={"TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor")},
        )  # fmt: skip
        try:
            parts = args.parts or scenario.parts

            def save_partial(partial) -> None:
                (out / "table.md").write_text(table.markdown([*rows, partial]) + "\n", encoding="utf-8")
                (out / "rows.json").write_text(table.to_json([*rows, partial]), encoding="utf-8")

            row = ScenarioRunner(server, scenario, settings, card_gib).run(parts, on_part=save_partial)
        finally:
            server.stop()
            shutil.copy(server.log_path, out / f"server-{scenario.name}.log")
        rows.append(row)
        print(row.card, flush=True)
        print(table.markdown([row]), flush=True)
        runs = [r for r in (row.alone, row.busy, row.uncapped) if r]
        for line in (
            table.targets(row)
            + [f"{r.name}: {r.chosen}" for r in runs if r.chosen]
            + row.notes
            + row.render_errors[:5]
        ):
            print("  " + line, flush=True)
        (out / "table.md").write_text(table.markdown(rows) + "\n", encoding="utf-8")
        (out / "rows.json").write_text(table.to_json(rows), encoding="utf-8")
    print("\n" + table.markdown(rows), flush=True)
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    # A device call's `timeout` ends the harness with SIGTERM: exit through the `finally` blocks, so
    # the server is stopped and its log copied into --out with the partial table.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "prepare":
        print(bundle.prepare())
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
