"""The ComfyUI-model backend of the trainer: LoRA training on the MODEL ComfyUI loaded.

:class:`ComfyDenoiser` implements :class:`trainer.engine.denoiser.TrainableDenoiser` for any model
ComfyUI runs whose sampling is epsilon, v or rectified flow:

- **No second copy, no leak.** The run trains on a shallow clone of the MODEL's patcher (the same
  weights). Its LoRA layers reach the model only as a patcher *injection* (a bypass forward on each
  trained layer: ``y = f(x) + scale * up(down(x))``); ComfyUI injects it when it loads the clone
  and ejects it when it loads another patcher of the same model, so a prompt rendering the base
  model in between sees the base weights exactly. Before every step the clone is loaded again if
  ComfyUI unloaded it for another prompt.
- **The objective comes from the model**: ``model_sampling`` says epsilon, v or flow. Epsilon and v
  train on the model's own DDPM table (as a diffusers scheduler, so noise offset and min-SNR
  apply); flow on the model's own shifted sigma table (set the shift with ComfyUI's ModelSampling
  nodes), with the run's timestep density and loss weighting.
- **Inputs through the given CLIP and VAE**: latents are the VAE's posterior mean through the
  model's latent format; each caption variant is encoded once by the CLIP and cached in memory.
- **Files stock Load LoRA applies**: see :mod:`.comfy_lora`.

ComfyUI modules are imported inside functions, as in :mod:`.host`, so the pack imports without a
ComfyUI checkout.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import torch
from torch import nn

from ..trainer.config import CacheMode, Method, TrainConfig
from ..trainer.engine.caching import EncodedImage, TensorStore, text_key
from ..trainer.engine.denoiser import TrainableDenoiser
from ..trainer.engine.inputs import DenoiserInputs, InputBuilder, InputSettings
from ..trainer.engine.objectives import FlowSchedule, NoisedBatch
from ..trainer.engine.setup import Trainables
from ..trainer.engine.step import Objective
from . import comfy_lora

log = logging.getLogger("finetune")

NODE = "Train LoRA (Model)"
INJECTION_KEY = "finetune_lora"
#: Families this path trains; others are refused. SD15, SDXL, SD3 (3.5 layout), Flux and Lumina2 are
#: trained and loaded back in tests/test_comfy_model_training.py; SD20 (v-prediction) and FluxSchnell
#: run the same model code as SD15 and Flux.
TRAINABLE_FAMILIES = ("SD15", "SD20", "SDXL", "SD3", "Flux", "FluxSchnell", "Lumina2")
_NATIVE_RESOLUTION = {"SD15": 512, "SD20": 768}
_FLOW_TABLE = 1000


def family_of(model) -> str:
    """The name of the model family ComfyUI detected (its ``supported_models`` class)."""
    return type(model.model.model_config).__name__


def prediction_of(model) -> str | None:
    """The objective ("epsilon", "v_prediction" or "flow") from the MODEL's ``model_sampling``;
    None when this path has no objective for it (EDM, x0, img2img, cascade, continuous schedules)."""
    import comfy.model_sampling as ms

    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, (ms.X0, ms.EDM, ms.IMG_TO_IMG_FLOW, ms.V_PREDICTION_DDPM, ms.COSMOS_RFLOW)):
        return None
    if isinstance(sampling, ms.CONST):
        return "flow" if isinstance(sampling, (ms.ModelSamplingDiscreteFlow, ms.ModelSamplingFlux)) else None
    discrete = isinstance(sampling, ms.ModelSamplingDiscrete) and not isinstance(
        sampling, (ms.StableCascadeSampling, ms.ModelSamplingDiscreteEDM)
    )
    if not discrete:
        return None
    return "v_prediction" if isinstance(sampling, ms.V_PREDICTION) else "epsilon"


def check_trainable(model, config: TrainConfig) -> str:
    """Refuse, at queue time, what this path cannot train; returns the family name.

    Raises:
        ValueError: one sentence naming the family ComfyUI detected (or the option) and what to do.
    """
    if model is None or not hasattr(model, "model"):
        raise ValueError(f"{NODE}: the model input is empty; connect the MODEL of a checkpoint loader")
    family = family_of(model)
    prediction = prediction_of(model)
    if family not in TRAINABLE_FAMILIES:
        raise ValueError(
            f"{NODE}: ComfyUI detected this model as {family} ({type(model.model).__name__}), a family this "
            f"node cannot train yet; it trains {', '.join(TRAINABLE_FAMILIES)}"
        )
    if prediction is None:
        sampling = " + ".join(b.__name__ for b in type(model.get_model_object("model_sampling")).__bases__)
        raise ValueError(
            f"{NODE}: this {family} model samples with {sampling}, which has no training objective here; "
            "remove the ModelSampling node that set it (epsilon, v and flow models train)"
        )
    if getattr(model.model.latent_format, "latent_dimensions", 2) != 2:
        raise ValueError(f"{NODE}: {family} is a video model; this node trains image models only")
    if config.method != Method.LORA:
        raise ValueError(f"{NODE}: trains LoRA only; use Train Full Fine-tune with the model file")
    if config.train_text_encoder:
        raise ValueError(
            f"{NODE}: train_text_encoder is not available on a ComfyUI MODEL yet; turn it off, or use "
            "Train LoRA with the model file"
        )
    try:
        names = comfy_lora.target_names(model.model.diffusion_model, config.lora_targets)
    except ValueError as e:
        raise ValueError(f"{NODE}: {e}") from None
    if not names:
        raise ValueError(
            f"{NODE}: lora_targets {config.lora_targets.value!r} matches no layer of this {family} model"
        )
    keys = comfy_lora.file_keys(names, model.model.model_config.unet_config)
    try:
        comfy_lora.verify_keys(model.model, keys, family)
    except comfy_lora.LoraKeyError as e:
        raise ValueError(f"{NODE}: {e}") from None
    return family


def _normal_tensors(module: nn.Module) -> int:
    """Replace inference tensors (ComfyUI loads models under ``torch.inference_mode``) by normal
    ones with the same values, one tensor at a time, so autograd can save them for backward.
    Returns how many were replaced."""
    count = 0
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = nn.Parameter(p.clone(), requires_grad=False)
                    count += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    count += 1
    return count


@contextlib.contextmanager
def _training_kernels():
    """ComfyUI's ``in_training`` flag for one forward pass: fused kernels without a backward (Flux's
    rope, LTX's) take their plain-torch path, which computes the same values. Only the forward
    reads the flag, so a prompt rendering meanwhile is unaffected but for that choice of kernel."""
    import comfy.model_management as mm

    previous = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = previous


class LoraLayer(nn.Module):
    """One LoRA pair on a linear layer, applied beside it (bypass): ``scale * up(down(dropout(x)))``.

    Initialised as peft does (kaiming-uniform ``down``, zero ``up``), so a fresh adapter changes nothing.
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, dropout: float,
                 generator: torch.Generator):  # fmt: skip
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear and peft
        with torch.no_grad():
            self.down.uniform_(-bound, bound, generator=generator)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x).to(self.down.dtype)
        return (h @ self.down.t() @ self.up.t()) * self.scale


class _ForwardPatch:
    """Replaces one module's forward while the training clone is injected (ComfyUI calls
    :meth:`inject` when it loads the clone and :meth:`eject` when it loads another patcher of the
    same model), so a prompt rendering the base model meanwhile runs the module unpatched."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def original(self, *args, **kwargs):
        return self.layer.__class__.forward(self.layer, *args, **kwargs)

    def inject(self) -> None:
        self.layer.forward = self

    def eject(self) -> None:
        if self.layer.__dict__.get("forward") is self:
            del self.layer.forward


class _Bypass(_ForwardPatch):
    """Adds a LoRA pair beside one linear layer."""

    def __init__(self, layer: nn.Module, lora: LoraLayer):
        super().__init__(layer)
        self.lora = lora

    def __call__(self, x, *args, **kwargs):
        out = self.original(x, *args, **kwargs)
        return out + self.lora(x).to(out.dtype)


class _NormOnCopy(_ForwardPatch):
    """Runs a norm layer of a block on a copy of its input.

    ComfyUI's blocks update activations in place after a norm has read them (``x += …`` in Flux's
    blocks), which autograd refuses once the LoRA makes those activations require gradients: the
    norm saved ``x`` for its backward. On a copy, the norm saves the copy and the in-place update
    changes only ``x``. Costs one activation per norm, only while gradients are recorded.
    """

    def __call__(self, x, *args, **kwargs):
        if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
            x = x.clone()
        return self.original(x, *args, **kwargs)


class _Recompute(_ForwardPatch):
    """Gradient checkpointing of one block: only its inputs are kept for backward, which runs the
    block again to get its activations.

    Each pass runs on copies of the block's arguments: ComfyUI's blocks update their input
    activations in place (``img += …``), which would change what the recomputation starts from,
    and callers change ``transformer_options`` for the next block. The recomputation runs in
    backward, outside the step's forward, so it sets ComfyUI's ``in_training`` flag itself (the
    same kernels as the first pass).

    Args:
        preserve_rng_state: replay the forward's random draws (only LoRA dropout draws any).
    """

    def __init__(self, layer: nn.Module, *, preserve_rng_state: bool):
        super().__init__(layer)
        self.preserve_rng_state = preserve_rng_state

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.original(*args, **kwargs)
        # The dicts as they are now: the recomputation runs after the caller changed them.
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(
            self._pass, *args, use_reentrant=False, preserve_rng_state=self.preserve_rng_state, **kwargs
        )

    def _pass(self, *args, **kwargs):
        with _training_kernels():
            return self.original(*map(_fresh, args), **{k: _fresh(v) for k, v in kwargs.items()})


def _fresh(value):
    """A copy a block may change in place (tensors and dicts); anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    return dict(value) if isinstance(value, dict) else value


def checkpoint_units(diffusion_model: nn.Module) -> list[str]:
    """The blocks gradient checkpointing recomputes: the first modules with layers of their own
    found in the model's block lists (``nn.ModuleList``/``nn.Sequential``, entered from the top).

    That is each double and single block of Flux, each joint block of SD3, each layer of Lumina 2,
    and each ResBlock, SpatialTransformer and resampler of a UNet (whose ``input_blocks`` hold
    ``TimestepEmbedSequential`` lists of them, which ComfyUI calls layer by layer). Embedders and
    output layers outside lists are left as they are: their activations are small.
    """
    containers = (nn.ModuleList, nn.Sequential)
    units: list[str] = []

    def visit(module: nn.Module, prefix: str, listed: bool) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, containers):
                visit(child, f"{path}.", True)
            elif listed and next(child.children(), None) is not None:
                units.append(path)

    visit(diffusion_model, "", False)
    return units


def _norms(diffusion_model: nn.Module) -> list[nn.Module]:
    """The norm layers (LayerNorm, RMSNorm, GroupNorm…) of a diffusion model."""
    return [
        m for m in diffusion_model.modules() if "norm" in type(m).__name__.lower() and hasattr(m, "weight")
    ]


class ComfyInputBuilder(InputBuilder):
    """Latents through ComfyUI's VAE and the model's latent format; conditioning through its CLIP,
    one cached entry per caption variant (the caption policy still draws per sample)."""

    def __init__(self, *, denoiser: ComfyDenoiser, **kwargs):
        super().__init__(bundle=None, **kwargs)
        self.owner = denoiser

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        images = ((pixels.float() + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)
        with torch.inference_mode(False), torch.no_grad():
            raw = self.owner.vae.encode(images)
            latents = self.owner.patcher.model.process_latent_in(raw.float())
        return latents.float().cpu()

    def _encode_one(self, text: str) -> dict[str, torch.Tensor]:
        clip = self.owner.clip
        with torch.inference_mode(False), torch.no_grad():
            out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
        cond = {"cross_attn": out.pop("cond")[0]}
        for key, value in out.items():
            if isinstance(value, torch.Tensor):
                cond[key] = value[0] if value.ndim > 0 and value.shape[0] == 1 else value
        return {k: v.detach().to("cpu") for k, v in cond.items()}

    def conditioning(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        out = []
        for text in captions:
            key = text_key(text=text, encoder_identity=self.text_identity)
            hit = self.text_store.get(key)
            if hit is None:
                hit = self._encode_one(text)
                self.text_store.put(key, hit)
            out.append(hit)
        return out

    def build(self, samples, prepared=None) -> DenoiserInputs:
        images: list[EncodedImage] = self.encode_pending(
            prepared if prepared is not None else [self.prepare(s) for s in samples]
        )
        captions = [self.caption_for(s) for s in samples]
        conds = self.conditioning(captions)
        latents = torch.stack([e.latents for e in images]).to(self.device, torch.float32)
        extras = []
        for cond, enc in zip(conds, images, strict=True):
            (oh, ow), (top, left), (th, tw) = enc.original_size, enc.crop_top_left, enc.target_size
            extra = {k: v for k, v in cond.items()}
            extra.update(width=ow, height=oh, crop_w=left, crop_h=top, target_width=tw, target_height=th)
            extras.append(extra)
        return DenoiserInputs(
            latents=latents, prompt_embeds=None, pooled=None, time_ids=None, captions=captions, extras=extras
        )


class ComfyDenoiser(TrainableDenoiser):
    """A MODEL (ComfyUI ``ModelPatcher``) with LoRA layers injected into a shallow clone.

    Args:
        model: the MODEL from a loader (not changed: a clone carries the adapters).
        clip: the CLIP that encodes the captions and validation prompts.
        vae: the VAE that encodes the images (and decodes validation renders).
    """

    def __init__(self, model, clip, vae):
        self.base = model
        self.clip = clip
        self.vae = vae
        self.family = family_of(model)
        self.prediction_type = prediction_of(model) or "epsilon"
        self.native_resolution = _NATIVE_RESOLUTION.get(self.family, 1024)
        self.patcher = None
        self.layers: dict[str, LoraLayer] = {}
        self.keys: dict[str, str] = {}
        self.forward_patches: list[_ForwardPatch] = []
        self.checkpointed: list[str] = []  # the blocks gradient checkpointing recomputes
        self.config: TrainConfig | None = None
        self.device = torch.device("cpu")
        self.reloads = 0  # how often the clone had to be loaded (ComfyUI swapped it out meanwhile)

    # Setup ------------------------------------------------------------------------------------

    def prepare(self, config: TrainConfig, runtime, *, cache_dir: Path, memory=None) -> Trainables:
        # ComfyUI places this model's weights itself (memory_arch is None): memory is never given.
        from comfy.patcher_extension import PatcherInjection

        check_trainable(self.base, config)
        self.config = config
        self.device = runtime.device
        patcher = self.base.clone()
        model = patcher.model
        names = comfy_lora.target_names(model.diffusion_model, config.lora_targets)
        self.keys = comfy_lora.file_keys(names, model.model_config.unet_config)
        modules = dict(model.diffusion_model.named_modules())
        generator = torch.Generator().manual_seed(config.seed)
        for name in names:
            layer = modules[name]
            lora = LoraLayer(
                layer.in_features,
                layer.out_features,
                rank=config.lora_rank,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                generator=generator,
            ).to(runtime.device)
            self.layers[name] = lora
            self.forward_patches.append(_Bypass(layer, lora))

        self.forward_patches += [_NormOnCopy(norm) for norm in _norms(model.diffusion_model)]
        self.checkpointed = checkpoint_units(model.diffusion_model) if config.gradient_checkpointing else []
        self.forward_patches += [
            _Recompute(modules[name], preserve_rng_state=config.lora_dropout > 0)
            for name in self.checkpointed
        ]

        def inject(_patcher) -> None:
            for patch in self.forward_patches:
                patch.inject()

        def eject(_patcher) -> None:
            for patch in self.forward_patches:
                patch.eject()

        patcher.set_injections(INJECTION_KEY, [PatcherInjection(inject=inject, eject=eject)])
        self.patcher = patcher
        self._ensure_loaded()
        out = Trainables()
        for name, lora in self.layers.items():
            lora.train()
            out.denoiser += [lora.down, lora.up]
            out.named[f"lora.{name}.down"] = lora.down
            out.named[f"lora.{name}.up"] = lora.up
        log.info(
            "finetune: training %d LoRA layers on ComfyUI's %s model (%s)%s",
            len(self.layers),
            self.family,
            self.prediction_type,
            f", recomputing {len(self.checkpointed)} blocks in backward" if self.checkpointed else "",
        )
        return out

    def _ensure_loaded(self) -> None:
        """Load the training clone (with its injection) unless ComfyUI still holds it loaded."""
        import comfy.model_management as mm

        loaded = any(m.model is self.patcher for m in mm.current_loaded_models)
        if loaded and self.patcher.is_injected:
            return
        self.reloads += 1
        with torch.inference_mode(False):
            mm.load_models_gpu([self.patcher])
            self.patcher.inject_model()  # a no-op when the load injected it already
            _normal_tensors(self.patcher.model.diffusion_model)

    def before_step(self) -> None:
        self._ensure_loaded()

    def host_models(self) -> tuple:
        return (self.patcher,) if self.patcher is not None else ()

    def release(self) -> None:
        """Eject the adapters; the clone is dropped (ComfyUI unloads it when memory is needed)."""
        if self.patcher is not None:
            self.patcher.eject_model()
            self.patcher.remove_injections(INJECTION_KEY)

    def run_info(self) -> dict:
        return {
            "arch": self.family,
            "prediction_type": self.prediction_type,
            "source": "ComfyUI MODEL",
            "comfy_model_class": type(self.base.model).__name__,
            "layers": len(self.layers),
            "checkpointed_blocks": len(self.checkpointed),
        }

    # Objective --------------------------------------------------------------------------------

    def _sampling(self):
        return self.patcher.get_model_object("model_sampling")

    def objective(self, config: TrainConfig) -> Objective:
        sampling = self._sampling()
        if self.prediction_type == "flow":
            return Objective(
                kind="flow",
                flow=flow_table(sampling),
                sampling=config.timestep_sampling.value,
                logit_mean=config.logit_mean,
                logit_std=config.logit_std,
                mode_scale=config.mode_scale,
                weighting=config.flow_loss_weighting.value,
                precondition=config.precondition_outputs,
            )
        return Objective(
            kind=self.prediction_type,
            scheduler=ddpm_scheduler(sampling, self.prediction_type),
            noise_offset=config.noise_offset,
            min_snr_gamma=config.min_snr_gamma,
        )

    # Forward ----------------------------------------------------------------------------------

    def _conds(self, x: torch.Tensor, extras: list[dict]) -> dict:
        """The model's keyword inputs for a batch, built per sample as ComfyUI's sampler does
        (``extra_conds``) and concatenated."""
        model = self.patcher.model
        per_sample = []
        for i, extra in enumerate(extras):
            params = {
                k: (v.unsqueeze(0).to(x.device) if isinstance(v, torch.Tensor) else v)
                for k, v in extra.items()
            }
            if "pooled_output" in params and params["pooled_output"].ndim == 1:
                params["pooled_output"] = params["pooled_output"].unsqueeze(0)
            params.update(device=x.device, noise=x[i : i + 1], prompt_type="positive")
            per_sample.append(model.extra_conds(**params))
        return {k: per_sample[0][k].concat([c[k] for c in per_sample[1:]]) for k in per_sample[0]}

    def predict(self, noised: NoisedBatch, inputs: DenoiserInputs) -> torch.Tensor:
        self._ensure_loaded()  # encoding a latent or caption may have made ComfyUI swap models
        model = self.patcher.model
        sampling = self._sampling()
        x = noised.noisy.float()
        b = x.shape[0]
        if self.prediction_type == "flow":
            sigma = noised.sigmas.reshape(b).float()
            x_in = x
        else:
            sigma = sampling.sigmas.to(x.device)[noised.timesteps.long()].float()
            # The DDPM-scaled input sqrt(a) x0 + sqrt(1-a) n is ComfyUI's x0 + sigma n over sqrt(1 + sigma^2).
            x_in = x * (1.0 + sigma**2).sqrt().reshape(b, *([1] * (x.ndim - 1)))
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        with _training_kernels():
            denoised = model.apply_model(
                x_in, sigma, transformer_options=options, **self._conds(x_in, inputs.extras)
            ).float()
        s = sigma.reshape(b, *([1] * (x.ndim - 1)))
        if self.prediction_type == "v_prediction":
            sd = float(sampling.sigma_data)
            scale = (s**2 + sd**2).sqrt()
            return (x_in * sd**2 / scale**2 - denoised) * scale / (s * sd)
        return (x_in - denoised) / s

    # Inputs, saving, rendering ----------------------------------------------------------------

    def input_builder(self, config, *, dataset, buckets, runtime, park_encoders, on_state, on_move):
        # The MODEL has no file to key a disk cache with: both caches live in memory (off when a
        # random crop changes the latents every draw). They fill as steps draw, through the
        # CLIP and VAE ComfyUI loads and unloads itself: nothing to park.
        device, dtype = runtime.device, runtime.compute_dtype
        from ..trainer.engine.caching import latents_cacheable

        latent_mode = (
            CacheMode.MEMORY if latents_cacheable(crop=config.crop, mode=CacheMode.MEMORY) else CacheMode.OFF
        )
        identity = f"comfy:{self.family}:{id(self.base.model)}"
        return ComfyInputBuilder(
            denoiser=self,
            dataset=dataset,
            buckets=buckets,
            settings=InputSettings.of(config),
            device=device,
            dtype=dtype,
            latent_store=TensorStore(mode=latent_mode, root=None),
            text_store=TensorStore(mode=CacheMode.MEMORY, root=None),
            vae_identity=f"{identity}:vae:{id(self.vae)}",
            text_identity=f"{identity}:clip:{id(self.clip)}",
        )

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA file's tensors (fp16, ``.alpha`` always), keys verified against ComfyUI's map."""
        alpha = float(self.config.lora_alpha)
        out = {}
        for name, lora in self.layers.items():
            stem = self.keys[name]
            out[f"{stem}.lora_down.weight"] = lora.down.detach().to("cpu", torch.float16).contiguous()
            out[f"{stem}.lora_up.weight"] = lora.up.detach().to("cpu", torch.float16).contiguous()
            out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
        return out

    def save_adapter(self, path: Path, *, step: int, epoch: int, ctx) -> Path:
        from ..trainer.config import Arch
        from ..trainer.engine.failures import writing
        from ..trainer.lora import save_lora

        comfy_lora.verify_keys(self.patcher.model, self.keys, self.family)
        config = self.config
        flow = self.prediction_type == "flow"
        meta = ctx.lora_metadata(
            path,
            arch=Arch.SD3 if flow else Arch.SD15,
            base_model_name=f"ComfyUI {self.family} MODEL",
            step=step,
            epoch=epoch,
            prediction_type=None if flow else self.prediction_type,
            resolution=config.resolution or self.native_resolution,
        )
        meta.update(comfy_lora.family_metadata(self.family))
        with writing(path):
            save_lora(path, self.adapter_state_dict(), meta)
        return path

    def render(self, prompts, *, config, runtime, resolution):
        from . import host
        from .images import image_to_pils

        width = config.validation_width or resolution
        height = config.validation_height or resolution
        negative = host.encode_text(self.clip, config.validation_negative_prompt or "")
        images = []
        modes = [lora.training for lora in self.layers.values()]
        for lora in self.layers.values():
            lora.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]), contextlib.ExitStack():
                for prompt in prompts:
                    positive = host.encode_text(self.clip, prompt)
                    image = host.sample_image(
                        self.patcher, self.vae, positive, negative,
                        seed=config.validation_seed, steps=config.validation_steps,
                        cfg=config.validation_guidance, sampler_name="euler",
                        scheduler="simple" if self.prediction_type == "flow" else "normal",
                        width=width, height=height,
                    )  # fmt: skip
                    images.extend(image_to_pils(image)[:1])
        finally:
            for lora, mode in zip(self.layers.values(), modes, strict=True):
                lora.train(mode)
        return images


def ddpm_scheduler(sampling, prediction_type: str):
    """A diffusers DDPM scheduler with the model's own noise table (``alphas_cumprod`` from its sigmas)."""
    from diffusers import DDPMScheduler

    sigmas = sampling.sigmas.detach().double().cpu()
    alphas_cumprod = 1.0 / (1.0 + sigmas**2)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    betas = (1.0 - alphas_cumprod / previous).clamp(0.0, 0.999)
    return DDPMScheduler(
        num_train_timesteps=len(sigmas), trained_betas=betas.tolist(), prediction_type=prediction_type
    )


def flow_table(sampling) -> FlowSchedule:
    """The model's own shifted flow table: ``sigma(t)`` for t = 1..N / N, sigma descending."""
    multiplier = float(getattr(sampling, "multiplier", 1.0))
    t = torch.linspace(1, _FLOW_TABLE, _FLOW_TABLE, dtype=torch.float64).flip(0) / _FLOW_TABLE
    with torch.no_grad():
        sigmas = torch.as_tensor(sampling.sigma((t * multiplier).float())).double().cpu()
    return FlowSchedule(timesteps=(sigmas * _FLOW_TABLE).float(), sigmas=sigmas.float())
