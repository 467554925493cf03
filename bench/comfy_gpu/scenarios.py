"""The harness's scenarios and the API-format prompts it queues (pure: no ComfyUI, no GPU).

Every training prompt is a shipped workflow (``workflows/*.api.json``) as a user gets it; the
harness changes only the base model file, the run name and the run's length (``max_steps``,
``checkpoint_every``, no validation renders) and, for rows that measure something else, what the
row names (e.g. batch 4). Renders are ComfyUI's stock txt2img graph; the sweep is the shipped
Checkpoint Sweep workflow; each checkpoint is also rendered through stock *Load LoRA* or *Load
Diffusion Model* + KSampler.

Flux.1-dev is not one checkpoint but four files loaded by three stock loaders (UNETLoader in fp8,
DualCLIPLoader, VAELoader; :data:`FLUX_FILES`), and its renders are Flux's txt2img (FluxGuidance
3.5, cfg 1, the simple schedule); its LoRA loads through *LoraLoaderModelOnly*.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
TRAIN_NODES = ("FinetuneTrainLoRA", "FinetuneTrainFull", "FinetuneTrainLoRAModel")
#: The base-model file names the shipped workflows load (the harness builds them under these names).
MODEL_FILES = {
    "sd15": "v1-5-pruned-emaonly.safetensors",
    "sdxl": "sd_xl_base_1.0.safetensors",
    "sd3": "sd3_medium_incl_clips.safetensors",
}
#: Flux.1-dev's files by role: (ComfyUI models sub-folder, name), as train_lora_flux loads them
#: (tests/comfy_flux.py builds them under these names; tests/test_comfy_gpu.py keeps the two equal).
FLUX_FILES = {
    "unet": ("diffusion_models", "flux1-dev.safetensors"),
    "clip_l": ("text_encoders", "clip_l.safetensors"),
    "t5xxl": ("text_encoders", "t5xxl_fp8_e4m3fn.safetensors"),
    "vae": ("vae", "ae.safetensors"),
}
FLUX_WEIGHT_DTYPE = "fp8_e4m3fn"  # UNETLoader's weight_dtype, as the shipped workflow sets it
FLUX_GUIDANCE = 3.5  # FluxGuidance's default: what Flux.1-dev renders with
#: What the harness builds: the checkpoints, Flux's folder, and T5-XXL alone (SD3 Medium's
#: ``t5xxl``: the common fp8 file, which the trainer casts to its compute dtype as it loads).
BUILT_ARCHS = (*MODEL_FILES, "flux", "t5xxl")
T5_FILE = FLUX_FILES["t5xxl"][1]
DATASET_FOLDER = "my-dataset"  # what the shipped workflows' Load Dataset reads (input folder)
PROMPT = "k4s4 style, a cat sitting on a windowsill"


@dataclass(frozen=True)
class Scenario:
    """One row of the table.

    Attributes:
        name: the row's name (``--scenarios`` takes these).
        arch: sd15, sdxl, sd3 or flux.
        workflow: the shipped workflow its training comes from (stem under workflows/).
        card_gib: the emulated card of the targets (0: the whole GPU).
        steps: ``max_steps`` of each training run.
        overrides: Train-node inputs the row changes beyond the run's length.
        resolution: renders' size (the workflow's training resolution).
        with_t5: SD3: a T5-XXL file (:data:`T5_FILE`) is built and given to the Train node
            (text cached).
        parts: which of a (alone), b (with prompts), c (sweep + stock loaders), u (uncapped twin).
    """

    name: str
    arch: str
    workflow: str
    card_gib: float
    steps: int
    overrides: dict = field(default_factory=dict)
    resolution: int = 512
    with_t5: bool = False
    parts: str = "abcu"

    @property
    def method(self) -> str:
        return "full" if "full" in self.workflow else "lora"

    @property
    def builds(self) -> tuple[str, ...]:
        """What the harness builds for this row (:data:`BUILT_ARCHS`)."""
        return (self.arch, "t5xxl") if self.with_t5 else (self.arch,)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("sd15-lora", "sd15", "train_lora_sd15", 8, 200),
        Scenario("sdxl-lora", "sdxl", "train_lora_sdxl", 12, 100, resolution=1024),
        Scenario("sd3-lora", "sd3", "train_full_sd3_medium", 16, 100, resolution=1024, with_t5=True,
                 overrides={"_method": "lora"}),
        Scenario("sd15-full", "sd15", "train_full_sd3_medium", 16, 200, overrides={"resolution": 512}),
        Scenario("sdxl-full", "sdxl", "train_full_sd3_medium", 24, 100, resolution=1024),
        # issue 14's speed target: uncapped, SDXL LoRA batch 4 (bench's case: no checkpointing)
        Scenario("sdxl-lora-b4", "sdxl", "train_lora_sdxl", 0, 230, resolution=1024,
                 overrides={"batch_size": 4, "gradient_checkpointing": False}, parts="a"),
        # Flux.1-dev LoRA on the MODEL the stock loaders give (fp8 base), on a 24 GiB card. Parts a
        # and c fit a 10-minute device call (a real step costs about a second, a 1024 px render
        # ten); b and u can follow in a second call with --parts bu.
        Scenario("flux-lora", "flux", "train_lora_flux", 24, 60, resolution=1024, parts="ac"),
    )
}  # fmt: skip

#: Settings that make a run fit the CPU in --smoke (the shipped graph otherwise).
SMOKE_TRAINING = {
    "resolution": 64, "min_bucket_resolution": 64, "max_bucket_resolution": 128, "batch_size": 1,
    "mixed_precision": "fp32", "compile": False, "gradient_checkpointing": False, "dataloader_workers": 0,
    "cuda_graphs": False,
}  # fmt: skip


def read_workflow(stem: str) -> dict:
    return json.loads((WORKFLOWS / f"{stem}.api.json").read_text(encoding="utf-8"))


def train_node_id(prompt: dict) -> str:
    (found,) = [k for k, n in prompt.items() if n["class_type"] in TRAIN_NODES]
    return found


def lora_inputs_from(full_inputs: dict) -> dict:
    """The shipped SD3 full workflow's settings moved onto a Train LoRA node (SD3 Medium LoRA has no
    shipped workflow of its own): the SDXL LoRA workflow's LoRA inputs, the SD3 run's schedule."""
    lora = read_workflow("train_lora_sdxl")
    node = lora[train_node_id(lora)]["inputs"]
    shared = {k: v for k, v in full_inputs.items() if k in node and k not in ("learning_rate",)}
    return {**node, **shared}


def training_prompt(
    scenario: Scenario, *, run_name: str, steps: int, smoke: bool = False, checkpoints: int = 2
) -> dict:
    """The scenario's shipped training workflow, ready to queue.

    Args:
        run_name: the run's name (each run of a row gets its own).
        steps: ``max_steps``.
        smoke: tiny settings for the CPU (:data:`SMOKE_TRAINING`).
        checkpoints: how many checkpoints the run writes (evenly spaced, the last at ``steps``).
    """
    prompt = copy.deepcopy(read_workflow(scenario.workflow))
    nid = train_node_id(prompt)
    node = prompt[nid]
    overrides = dict(scenario.overrides)
    if overrides.pop("_method", None) == "lora" and node["class_type"] == "FinetuneTrainFull":
        node["class_type"] = "FinetuneTrainLoRA"
        node["inputs"] = lora_inputs_from(node["inputs"])
    inputs = node["inputs"]
    inputs.update(
        run_name=run_name,
        max_steps=steps,
        epochs=100_000,
        checkpoint_every=max(1, steps // max(1, checkpoints)),
        keep_checkpoints=0,
        validation_every=0,
        validation_prompts="",
        validation_at_start=False,
    )
    if scenario.arch in MODEL_FILES:
        inputs["ckpt_name"] = MODEL_FILES[scenario.arch]
    else:  # Train LoRA (Model): the base comes from the graph's loaders
        _set_flux_files(prompt)
    if scenario.arch != "sd3":
        inputs["resolution"] = scenario.resolution
    if scenario.with_t5:
        inputs.update(t5xxl=T5_FILE, use_t5=True)
    inputs.update(overrides)
    if smoke:
        inputs.update({k: v for k, v in SMOKE_TRAINING.items() if k in inputs})
    # A Step Plan node (SD3 workflow) shows the plan; keep its inputs in step with the Train node.
    for other in prompt.values():
        if other["class_type"] == "FinetuneStepPlan":
            for key in (
                "batch_size", "max_steps", "resolution", "checkpoint_every", "validation_every",
                "min_bucket_resolution", "max_bucket_resolution", "allow_upscale",
            ):  # fmt: skip
                if key in other["inputs"] and key in inputs:
                    other["inputs"][key] = inputs[key]
            if "method" in other["inputs"]:
                other["inputs"]["method"] = "lora" if node["class_type"] == "FinetuneTrainLoRA" else "full"
    return prompt


def _set_flux_files(prompt: dict) -> None:
    """Point a graph's Flux loaders at :data:`FLUX_FILES` (the names the harness links)."""
    names = {role: name for role, (_, name) in FLUX_FILES.items()}
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "UNETLoader":
            inputs["unet_name"] = names["unet"]
        elif node["class_type"] == "DualCLIPLoader":
            inputs.update(clip_name1=names["clip_l"], clip_name2=names["t5xxl"], type="flux")
        elif node["class_type"] == "VAELoader":
            inputs["vae_name"] = names["vae"]


def flux_loaders(first_id: int = 1) -> dict:
    """Flux.1-dev as a user loads it: UNETLoader (fp8), DualCLIPLoader (flux), VAELoader, with ids
    ``first_id`` .. ``first_id + 2`` (MODEL, CLIP, VAE in that order)."""
    ids = [str(first_id + i) for i in range(3)]
    prompt = {
        ids[0]: {"class_type": "UNETLoader", "inputs": {"unet_name": "", "weight_dtype": FLUX_WEIGHT_DTYPE}},
        ids[1]: {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "", "clip_name2": "", "type": "flux",
                                                            "device": "default"}},
        ids[2]: {"class_type": "VAELoader", "inputs": {"vae_name": ""}},
    }  # fmt: skip
    _set_flux_files(prompt)
    return prompt


def txt2img_prompt(
    arch: str, *, size: int, steps: int = 20, seed: int = 0, prefix: str = "harness/txt2img",
    lora: str | None = None, unet: str | None = None,
) -> dict:  # fmt: skip
    """ComfyUI's default txt2img graph on the base model; with ``lora`` through stock *Load LoRA*,
    with ``unet`` the denoiser from stock *Load Diffusion Model* (text encoders and VAE from the
    base checkpoint). Flux: its three loaders, FluxGuidance 3.5 on the prompt, cfg 1 with euler
    and the simple schedule, an SD3-style empty latent, *LoraLoaderModelOnly* for ``lora``."""
    if arch == "flux":
        return _flux_txt2img(size=size, steps=steps, seed=seed, prefix=prefix, lora=lora, unet=unet)
    model, clip = ["1", 0], ["1", 1]
    prompt: dict = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MODEL_FILES[arch]}},
    }
    if lora is not None:
        prompt["10"] = {
            "class_type": "LoraLoader",
            "inputs": {
                "model": model,
                "clip": clip,
                "lora_name": lora,
                "strength_model": 1.0,
                "strength_clip": 1.0,
            },
        }
        model, clip = ["10", 0], ["10", 1]
    if unet is not None:
        prompt["11"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}}
        model = ["11", 0]
    latent = "EmptySD3LatentImage" if arch == "sd3" else "EmptyLatentImage"
    prompt.update(
        {
            "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": PROMPT}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "blurry, low quality"}},
            "4": {"class_type": latent, "inputs": {"width": size, "height": size, "batch_size": 1}},
            "5": {
                "class_type": "KSampler",
                "inputs": {
                    "model": model,
                    "positive": ["2", 0],
                    "negative": ["3", 0],
                    "latent_image": ["4", 0],
                    "seed": seed,
                    "steps": steps,
                    "cfg": 7.0,
                    "sampler_name": "euler",
                    "scheduler": "normal",
                    "denoise": 1.0,
                },
            },  # fmt: skip
            "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
            "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
        }
    )
    return prompt


def _flux_txt2img(
    *, size: int, steps: int, seed: int, prefix: str, lora: str | None, unet: str | None
) -> dict:
    prompt = flux_loaders(first_id=1)  # "1" MODEL, "2" CLIP, "3" VAE
    model, clip, vae = ["1", 0], ["2", 0], ["3", 0]
    if unet is not None:
        prompt["1"]["inputs"]["unet_name"] = unet
    if lora is not None:
        prompt["10"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": model, "lora_name": lora, "strength_model": 1.0},
        }
        model = ["10", 0]
    prompt.update({
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": PROMPT}},
        "5": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": FLUX_GUIDANCE}},
        # cfg 1 never runs the negative, but KSampler takes one (what Flux's example graph does)
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0], "seed": seed,
            "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": vae}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": prefix}},
    })  # fmt: skip
    return prompt


def sweep_prompt(arch: str, run_name: str, *, size: int, steps: int = 20) -> dict:
    """The shipped Checkpoint Sweep workflow on ``run_name`` (base model and size set for the row).

    Flux: the sweep's Load Checkpoint becomes Flux's three loaders (its node takes MODEL, CLIP and
    VAE), and it samples at cfg 1 with the simple schedule (Flux's default guidance, 3.5, applies).
    """
    prompt = copy.deepcopy(read_workflow("checkpoint_sweep"))
    if arch == "flux":
        (loader,) = [k for k, n in prompt.items() if n["class_type"] == "CheckpointLoaderSimple"]
        del prompt[loader]
        first = max(int(k) for k in prompt) + 1
        prompt.update(flux_loaders(first_id=first))
        sources = {"model": [str(first), 0], "clip": [str(first + 1), 0], "vae": [str(first + 2), 0]}
        for node in prompt.values():
            for name, value in node["inputs"].items():
                if isinstance(value, list) and value[:1] == [loader]:
                    node["inputs"][name] = sources[name]
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = MODEL_FILES[arch]
        elif node["class_type"] == "FinetuneRunCheckpoints":
            inputs["run"] = run_name
        elif node["class_type"] == "FinetuneCheckpointSweep":
            inputs.update(width=size, height=size, steps=steps)
            if arch == "flux":
                inputs.update(cfg=1.0, scheduler="simple")
        elif node["class_type"] == "FinetuneLabeledStrip":
            inputs["title"] = run_name
        elif node["class_type"] == "SaveImage":
            inputs["filename_prefix"] = f"harness/sweeps/{run_name}"
    return prompt


def select(names: str) -> list[Scenario]:
    """Scenarios from a comma list ("all" for every one).

    Raises:
        SystemExit: an unknown name, listing the known ones.
    """
    wanted = list(SCENARIOS) if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in SCENARIOS]
    if unknown or not wanted:
        raise SystemExit(
            f"--scenarios: unknown {unknown or names!r}; choose from {', '.join(SCENARIOS)} or all"
        )
    return [SCENARIOS[n] for n in wanted]
