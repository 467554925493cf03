"""The plain diffusers + peft training loop the issue measured, as the baseline.

It follows diffusers' ``train_text_to_image_lora*.py`` / ``train_dreambooth_lora_sd3.py`` examples:
frozen base cast to bf16, LoRA r16 (UNets: to_q/to_k/to_v/to_out.0; SD3: also the context
stream's add_*_proj/to_add_out, the SD3 script's default) in fp32 (``cast_training_params``), bf16
autocast, AdamW with PyTorch's defaults; full fine-tunes keep fp32 weights under bf16 autocast.
Latents and text embeddings are random tensors of the cached shapes, as in a cached-latent step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cases import BenchCase
from .models import build_denoiser

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
SD3_TARGETS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]


def fake_batch(
    model: nn.Module, arch: str, batch: int, resolution: int, device: torch.device, *, seed: int = 0
) -> dict:
    """Random tensors shaped like a cached batch for ``model``: latents, text embeddings, pooled,
    SDXL time ids (shapes read from the model's config, so tiny smoke models fit too)."""
    g = torch.Generator(device).manual_seed(seed)
    cfg = model.config
    lat = resolution // 8
    out = {"latents": torch.randn(batch, cfg.in_channels, lat, lat, generator=g, device=device)}
    if arch == "sd3":
        out["prompt_embeds"] = torch.randn(batch, 154, cfg.joint_attention_dim, generator=g, device=device)
        out["pooled"] = torch.randn(batch, cfg.pooled_projection_dim, generator=g, device=device)
        return out
    out["prompt_embeds"] = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g, device=device)
    if arch == "sdxl":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        out["pooled"] = torch.randn(batch, pooled, generator=g, device=device)
        size = [resolution, resolution, 0, 0, resolution, resolution]
        out["time_ids"] = torch.tensor([size] * batch, device=device, dtype=torch.float32)
    return out


def denoiser_forward(
    model: nn.Module, arch: str, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict
) -> torch.Tensor:
    if arch == "sd3":
        return model(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=batch["prompt_embeds"],
            pooled_projections=batch["pooled"],
            return_dict=False,
        )[0]
    added = None
    if arch == "sdxl":
        added = {"text_embeds": batch["pooled"], "time_ids": batch["time_ids"]}
    return model(
        noisy,
        timesteps,
        encoder_hidden_states=batch["prompt_embeds"],
        added_cond_kwargs=added,
        return_dict=False,
    )[0]


def reference_step(
    case: BenchCase, device: torch.device, *, smoke: bool = False, peer: bool = False
) -> tuple[Callable[[], torch.Tensor], nn.Module]:
    """Build the model and the plain loop's step for ``case``.

    ``peer``: the same loop with the whole denoiser under ``torch.compile`` (default mode) -- what
    a user who knows PyTorch would do instead of our trainer (the ``peer`` variant of the table).

    Returns:
        ``(step, model)``; ``step()`` does one optimizer step and returns the loss tensor.
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    model = build_denoiser(case.arch, device, smoke=smoke)
    use_autocast = device.type == "cuda"
    if case.method == "lora":
        model.requires_grad_(False)
        if use_autocast:
            model.to(dtype=torch.bfloat16)
        targets = SD3_TARGETS if case.arch == "sd3" else UNET_TARGETS
        model.add_adapter(
            LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=targets)
        )
        cast_training_params(model, dtype=torch.float32)
    if case.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = fake_batch(model, case.arch, case.batch, case.resolution, device)
    # Off the GPU (--smoke) the peer's graph runs through aot_eager: the plumbing, not inductor's C++.
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    forward_model = torch.compile(model, backend=backend) if peer else model
    g = torch.Generator(device).manual_seed(1)
    alphas_cumprod = torch.linspace(0.9999, 0.005, 1000, device=device)

    def step() -> torch.Tensor:
        x0 = batch["latents"]
        noise = torch.randn(x0.shape, generator=g, device=device)
        if case.arch == "sd3":
            sigma = torch.rand(x0.shape[0], generator=g, device=device).view(-1, 1, 1, 1)
            noisy = (1 - sigma) * x0 + sigma * noise
            t = sigma.flatten() * 1000
            target = noise - x0
        else:
            t = torch.randint(0, 1000, (x0.shape[0],), generator=g, device=device)
            alphas = alphas_cumprod[t].view(-1, 1, 1, 1)
            noisy = alphas.sqrt() * x0 + (1 - alphas).sqrt() * noise
            target = noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            pred = denoiser_forward(forward_model, case.arch, noisy, t, batch)
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, model
