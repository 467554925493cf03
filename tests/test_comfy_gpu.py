"""The pure parts of the real-ComfyUI GPU harness (``bench/comfy_gpu``): arguments, card-emulation
arithmetic, the prompts it queues, the steady-window and loss arithmetic, and the table. The
harness itself runs with ``python -m bench.comfy_gpu run --smoke`` (a real ComfyUI on the CPU)
and on the device."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zipfile

import pytest

from bench.comfy_gpu import bundle, card, table
from bench.comfy_gpu import comfy_process as srv
from bench.comfy_gpu.__main__ import (
    SMOKE_ARCHS,
    _build_command,
    cache_name,
    card_for,
    link_models,
    parse_args,
    settings_for,
)
from bench.comfy_gpu.runner import Row, RunResult, count_ooms, loss_gap, memory_choice, steady_window
from bench.comfy_gpu.scenarios import (
    FLUX_FILES,
    MODEL_FILES,
    SCENARIOS,
    read_workflow,
    select,
    sweep_prompt,
    train_node_id,
    training_prompt,
    txt2img_prompt,
)

GIB = 2**30


# --------------------------------------------------------------------------------------------
# Arguments


def test_run_defaults_take_each_scenarios_target_card():
    args = parse_args(["run"])
    assert (args.scenarios, args.card_gib, args.parts, args.prompts, args.render_steps) == (
        "sd15-lora", None, None, 10, 20,
    )  # fmt: skip
    assert card_for(SCENARIOS["sd15-lora"], args.card_gib, smoke=False) == 8
    assert card_for(SCENARIOS["sdxl-lora"], None, smoke=False) == 12
    assert card_for(SCENARIOS["sdxl-lora"], 0.0, smoke=False) == 0.0
    assert card_for(SCENARIOS["sdxl-lora"], 12, smoke=True) == 0.0  # the CPU has no card


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--card-gib", "-1"], "--card-gib must be 0"),
        (["run", "--parts", "abx"], "--parts takes letters of 'abcu'"),
        (["run", "--prompts", "-2"], "--prompts must be >= 0"),
    ],
)
def test_bad_arguments_are_refused_with_one_sentence(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_scenarios_name_the_known_ones():
    with pytest.raises(SystemExit, match="unknown \\['sd9'\\]; choose from sd15-lora, sdxl-lora"):
        select("sd15-lora,sd9")
    assert [s.name for s in select("all")] == list(SCENARIOS)


def test_smoke_settings_are_small():
    s = settings_for(parse_args(["run", "--smoke"]))
    assert (s.steps, s.prompts, s.render_steps, s.render_size, s.images, s.smoke) == (4, 2, 2, 64, 3, True)
    s = settings_for(parse_args(["run", "--steps", "50", "--prompts", "3"]))
    assert (s.steps, s.prompts, s.render_steps, s.render_size, s.smoke) == (50, 3, 20, None, False)


# --------------------------------------------------------------------------------------------
# Card emulation


def test_the_allocator_cap_leaves_the_context_inside_the_card():
    plan = card.plan_card(8, 80 * GIB, GIB // 2)
    assert plan.card_bytes == 8 * GIB
    assert plan.cap_bytes == pytest.approx(7.5 * GIB, abs=1)
    assert plan.fraction == pytest.approx(7.5 / 80)
    # mem_get_info: the card's room beside what this process reserved, never more than is free
    assert card.clamped_mem_info(plan, real_free=70 * GIB, reserved=2 * GIB) == (
        pytest.approx(5.5 * GIB, abs=1), 8 * GIB,
    )  # fmt: skip
    assert card.clamped_mem_info(plan, real_free=GIB, reserved=0) == (GIB, 8 * GIB)
    assert card.clamped_mem_info(plan, real_free=70 * GIB, reserved=9 * GIB) == (0, 8 * GIB)
    fail, fit = card.probe_sizes(plan)
    assert fail == 8 * GIB
    assert fit == pytest.approx(6 * GIB, abs=1)


def test_comfyuis_dynamic_vram_is_left_the_cards_room():
    """comfy-aimdo stages weights outside PyTorch's fraction (the GPU run saw a 12 GiB card's
    process peak at 15.55 GiB): its headroom is the rest of the real GPU."""
    h100 = 85_017_493_504  # what NVML reported on the device
    assert card.dynamic_vram_headroom(12, h100) == pytest.approx(h100 / GIB - 12)
    assert srv.dynamic_vram_args(12, h100) == ["--vram-headroom", "67.18"]
    assert card.dynamic_vram_headroom(100, h100) == 0.0
    assert srv.dynamic_vram_args(12, None) == []  # no NVML: the CPU smoke


@pytest.mark.parametrize(
    ("gib", "message"),
    [
        (80, "--card-gib 80 is not smaller than the GPU \\(80.0 GiB\\); pass 0 for the whole card"),
        (0.25, "leaves nothing beside the CUDA context"),
        (-1, "--card-gib must be positive"),
    ],
)
def test_impossible_cards_are_refused(gib, message):
    with pytest.raises(ValueError, match=message):
        card.plan_card(gib, 80 * GIB, GIB // 2)


def test_the_hooks_log_line_reads_back_and_says_whether_the_cap_held():
    plan = card.plan_card(12, 80 * GIB, GIB // 2)
    report = {"card_gib": 12.0, "plan": plan.to_dict(), "probe_fail_bytes": 12 * GIB,
              "probe_fit_bytes": 10 * GIB, "probe_fail_refused": True, "probe_fit_allowed": True}  # fmt: skip
    log = f"noise\n{card.LOG_PREFIX} {json.dumps({'card_gib': 0})}\n{card.LOG_PREFIX} {json.dumps(report)}\nmore"
    assert card.parse_log_line(log) == report
    assert card.parse_log_line("no hook here") is None
    text = card.describe(report)
    assert "torch.cuda.set_per_process_memory_fraction(0.1437)" in text
    assert "reports a 12.0 GiB total" in text
    assert text.endswith("12.00 GiB refused, 10.00 GiB allowed -> holds")
    assert card.describe({**report, "probe_fail_refused": False}).endswith("-> DOES NOT HOLD")
    assert card.describe({"card_gib": 0}) == "card emulation: off (the whole GPU)"


def test_the_written_hook_is_inert_without_the_variable(tmp_path):
    card.write_hook(tmp_path)
    card.write_route_node(tmp_path / "custom_nodes")
    assert (tmp_path / "custom_nodes" / "finetune_harness_card" / "__init__.py").is_file()
    out = subprocess.run(
        [sys.executable, "-c", "import sitecustomize, finetune_card; print(hasattr(sitecustomize, 'set_card'))"],
        cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------
# Prompts


def test_the_training_prompt_is_the_shipped_workflow_with_only_the_runs_length_changed():
    shipped = read_workflow("train_lora_sd15")
    prompt = training_prompt(SCENARIOS["sd15-lora"], run_name="r-a", steps=300)
    node, before = prompt[train_node_id(prompt)]["inputs"], shipped[train_node_id(shipped)]["inputs"]
    changed = {k for k in node if node[k] != before[k]}
    assert changed <= {"run_name", "max_steps", "epochs", "checkpoint_every", "validation_prompts"}
    assert (node["run_name"], node["max_steps"], node["checkpoint_every"], node["ckpt_name"]) == (
        "r-a", 300, 150, MODEL_FILES["sd15"],
    )  # fmt: skip
    assert set(prompt) == set(shipped)


def test_the_speed_row_trains_batch_4_without_checkpointing_and_smoke_shrinks_the_run():
    node = training_prompt(SCENARIOS["sdxl-lora-b4"], run_name="b4", steps=230)
    inputs = node[train_node_id(node)]["inputs"]
    assert (inputs["batch_size"], inputs["gradient_checkpointing"], inputs["resolution"]) == (4, False, 1024)
    smoke = training_prompt(SCENARIOS["sd15-lora"], run_name="s", steps=4, smoke=True)
    inputs = smoke[train_node_id(smoke)]["inputs"]
    assert (inputs["resolution"], inputs["compile"], inputs["mixed_precision"], inputs["checkpoint_every"]) == (
        64, False, "fp32", 2,
    )  # fmt: skip


def test_sd3_lora_moves_the_shipped_sd3_settings_onto_a_train_lora_node_with_t5():
    prompt = training_prompt(SCENARIOS["sd3-lora"], run_name="sd3", steps=100)
    node = prompt[train_node_id(prompt)]
    assert node["class_type"] == "FinetuneTrainLoRA"
    inputs = node["inputs"]
    assert (inputs["ckpt_name"], inputs["t5xxl"], inputs["use_t5"], inputs["resolution"]) == (
        MODEL_FILES["sd3"], "t5xxl_fp8_e4m3fn.safetensors", True, 1024,
    )  # fmt: skip
    # The row builds T5-XXL too (the Flux builder's fp8 file) and links it where the node's
    # t5xxl list reads (ComfyUI's text_encoders).
    assert SCENARIOS["sd3-lora"].builds == ("sd3", "t5xxl") and SCENARIOS["sd15-lora"].builds == ("sd15",)
    assert inputs["lora_rank"] == 16 and inputs["batch_size"] == 6  # LoRA inputs, the SD3 run's batch
    plans = [n["inputs"] for n in prompt.values() if n["class_type"] == "FinetuneStepPlan"]
    assert plans and plans[0]["max_steps"] == 100 and plans[0]["validation_every"] == 0
    smoke = training_prompt(SCENARIOS["sd3-lora"], run_name="sd3", steps=4, smoke=True)
    (plan,) = [n["inputs"] for n in smoke.values() if n["class_type"] == "FinetuneStepPlan"]
    # the plan scans with the Train node's bucket sizes (its size rule leaves out the same images)
    assert (plan["min_bucket_resolution"], plan["max_bucket_resolution"]) == (64, 128)


def test_renders_use_stock_nodes_and_the_sweep_is_the_shipped_one():
    base = txt2img_prompt("sdxl", size=1024, seed=3)
    assert [n["class_type"] for n in base.values()] == [
        "CheckpointLoaderSimple", "CLIPTextEncode", "CLIPTextEncode", "EmptyLatentImage", "KSampler",
        "VAEDecode", "SaveImage",
    ]  # fmt: skip
    assert base["5"]["inputs"]["steps"] == 20 and base["4"]["inputs"]["width"] == 1024
    lora = txt2img_prompt("sd15", size=512, lora="r-a-step00150.safetensors")
    assert lora["10"]["class_type"] == "LoraLoader" and lora["5"]["inputs"]["model"] == ["10", 0]
    assert lora["2"]["inputs"]["clip"] == ["10", 1]
    full = txt2img_prompt("sd3", size=1024, unet="r-step00100.safetensors")
    assert full["11"]["class_type"] == "UNETLoader" and full["5"]["inputs"]["model"] == ["11", 0]
    assert full["4"]["class_type"] == "EmptySD3LatentImage"
    sweep = sweep_prompt("sdxl", "r-a", size=1024)
    types = {n["class_type"]: n["inputs"] for n in sweep.values()}
    assert types["FinetuneRunCheckpoints"]["run"] == "r-a"
    assert types["CheckpointLoaderSimple"]["ckpt_name"] == MODEL_FILES["sdxl"]
    assert (types["FinetuneCheckpointSweep"]["width"], types["FinetuneCheckpointSweep"]["steps"]) == (
        1024,
        20,
    )


def _links(prompt: dict, node: dict) -> dict[str, tuple[str, dict]]:
    """The class and inputs of the node behind each linked input of ``node``."""
    return {
        name: (prompt[value[0]]["class_type"], prompt[value[0]]["inputs"])
        for name, value in node["inputs"].items()
        if isinstance(value, list)
    }


FLUX_LOADERS = {
    "model": ("UNETLoader", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "fp8_e4m3fn"}),
    "clip": ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp8_e4m3fn.safetensors",
                                "type": "flux", "device": "default"}),
    "vae": ("VAELoader", {"vae_name": "ae.safetensors"}),
}  # fmt: skip


def test_the_flux_row_trains_the_shipped_flux_workflow_on_its_stock_loaders():
    row = SCENARIOS["flux-lora"]
    assert (row.arch, row.workflow, row.card_gib, row.resolution, row.steps, row.parts, row.method) == (
        "flux", "train_lora_flux", 24, 1024, 60, "ac", "lora",
    )  # fmt: skip
    shipped = read_workflow("train_lora_flux")
    prompt = training_prompt(row, run_name="flux-lora-a", steps=60)
    train = prompt[train_node_id(prompt)]
    assert train["class_type"] == "FinetuneTrainLoRAModel" and set(prompt) == set(shipped)
    before = shipped[train_node_id(shipped)]["inputs"]
    changed = {k for k in train["inputs"] if train["inputs"][k] != before.get(k)}
    assert changed == {"run_name", "max_steps", "epochs", "checkpoint_every", "validation_prompts"}
    assert set(train["inputs"]) == set(before)  # nothing the node does not have (no ckpt_name, no compile)
    assert (train["inputs"]["max_steps"], train["inputs"]["checkpoint_every"], train["inputs"]["resolution"]) == (
        60, 30, 1024,
    )  # fmt: skip
    loaders = {k: v for k, v in _links(prompt, train).items() if k != "dataset"}
    assert loaders == FLUX_LOADERS
    smoke = training_prompt(row, run_name="s", steps=4, smoke=True)
    inputs = smoke[train_node_id(smoke)]["inputs"]
    assert {k: inputs[k] for k in ("resolution", "min_bucket_resolution", "max_bucket_resolution",
                                   "mixed_precision", "dataloader_workers", "checkpoint_every")} == {
        "resolution": 64, "min_bucket_resolution": 64, "max_bucket_resolution": 128,
        "mixed_precision": "fp32", "dataloader_workers": 0, "checkpoint_every": 2,
    }  # fmt: skip
    assert "compile" not in inputs and "cuda_graphs" not in inputs


def test_flux_renders_are_fluxs_txt2img_and_its_lora_loads_model_only():
    base = txt2img_prompt("flux", size=1024, seed=3)
    assert sorted(n["class_type"] for n in base.values()) == sorted([
        "UNETLoader", "DualCLIPLoader", "VAELoader", "CLIPTextEncode", "FluxGuidance", "CLIPTextEncode",
        "EmptySD3LatentImage", "KSampler", "VAEDecode", "SaveImage",
    ])  # fmt: skip
    (sampler,) = [n for n in base.values() if n["class_type"] == "KSampler"]
    settings = {k: sampler["inputs"][k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler")}
    assert settings == {"seed": 3, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"}
    links = _links(base, sampler)
    assert links["model"] == FLUX_LOADERS["model"]
    assert links["positive"] == ("FluxGuidance", {"conditioning": ["4", 0], "guidance": 3.5})
    assert (
        base["4"]["inputs"]["text"].startswith("k4s4 style")
        and _links(base, base["4"])["clip"] == FLUX_LOADERS["clip"]
    )
    assert links["latent_image"] == ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1})
    (decode,) = [n for n in base.values() if n["class_type"] == "VAEDecode"]
    assert _links(base, decode)["vae"] == FLUX_LOADERS["vae"]
    lora = txt2img_prompt("flux", size=64, lora="flux-lora-a-step00030.safetensors")
    (sampler,) = [n for n in lora.values() if n["class_type"] == "KSampler"]
    assert _links(lora, sampler)["model"] == (
        "LoraLoaderModelOnly", {"model": ["1", 0], "lora_name": "flux-lora-a-step00030.safetensors", "strength_model": 1.0},
    )  # fmt: skip


def test_the_flux_sweep_is_the_shipped_one_on_fluxs_loaders():
    import workflow_tools as wt

    sweep = sweep_prompt("flux", "flux-lora-a", size=1024)
    shipped = read_workflow("checkpoint_sweep")
    assert "CheckpointLoaderSimple" not in {n["class_type"] for n in sweep.values()}
    assert len(sweep) == len(shipped) + 2  # one loader became three
    (node,) = [n for n in sweep.values() if n["class_type"] == "FinetuneCheckpointSweep"]
    assert {k: v for k, v in _links(sweep, node).items() if k != "checkpoints"} == FLUX_LOADERS
    assert {k: node["inputs"][k] for k in ("cfg", "scheduler", "width", "steps")} == {
        "cfg": 1.0, "scheduler": "simple", "width": 1024, "steps": 20,
    }  # fmt: skip
    assert wt.validate_api(sweep, wt.load_defs()) == []  # every node and link as the recorded server has them


def test_flux_files_are_named_as_the_builder_writes_them_and_linked_where_the_loaders_look(tmp_path):
    import comfy_flux

    assert FLUX_FILES == comfy_flux.FILES
    assert "flux" in SMOKE_ARCHS
    assert (cache_name("flux", smoke=False), cache_name("flux", smoke=True), cache_name("sd15", smoke=True)) == (
        "flux", "flux-depth1x1", "sd15.safetensors",
    )  # fmt: skip
    cmd, _ = _build_command("flux", tmp_path / "flux-depth1x1", tmp_path, "python", None, smoke=True)
    assert cmd[-6:] == ["--out", str(tmp_path / "flux-depth1x1"), "--depth", "1", "--single-depth", "1"]
    cmd, _ = _build_command("flux", tmp_path / "flux", tmp_path, "python", None)
    assert cmd[-4:] == ["--arch", "flux", "--out", str(tmp_path / "flux")]
    built = tmp_path / "flux"
    built.mkdir()
    for _, name in FLUX_FILES.values():
        (built / name).write_bytes(b"x")
    links = link_models(tmp_path / "models", "flux", built)
    assert sorted(str(p.relative_to(tmp_path / "models")) for p in links) == [
        "diffusion_models/flux1-dev.safetensors", "text_encoders/clip_l.safetensors",
        "text_encoders/t5xxl_fp8_e4m3fn.safetensors", "vae/ae.safetensors",
    ]  # fmt: skip
    assert all(p.resolve() == built / p.name for p in links)
    (built / "ae.safetensors").unlink()
    with pytest.raises(SystemExit, match="the built flux model lacks .*ae.safetensors; delete"):
        link_models(tmp_path / "again", "flux", built)


def test_t5xxl_is_built_alone_and_linked_into_text_encoders(tmp_path):
    assert cache_name("t5xxl", smoke=False) == "t5xxl_fp8_e4m3fn.safetensors"
    cmd, _ = _build_command("t5xxl", tmp_path / "t5.safetensors", tmp_path, "python", None)
    assert cmd[-4:] == ["--arch", "t5xxl", "--out", str(tmp_path / "t5.safetensors")]
    built = tmp_path / "t5.safetensors"
    built.write_bytes(b"x")
    (link,) = link_models(tmp_path / "models", "t5xxl", built)
    assert link == tmp_path / "models" / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors"
    assert link.resolve() == built


# --------------------------------------------------------------------------------------------
# Arithmetic and the table


def test_steady_window_and_loss_gap():
    rows = [{"step": s, "time": 100.0 + 0.5 * s, "loss": 1.0} for s in range(1, 11)]
    assert steady_window(rows, 3, 10) == (3, 10, 3.5)
    assert steady_window(rows, 0, 99) == (1, 10, 4.5)  # clamped to what was logged
    assert steady_window([], 3, 10)[2] != steady_window([], 3, 10)[2]  # NaN
    gap, mean_a, mean_b, n = loss_gap({1: 1.0, 2: 2.0, 3: 4.0}, {2: 2.2, 3: 4.0, 4: 9.0})
    assert (round(gap, 6), mean_a, round(mean_b, 6), n) == (0.1, 3.0, 3.1, 2)
    assert count_ooms("torch.OutOfMemoryError: CUDA out of memory. Tried") == 2


def _row() -> Row:
    alone = RunResult("x-a", "finished", steps=100, window=(30, 100), window_s=10.0, samples_per_s=14.0,
                      trainer_peak_gib=5.5, process_peak_gib=7.1, losses={1: 1.0, 2: 0.5})  # fmt: skip
    busy = RunResult("x-b", "finished", steps=100, window=(30, 100), window_s=21.0, samples_per_s=6.67,
                     trainer_peak_gib=5.6, process_peak_gib=7.4, pauses=3)  # fmt: skip
    uncapped = RunResult("x-u", "finished", losses={1: 1.0, 2: 0.51})
    return Row("sd15-lora", 8, card_held=True, idle_render_s=1.0, alone=alone, busy=busy, uncapped=uncapped,
               render_during_s=[1.1, 1.2, 1.3, 0.9], renders_in_run=3, sweep="ok (2 checkpoints + base)",
               stock="2/2 via Load LoRA")  # fmt: skip


def test_a_row_shows_the_issues_measurements():
    row = _row()
    cells = dict(zip(table.COLUMNS, table.cells(row), strict=True))
    assert cells["card"] == "8 GiB"
    assert cells["peak process (NVML)"] == "7.40 GiB"
    assert cells["peak trainer"] == "5.60 GiB"
    assert (cells["samples/s alone"], cells["samples/s w/ prompts"]) == ("14.00", "6.67")
    assert cells["render during run (median / max)"] == "1.15 / 1.30 s (3/4 in run)"
    assert cells["pauses"] == "3"
    # 21 - 10 = 11 s longer; allowed: the three renders inside the run (0.9+1.1+1.2) + 5 % of 10 s
    assert cells["wall growth / allowed"] == "11.0 / 3.7 s"
    assert cells["loss vs uncapped"] == "max 2.00e-02 over 2 steps (mean 0.7500 vs 0.7550)"
    assert cells["lora key not loaded"] == "0"
    assert table.markdown([row]).splitlines()[0].startswith("| scenario | card | peak process (NVML) |")


def test_targets_say_met_or_missed_with_the_numbers():
    row = _row()
    assert table.targets(row) == [
        "no OOM: met (0 in the log, 0 prompt errors)",
        "wall growth <= renders + 5 %: MISSED (11.0 <= 3.7 s)",
        "render during run <= 1.25x idle: MISSED (worst 1.30x)",
        "zero 'lora key not loaded': met (0)",
    ]
    row.ooms, row.lora_not_loaded = 1, 2
    assert table.targets(row)[0] == "no OOM: MISSED (1 in the log, 0 prompt errors)"
    assert table.targets(row)[-1] == "zero 'lora key not loaded': MISSED (2)"
    empty = Row("sdxl-full", 24)
    assert table.targets(empty) == ["no OOM: met (0 in the log, 0 prompt errors)"]
    assert all(c in ("sdxl-full", "24 GiB", "0", "not run; not run", "n/a", "not run")
               or "n/a" in c for c in table.cells(empty))  # fmt: skip
    assert math.isnan(table.growth(empty)[0])


# --------------------------------------------------------------------------------------------
# What travels


def test_the_wheels_file_lists_pinned_packages_and_the_av_stub_imports(tmp_path):
    specs = bundle.wheel_specs()
    assert all("==" in s for s in specs)
    names = {s.split("==")[0] for s in specs}
    assert {"comfy-kitchen", "websocket-client", "SQLAlchemy", "diffusers"} <= names
    assert "av" not in names and "comfyui-frontend-package" not in names
    (tmp_path / "av").mkdir()
    (tmp_path / "av" / "__init__.py").write_text(bundle.AV_STUB, encoding="utf-8")
    code = (
        "from av.video.reformatter import ColorTrc\n"
        "import av.container\n"
        "x = {'HDR': ColorTrc.ARIB_STD_B67}\n"
        "try:\n    av.open('f')\nexcept RuntimeError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "PyAV is not installed on this machine (bench/comfy_gpu carries a stub)"


def test_bitsandbytes_travels_with_its_cuda_13_libraries_only(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    libraries = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm71"]
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("bitsandbytes/__init__.py", "")
        z.writestr("bitsandbytes/optim/adamw.py", "")
        for lib in libraries:
            z.writestr(f"bitsandbytes/libbitsandbytes_{lib}.so", b"\0")
        z.writestr("bitsandbytes-0.50.2.dist-info/METADATA", "")
    bundle._unpack_bitsandbytes(wheel, tmp_path / "site")
    files = sorted(
        str(f.relative_to(tmp_path / "site")) for f in (tmp_path / "site").rglob("*") if f.is_file()
    )
    assert files == [
        "bitsandbytes/__init__.py",
        "bitsandbytes/libbitsandbytes_cpu.so",
        "bitsandbytes/libbitsandbytes_cuda130.so",
        "bitsandbytes/libbitsandbytes_cuda132.so",
        "bitsandbytes/optim/adamw.py",
    ]


def test_a_bitsandbytes_that_cannot_step_on_the_gpu_is_removed_before_the_runs(tmp_path):
    """On this machine (no CUDA) the probe's 8-bit step fails: the runs go on without 8-bit state."""
    site = tmp_path / "site"
    (site / "bitsandbytes").mkdir(parents=True)
    (site / "bitsandbytes" / "__init__.py").write_text("from . import optim\n", encoding="utf-8")
    line = bundle.check_bitsandbytes(site, sys.executable)
    assert line.startswith("bitsandbytes: removed, an 8-bit AdamW step failed on the GPU (")
    assert "ImportError" in line or "ModuleNotFoundError" in line or "CUDA" in line, line
    assert not (site / "bitsandbytes").exists()
    assert bundle.check_bitsandbytes(site, sys.executable) == "bitsandbytes: not carried"


def test_the_trainers_free_memory_reads_a_capped_process_on_a_plain_cuda_device(monkeypatch):
    """A run's device is often plain "cuda" (no index), which get_per_process_memory_fraction
    refuses; the cap is a share of the device's total memory, not of mem_get_info's (card
    emulation reports the emulated card there). Found by the harness's first GPU call."""
    import torch

    from trainer.engine import fitting

    calls = []

    def fraction(index):
        calls.append(index)
        if not isinstance(index, int):
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{index}")
        return 0.1

    class Host:
        def free_vram(self, device):
            return 70 * GIB

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (7 * GIB, 8 * GIB))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", fraction)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda index: type("P", (), {"total_memory": 80 * GIB})
    )
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: GIB)
    assert fitting.free_gpu_memory(torch.device("cuda"), Host()) == 7 * GIB  # 0.1 × 80 − 1 reserved
    assert calls == [0]


def test_the_row_notes_say_what_memory_mode_chose_for_each_run():
    log = (
        "\x1b[32m[INFO]\x1b[0m finetune: run sdxl-lora-a: memory auto: 11.1 GiB free; SDXL LoRA 1024 b1 needs ~6.2 GiB, "
        "fits as configured\n"
        "\x1b[32m[INFO]\x1b[0m finetune: run sdxl-lora-b: vae, text_encoder_0 left the GPU\n"
        "\x1b[32m[INFO]\x1b[0m finetune: run sdxl-lora-b: memory auto: 5.8 GiB free; SDXL LoRA 1024 b1 needs ~6.2 GiB "
        "→ fp8 base weights (~3.8 GiB)\n"
    )
    assert memory_choice(log, "sdxl-lora-b") == (
        "memory auto: 5.8 GiB free; SDXL LoRA 1024 b1 needs ~6.2 GiB → fp8 base weights (~3.8 GiB)"
    )
    assert memory_choice(log, "sdxl-lora-a").endswith("fits as configured")
    assert memory_choice(log, "sdxl-lora-u") == ""
