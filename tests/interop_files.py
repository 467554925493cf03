"""Every kind of file the pack writes, made by our trainer; what diffusers makes of each; and the
inputs ComfyUI's side (``comfy_interop.py``) needs.

The interop suite (``test_interop_diffusers.py`` in CI, ``test_comfy_interop.py`` on a real
ComfyUI) asks each consumer to load each kind of file and measures, per file kind x consumer:

- **modules**: LoRA modules (full files: weight tensors) the file holds;
- **applied**: how many of them the consumer applied;
- **ignored**: modules left out plus log lines saying keys were not loaded (diffusers' "No LoRA
  keys associated ...", ComfyUI's "lora key not loaded");
- **max delta error**: max |ΔW - (alpha/rank)·up·down| over every module, computed from the file's
  own tensors (full files: max |W_loaded - W_file|);
- **output Δ**: how far the denoiser's output on one fixed input moved from the base model's.

Files come from real (tiny, two-step, CPU) training runs of ``trainer.engine.loop.train`` on the
tiny models of ``trainer.models.tiny``, rank 8 / alpha 4 (so the scale alpha/rank = 0.5 matters),
targets ``attention+ff+conv`` (SD3 has no convolutions: ``attention+ff``). SD3's transformer is
made ComfyUI-sized: ComfyUI derives an MMDiT's width from its depth (64 per block), so a 2-block
one is 128 wide with 2 heads of 64 (``trainer.models.tiny``'s is 32 wide); the CLIP encoders get
3 layers (see :func:`interop_bundle`).

Everything here runs under the pack's python (torch, diffusers, peft); nothing imports ComfyUI.
Run ``test_interop_diffusers.py`` / ``test_comfy_interop.py`` with ``-s`` to print the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from log_capture import captured_logs

RANK = 8
ALPHA = 4.0
STEPS = 2
LEARNING_RATE = 1e-2  # two Adam steps move every lora_up by about 2e-2: a visible update
SEED = 0
ARCHS = ("sd15", "sdxl", "sd3")
TIMESTEP = 500.0
UNET_PREFIX = "model.diffusion_model."
COMFY_CLIP_VOCAB = 49408
# Log lines of a consumer that mean part of a file was not used.
IGNORED_MARKERS = (
    "No LoRA keys associated",
    "lora key not loaded",
    "NOT LOADED",
    "were not used",
    "unexpected",
)


@dataclass(frozen=True)
class FileKind:
    """One kind of file the pack writes."""

    arch: str
    method: str  # "lora" or "full"
    text_encoders: bool = False

    @property
    def name(self) -> str:
        if self.method == "full":
            return f"{self.arch} full (denoiser)"
        return f"{self.arch} LoRA" + (" + text encoders" if self.text_encoders else "")

    @property
    def targets(self) -> str:
        return "attention+ff" if self.arch == "sd3" else "attention+ff+conv"


KINDS = [
    *(FileKind(arch, "lora", te) for arch in ARCHS for te in (False, True)),
    *(FileKind(arch, "full") for arch in ARCHS),
]


# --------------------------------------------------------------------------------------------
# Models and files


def comfy_sized_sd3(seed: int = SEED):
    """A 2-block SD3 MMDiT that ComfyUI's model detection reads back as the same model."""
    from diffusers import SD3Transformer2DModel

    from trainer.models.tiny import CLIP_G, CLIP_L, T5

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 11)
        model = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=64,
            num_attention_heads=2,
            joint_attention_dim=T5["d_model"],
            caption_projection_dim=128,
            pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"],
            pos_embed_max_size=32,
        )
    return model.eval()


def interop_bundle(arch: str, seed: int = SEED):
    """The tiny base model of ``arch`` (the same weights every call), sized for ComfyUI too.

    Its CLIP encoders have 3 layers (``trainer.models.tiny``'s have 2): ComfyUI conditions SDXL and
    SD3 on the penultimate layer and refuses an encoder with fewer than 3.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from trainer.config import Arch
    from trainer.models.tiny import CLIP_G, CLIP_L, _clip, tiny_bundle

    bundle = tiny_bundle(Arch(arch), seed=seed)
    classes = {
        "sd15": [CLIPTextModel],
        "sdxl": [CLIPTextModel, CLIPTextModelWithProjection],
        "sd3": [CLIPTextModelWithProjection, CLIPTextModelWithProjection],
    }[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        for i, (cls, sizes) in enumerate(zip(classes, (CLIP_L, CLIP_G), strict=False)):
            bundle.text_encoders[i] = _clip(cls, {**sizes, "num_hidden_layers": 3}, bundle.tokenizers[i])
    if arch == "sd3":
        bundle.denoiser = comfy_sized_sd3(seed)
    return bundle


def fixed_inputs(bundle, seed: int = 99) -> dict:
    """One fixed denoiser input (latent, timestep, conditioning), in diffusers' keyword names."""
    g = torch.Generator().manual_seed(seed)
    den = bundle.denoiser
    x = torch.randn(1, den.config.in_channels, 8, 8, generator=g)
    t = torch.tensor([TIMESTEP])
    if bundle.arch.value == "sd3":
        return {
            "hidden_states": x,
            "timestep": t,
            "encoder_hidden_states": torch.randn(1, 77, den.config.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(1, den.config.pooled_projection_dim, generator=g),
        }
    out = {
        "sample": x,
        "timestep": t,
        "encoder_hidden_states": torch.randn(1, 77, den.config.cross_attention_dim, generator=g),
    }
    if bundle.arch.value == "sdxl":
        pooled = den.config.projection_class_embeddings_input_dim - 6 * den.config.addition_time_embed_dim
        out["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    return out


@torch.no_grad()
def run_denoiser(denoiser, inputs: dict) -> torch.Tensor:
    return denoiser(**inputs, return_dict=False)[0].float()


def write_file(kind: FileKind, workdir: str | Path) -> dict:
    """Train the tiny model of ``kind.arch`` for two steps and return the checkpoint it wrote.

    Returns:
        ``path`` (the file), ``metadata`` (its header strings), ``trained`` (path of a safetensors
        with the trained model's own per-module update scaling·B·A, LoRA, or its denoiser weights,
        full), ``state``/``message`` of the run.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from train_helpers import make_images, tiny_config

    from trainer.engine.events import RunState
    from trainer.engine.loop import train
    from trainer.lora import canonical_module_name, lora_layers

    work = Path(workdir)
    data = make_images(work / "data", [(64, 64)], repeats=STEPS, caption="k4s4 style, a red disc")
    bundle = interop_bundle(kind.arch)
    config = tiny_config(
        work,
        data,
        run_name=f"interop-{kind.arch}-{kind.method}{'-te' if kind.text_encoders else ''}",
        method=kind.method,
        lora_rank=RANK,
        lora_alpha=ALPHA,
        lora_targets=kind.targets,
        train_text_encoder=kind.text_encoders,
        learning_rate=LEARNING_RATE,
        max_steps=STEPS,
        dataloader_workers=0,
    )
    result = train(config, model_loader=lambda c: bundle, device="cpu")
    if result.state != RunState.FINISHED or not result.final_checkpoint:
        return {"state": result.state.value, "message": result.message}
    trained: dict[str, torch.Tensor] = {}
    if kind.method == "lora":
        parts = [("denoiser", bundle.denoiser)] + [
            (f"text_encoder[{i}]", te) for i, te in enumerate(bundle.text_encoders) if te is not None
        ]
        for label, module in parts:
            part = "denoiser" if label == "denoiser" else "text_encoder"
            for name, layer in lora_layers(module).items():
                a = layer.lora_A["default"].weight.detach().float()
                b = layer.lora_B["default"].weight.detach().float()
                delta = layer.scaling["default"] * (b.flatten(1) @ a.flatten(1))
                trained[f"{label}:{canonical_module_name(name, part=part)}"] = delta.contiguous()
    else:
        trained = {k: v.detach().float().contiguous() for k, v in bundle.denoiser.state_dict().items()}
    trained_path = work / "trained.safetensors"
    save_file(trained, str(trained_path))
    with safe_open(result.final_checkpoint, framework="pt") as f:
        metadata = dict(f.metadata() or {})
    return {
        "state": result.state.value,
        "message": result.message,
        "path": result.final_checkpoint,
        "metadata": metadata,
        "trained": str(trained_path),
    }


# --------------------------------------------------------------------------------------------
# Reading a LoRA file back into per-module expectations (shared by both consumers)


def file_modules(arch: str, tensors: dict, module_names: dict[str, list[str]]) -> tuple[dict, list[str]]:
    """Decode a LoRA file into ``{"label:canonical module": (down, up, alpha/rank)}``.

    Args:
        module_names: canonical module names per part label of the model the file is for.

    Returns:
        (modules, keys that name no module of the model).
    """
    from trainer.lora.keys import ALPHA as ALPHA_ENTRY
    from trainer.lora.keys import LORA_A, LORA_B, file_layout, from_file_keys, legacy_layouts, split_key

    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    claimed: set[str] = set()
    unmatched: list[str] = []
    for layout in (*file_layout(arch), *legacy_layouts(arch)):
        names = module_names.get(layout.label, [])
        peft, missed = from_file_keys(tensors, layout, module_names=names)
        claimed |= {k for k in tensors if k.startswith(layout.prefix)}
        unmatched += missed
        grouped: dict[str, dict] = {}
        for key, value in peft.items():
            module, entry = split_key(key)
            grouped.setdefault(module, {})[entry] = value
        for module, entries in grouped.items():
            down, up = entries[LORA_A].float(), entries[LORA_B].float()
            rank = down.shape[0]
            alpha = float(entries[ALPHA_ENTRY]) if ALPHA_ENTRY in entries else float(rank)
            out[f"{layout.label}:{module}"] = (down, up, alpha / rank)
    unmatched += [k for k in tensors if k not in claimed]
    return out, sorted(set(unmatched))


def expected_delta(down: torch.Tensor, up: torch.Tensor, scale: float, shape) -> torch.Tensor:
    """scale·up·down shaped like the weight (conv: up is 1x1, down k x k)."""
    return (scale * (up.flatten(1) @ down.flatten(1))).reshape(shape)


# --------------------------------------------------------------------------------------------
# diffusers as the consumer


def ignored_lines(messages: list[str], *, text_encoders: bool = True) -> list[str]:
    """Log lines saying part of a file was not used.

    diffusers says "No LoRA keys associated to CLIPTextModel" for every text encoder a file has no
    keys for; that is a dropped part only when the file does carry text-encoder modules.
    """
    return [
        m
        for m in messages
        if any(marker in m for marker in IGNORED_MARKERS)
        and (text_encoders or "No LoRA keys associated" not in m)
    ]


def _components(pipe, arch: str) -> dict[str, tuple[str, torch.nn.Module]]:
    """part label -> (pipeline component name, module)."""
    out = {"denoiser": ("transformer", pipe.transformer) if arch == "sd3" else ("unet", pipe.unet)}
    for i, name in enumerate(("text_encoder", "text_encoder_2")):
        module = getattr(pipe, name, None)
        if module is not None:
            out[f"text_encoder[{i}]"] = (name, module)
    return out


def _linear_or_conv_names(module: torch.nn.Module, part: str) -> dict[str, str]:
    """canonical name -> actual name of every Linear/Conv2d layer of a part."""
    from trainer.lora import canonical_module_name

    return {
        canonical_module_name(n, part=part): n
        for n, sub in module.named_modules()
        if n and isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in n
    }


def diffusers_lora_report(kind: FileKind, path: str, trained_path: str) -> dict:
    """Load a LoRA file with the pipeline's ``load_lora_weights``, fuse it, and measure it."""
    from diffusers.utils import logging as diffusers_logging
    from safetensors.torch import load_file

    from trainer.lora import canonical_module_name, lora_layers
    from trainer.models.pipelines import make_pipeline

    diffusers_logging.set_verbosity_warning()
    bundle = interop_bundle(kind.arch)
    pipe = make_pipeline(bundle)
    comps = _components(pipe, kind.arch)
    names = {
        label: _linear_or_conv_names(module, "denoiser" if label == "denoiser" else "text_encoder")
        for label, (_, module) in comps.items()
    }
    tensors = load_file(path)
    modules, unmatched = file_modules(kind.arch, tensors, {k: list(v) for k, v in names.items()})
    inputs = fixed_inputs(bundle)
    before = run_denoiser(bundle.denoiser, inputs)
    base = {}
    for key in modules:
        label, canon = key.split(":", 1)
        layer = dict(comps[label][1].named_modules())[names[label][canon]]
        base[key] = layer.weight.detach().clone().float()

    with captured_logs("diffusers", "peft") as messages:
        pipe.load_lora_weights(path, adapter_name="interop")
    applied = set()
    for label, (_, module) in comps.items():
        part = "denoiser" if label == "denoiser" else "text_encoder"
        applied |= {
            f"{label}:{canonical_module_name(n, part=part)}"
            for n in lora_layers(module, adapter_name="interop")
        }
    after = run_denoiser(pipe.transformer if kind.arch == "sd3" else pipe.unet, inputs)
    pipe.fuse_lora(components=sorted({comps[k.split(":")[0]][0] for k in applied}), lora_scale=1.0)

    trained = load_file(trained_path)
    errors, trained_errors = [], []
    for key, (down, up, scale) in modules.items():
        if key not in applied:
            continue
        label, canon = key.split(":", 1)
        layer = dict(comps[label][1].named_modules())[names[label][canon]]
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        delta = layer.weight.detach().float() - base[key]
        expected = expected_delta(down, up, scale, delta.shape)
        errors.append(float((delta - expected).abs().max()))
        # The file keeps the trained scale: its update is the trained model's, up to fp16 rounding.
        trained_errors.append(float((expected - trained[key].reshape(expected.shape)).abs().max()))
    ignored = ignored_lines(messages, text_encoders=any(not k.startswith("denoiser:") for k in modules))
    return {
        "consumer": "diffusers",
        "modules": len(modules),
        "applied": len(applied & set(modules)),
        "not_in_file": sorted(applied - set(modules)),
        "ignored": len(set(modules) - applied) + len(unmatched) + len(ignored),
        "ignored_detail": sorted(set(modules) - applied) + unmatched + ignored,
        "max_delta_error": max(errors, default=float("nan")),
        "max_trained_error": max(trained_errors, default=float("nan")),
        "largest_delta": max(float(expected_delta(*m, (-1,)).abs().max()) for m in modules.values()),
        "output_change": float((after - before).abs().max()),
        "text_encoder_modules": sum(1 for k in modules if not k.startswith("denoiser:")),
    }


def diffusers_full_report(kind: FileKind, path: str, trained_path: str, workdir: str | Path) -> dict:
    """Load a full fine-tune's denoiser file with diffusers' ``from_single_file`` and compare it."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    from safetensors.torch import load_file

    bundle = interop_bundle(kind.arch)
    sub = "transformer" if kind.arch == "sd3" else "unet"
    cls = SD3Transformer2DModel if kind.arch == "sd3" else UNet2DConditionModel
    config_dir = Path(workdir) / "config"
    bundle.denoiser.save_config(str(config_dir / sub))
    source = path
    if kind.arch != "sd3":
        # diffusers finds a UNet in a single file only under the ldm prefix, which ComfyUI's
        # diffusion_models files do not carry: a diffusers user adds it (see the README).
        source = {UNET_PREFIX + k: v for k, v in load_file(path).items()}
    with captured_logs("diffusers") as messages:
        loaded = cls.from_single_file(source, config=str(config_dir), subfolder=sub, local_files_only=True)
    loaded = loaded.float().eval()
    trained = load_file(trained_path)
    state = loaded.state_dict()
    # The file is fp16 (what the trainer writes): compare against the trained weights rounded so.
    errors = {
        k: float((state[k].float() - v.half().float()).abs().max()) for k, v in trained.items() if k in state
    }
    inputs = fixed_inputs(bundle)
    before = run_denoiser(bundle.denoiser, inputs)
    after = run_denoiser(loaded, inputs)
    ignored = ignored_lines(messages)
    return {
        "consumer": "diffusers",
        "modules": len(trained),
        "file_tensors": len(load_file(path)),
        "applied": sum(1 for e in errors.values() if e == 0.0),
        "ignored": len(set(trained) - set(state)) + len(ignored),
        "ignored_detail": sorted(set(trained) - set(state)) + ignored,
        "max_delta_error": max(errors.values()),
        "output_change": float((after - before).abs().max()),
    }


def table(rows: list[dict]) -> str:
    """The suite's table, one line per file kind x consumer, ready to quote."""
    head = f"{'file kind':32} {'consumer':10} {'modules':>7} {'applied':>7} {'ignored':>7} {'max delta err':>13} {'output Δ':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['kind']:32} {r['consumer']:10} {r['modules']:7d} {r['applied']:7d} {r['ignored']:7d} "
            f"{r['max_delta_error']:13.2e} {r['output_change']:9.2e}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# What ComfyUI's side needs (test_comfy_interop.py)


def comfy_inputs(bundle) -> dict:
    """:func:`fixed_inputs` as ComfyUI's ``diffusion_model(x, timesteps, context[, y])`` takes them.

    SDXL's ``y`` is the pooled embeds followed by the size/crop ids embedded the way diffusers'
    ``add_time_proj`` does inside the UNet (ComfyUI's model builds it outside).
    """
    ours = fixed_inputs(bundle)
    if bundle.arch.value == "sd3":
        return {
            "x": ours["hidden_states"],
            "timesteps": ours["timestep"],
            "context": ours["encoder_hidden_states"],
            "y": ours["pooled_projections"],
        }
    out = {"x": ours["sample"], "timesteps": ours["timestep"], "context": ours["encoder_hidden_states"]}
    if bundle.arch.value == "sdxl":
        extra = ours["added_cond_kwargs"]
        with torch.no_grad():
            ids = bundle.denoiser.add_time_proj(extra["time_ids"].flatten()).reshape(1, -1)
        out["y"] = torch.cat([extra["text_embeds"], ids], dim=-1)
    return out


def comfy_options(bundle) -> dict:
    """What ComfyUI needs to build the tiny model: its sizes are not all in the weights.

    ``te_model_options`` gives ComfyUI's CLIP-L / CLIP-G the tiny encoders' sizes; ``unet_extra_config``
    the UNet's attention heads (ComfyUI assumes SD1.5's 8 heads / SDXL's 64 channels a head).
    """
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_hidden_layers",
        "hidden_act",
        "max_position_embeddings",
        "projection_dim",
        "eos_token_id",
    )
    te = {}
    for name, encoder in zip(("clip_l", "clip_g"), bundle.text_encoders, strict=False):
        if encoder is not None:
            te[f"{name}_model_config"] = {k: getattr(encoder.config, k) for k in keys}
    out = {"te_model_options": te, "unet_extra_config": None}
    if bundle.arch.value != "sd3":
        cfg = bundle.denoiser.config
        heads = cfg.attention_head_dim  # diffusers' UNets name the head count so
        if isinstance(heads, int):
            out["unet_extra_config"] = {"num_heads": heads, "num_head_channels": -1}
        else:
            channels = {
                c // h
                for c, h, kind in zip(cfg.block_out_channels, heads, cfg.down_block_types, strict=True)
                if kind.startswith("CrossAttn")
            }
            (per_head,) = channels  # ComfyUI has one channels-a-head for the whole UNet
            out["unet_extra_config"] = {"num_heads": -1, "num_head_channels": per_head}
    return out


def write_base_checkpoint(arch: str, path: str | Path) -> str:
    """The tiny base model as one original-layout checkpoint (*Load Checkpoint*); SD3 without T5.

    ComfyUI's CLIP has a fixed 49408-token embedding, so the tiny vocabularies' embeddings are
    padded with zero rows (no LoRA touches them, and the text encoders are not run).
    """
    from trainer.models.convert import bundle_to_original
    from trainer.models.files import save_safetensors_atomic

    bundle = interop_bundle(arch)
    if arch == "sd3":
        bundle.text_encoders[2] = None
    tensors = bundle_to_original(bundle)
    for key, value in tensors.items():
        if key.endswith("token_embedding.weight") and value.shape[0] < COMFY_CLIP_VOCAB:
            pad = value.new_zeros(COMFY_CLIP_VOCAB - value.shape[0], value.shape[1])
            tensors[key] = torch.cat([value, pad])
    save_safetensors_atomic(tensors, str(path))
    return str(path)


def diffusers_lora_output(kind: FileKind, path: str) -> torch.Tensor:
    """The denoiser's output on :func:`fixed_inputs` after the pipeline's ``load_lora_weights``."""
    from trainer.models.pipelines import make_pipeline

    bundle = interop_bundle(kind.arch)
    pipe = make_pipeline(bundle)
    pipe.load_lora_weights(path, adapter_name="interop")
    return run_denoiser(pipe.transformer if kind.arch == "sd3" else pipe.unet, fixed_inputs(bundle))


def full_model_output(kind: FileKind, trained_path: str) -> torch.Tensor:
    """Our trained denoiser (weights rounded to fp16, as the file holds them) on :func:`fixed_inputs`."""
    from safetensors.torch import load_file

    bundle = interop_bundle(kind.arch)
    state = {k: v.half().float() for k, v in load_file(trained_path).items()}
    bundle.denoiser.load_state_dict(state)
    return run_denoiser(bundle.denoiser, fixed_inputs(bundle))


def legacy_sd3_file(path: str, out: str | Path) -> str:
    """Rewrite an SD3 LoRA file in the layout earlier versions wrote: ``transformer.*`` with an
    ``.alpha`` (lora_B without the scale) and the CLIP encoders under kohya ``lora_te1_``/``lora_te2_``."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    old: dict[str, torch.Tensor] = {}
    heads = {"text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_"}
    for key, value in tensors.items():
        module, _, entry = key.rpartition(".lora_")
        rank = tensors[f"{module}.lora_A.weight"].shape[0]
        if entry == "B.weight":
            value = (value.float() * (rank / ALPHA)).to(value.dtype)
        head = next((h for h in heads if module.startswith(h)), None)
        if head is None:
            old[f"{module}.lora_{entry}"] = value
            old[f"{module}.alpha"] = torch.tensor(ALPHA)
            continue
        stem = heads[head] + module[len(head) :].replace(".", "_")
        old[f"{stem}.{'lora_down' if entry == 'A.weight' else 'lora_up'}.weight"] = value
        old[f"{stem}.alpha"] = torch.tensor(ALPHA)
    save_file(old, str(out))
    return str(out)
