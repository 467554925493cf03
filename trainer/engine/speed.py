"""What makes a training step fast on a GPU, each part behind a :class:`TrainConfig` switch.

The plain diffusers + peft loop is limited by the host on a modern GPU, not by the GPU: an SDXL
step at 1024 px launches ~17k small kernels (autocast casts, peft's fp32 LoRA casts, norms), and
the GPU idles between them. What this module switches on (bench/ measures each part; see
``bench/NOTES.md`` for the numbers):

- **Regional compilation** (``compile``): ``torch.compile`` each instance of the repeated blocks
  (transformer blocks and ResNet blocks) in place. Instances of one class share their compiled
  graph, so compiling costs about one block per shape rather than the whole model, and the
  model's Python control flow, gradient checkpointing, LoRA saving and DDP stay as they are.
  Inside a block, LoRA, norms, casts and activations fuse into few kernels. Measured on an H100:
  1.33-1.41x the plain loop's LoRA samples/s (SD1.5, SDXL, SD3) with 15-30 % less peak memory.
- **Fewer, larger products** (with ``compile``): a UNet attention's LoRA query/key/value
  projections run as one product (:mod:`trainer.lora.projections`) and a GEGLU's two halves as
  two (:mod:`.geglu`), which removes ~2,000 small kernels and a slow backward pass from an SDXL
  LoRA step (184.8 instead of 192.1 ms on an H100). Results agree with the plain forward to
  rounding, not to the bit, so they are CUDA-only and follow the ``compile`` switch.
- **channels_last** (``channels_last``): SDXL's UNet keeps its activations NHWC from the first
  convolution to the last (:mod:`.channels_last`), so cuDNN no longer transposes around each
  convolution. With ``compile`` it also compiles each transformer stage's glue (GroupNorm,
  layout change to tokens and back, residual add: :data:`COMPILE_METHODS`), which otherwise runs
  eagerly as a dozen fp32 copies, and forces inductor's layout optimisation
  (:data:`CHANNELS_LAST_OPTIONS`). SD1.5 stays NCHW (see :func:`.channels_last.convert`).
- **TF32** (``allow_tf32``): fp32 matrix products on the tensor cores (bf16/fp16 runs hardly
  have any; fp32 runs get several times faster).
- **cuDNN autotuning** (``cudnn_benchmark``): cuDNN times its algorithms once per new shape.
- **A compile cache** that outlives the process (``<output>/finetune/.cache/compile``), so a
  second run with the same model skips most of the compile time (PyTorch's FX-graph, AOT and
  autotune caches, on by default, write there).

The compiled step is still host-bound (an SDXL LoRA step launches ~11k kernels); :mod:`.graphs`
replays forward and backward as CUDA graphs on top (``cuda_graphs``), which makes it GPU-bound.
The fused AdamW kernel is chosen in :mod:`.optim`, the frozen base's bf16/fp16 dtype in
:mod:`.setup`.

TF32, cuDNN and compiler flags are process-wide: :func:`apply` returns a :class:`SpeedSession`
whose :meth:`~SpeedSession.restore` puts them back when the run ends (ComfyUI runs other work in
the same process). A compile that fails falls back to eager for that block with a logged warning
instead of ending the run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import TrainConfig

log = logging.getLogger("finetune")

#: Classes whose instances are compiled one by one. The UNets' transformer and ResNet blocks and
#: SD3's joint blocks hold almost all of the work; the glue between them is a few large kernels.
COMPILE_REGIONS: tuple[str, ...] = ("BasicTransformerBlock", "JointTransformerBlock", "ResnetBlock2D")

#: Methods compiled on each instance of a class (or subclass) of a channels-last UNet, for the
#: glue between the regions: a transformer stage's GroupNorm, layout change to tokens and back,
#: and residual add run eagerly otherwise, as a dozen fp32 copies and casts around each stage.
COMPILE_METHODS: tuple[str, ...] = (
    "Transformer2DModel._operate_on_continuous_inputs",
    "Transformer2DModel._get_output_for_continuous_inputs",
)

#: Inductor options for the compiled regions of a channels-last UNet. Layout optimisation keeps a
#: region's convolutions and their gradients NHWC: inductor leaves it off for dynamic shapes, and
#: each convolution backward then copied its incoming gradient to NHWC (4 ms of an SDXL step).
#: (``triton.multi_kernel`` measured 1.5-3 ms faster still, but a graph loaded from the compile
#: cache fails with it in torch 2.11, so a second run would lose its compiled blocks.)
CHANNELS_LAST_OPTIONS: tuple[tuple[str, object], ...] = (("force_layout_optimization", True),)

#: Only the transformer blocks (what ``compile_repeated_blocks`` of diffusers does).
TRANSFORMER_REGIONS: tuple[str, ...] = ("BasicTransformerBlock", "JointTransformerBlock")

_COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"

#: Compiled variants allowed per block class. A ResNet block is specialised on its channel counts
#: (SDXL has about a dozen kinds); dynamo's default of 8 would leave the rest eager without a word.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class SpeedSettings:
    """How a run is made fast.

    Attributes:
        compile: compile the regions (CUDA only).
        regions: class names of the modules compiled one instance at a time.
        methods: ``"Class.method"`` names compiled on each instance of the class or a subclass
            (with a channels-last UNet only).
        backend: the ``torch.compile`` backend ("inductor"; tests use "aot_eager").
        mode: the ``torch.compile`` mode (None = default; "reduce-overhead" adds CUDA graphs).
        dynamic: ``torch.compile``'s ``dynamic`` (None = static first, dynamic after a shape change).
        channels_last: SDXL's UNet reads and writes NHWC end to end (:mod:`.channels_last`;
            CUDA only).
        channels_last_group_norm: with ``channels_last``, GroupNorm statistics per channel first.
        tf32: TF32 for fp32 matrix products and convolutions (CUDA only).
        cudnn_benchmark: cuDNN algorithm autotuning (CUDA only).
        fallback_to_eager: a block that fails to compile runs eagerly (with a warning) instead of
            failing the run.
        cache_dir: where compiled artefacts are kept across runs ("" = PyTorch's default, a
            temporary folder). An explicit ``TORCHINDUCTOR_CACHE_DIR`` in the environment wins.
        attention_backends: ``torch.nn.attention.SDPBackend`` names tried first, in order, for
            the denoiser's attention (CUDA only; empty = PyTorch's own choice).
        any_device: also compile off CUDA (tests on the CPU).
        cuda_graphs: replay each micro-batch's forward and backward as a CUDA graph
            (:mod:`.graphs`; the loop builds them once the optimizer's parameters are known).
        group_lora_projections: run the LoRA projections that read the same input (an
            attention's query, key and value) as one product (:mod:`trainer.lora.projections`;
            CUDA only: the numbers agree with peft's to rounding, not to the bit).
        split_geglu: compute the UNets' GEGLU halves as two products (:mod:`.geglu`; CUDA
            only, for the same reason).
        compile_options: inductor options for the compiled regions (``torch.compile(options=)``),
            besides :data:`CHANNELS_LAST_OPTIONS` for a channels-last UNet.
    """

    compile: bool = True
    regions: tuple[str, ...] = COMPILE_REGIONS
    methods: tuple[str, ...] = COMPILE_METHODS
    backend: str = "inductor"
    mode: str | None = None
    dynamic: bool | None = None
    channels_last: bool = True
    channels_last_group_norm: bool = True
    tf32: bool = True
    cudnn_benchmark: bool = True
    fallback_to_eager: bool = True
    cache_dir: str = ""
    attention_backends: tuple[str, ...] = ()
    any_device: bool = False
    cuda_graphs: bool = True
    group_lora_projections: bool = True
    split_geglu: bool = True
    compile_options: tuple[tuple[str, object], ...] = ()

    @classmethod
    def from_config(cls, config: TrainConfig, *, cache_dir: str | os.PathLike = "") -> SpeedSettings:
        """The settings a run's config asks for.

        Args:
            config: its ``compile`` (which also groups LoRA projections and splits GEGLUs),
                ``channels_last``, ``allow_tf32``, ``cudnn_benchmark`` and ``cuda_graphs``.
            cache_dir: the compile cache folder (usually ``<output>/finetune/.cache/compile``).
        """
        return cls(
            compile=config.compile,
            channels_last=config.channels_last,
            tf32=config.allow_tf32,
            cudnn_benchmark=config.cudnn_benchmark,
            cache_dir=str(cache_dir) if cache_dir else "",
            cuda_graphs=config.cuda_graphs,
            # Both change the arithmetic's grouping (results agree to rounding, not to the bit),
            # so they belong to the compiled fast path and go with its switch.
            group_lora_projections=config.compile,
            split_geglu=config.compile,
        )


@dataclass
class SpeedReport:
    """What :func:`apply` did (stored in run.json, printed by the benchmark).

    Attributes:
        compiled_regions: module instances compiled.
        compiled_methods: methods compiled on single instances (the glue between regions).
        compile_skipped: why compilation was off or impossible ("" when it ran or was not asked).
        channels_last, tf32, cudnn_benchmark: whether each was switched on.
        cache_dir: the compile cache folder in use ("" = PyTorch's default).
        attention_backends: the attention backends tried first ("" = PyTorch's choice).
        cuda_graphs: whether the steps are CUDA graphs; ``cuda_graphs_skipped`` says why not.
        grouped_attentions: attentions whose LoRA projections run as one product.
        split_geglus: GEGLU feed-forwards computing their halves as two products.
    """

    compiled_regions: int = 0
    compiled_methods: int = 0
    compile_skipped: str = ""
    channels_last: bool = False
    tf32: bool = False
    cudnn_benchmark: bool = False
    cache_dir: str = ""
    attention_backends: str = ""
    cuda_graphs: bool = False
    cuda_graphs_skipped: str = ""
    grouped_attentions: int = 0
    split_geglus: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _SavedFlags:
    """Process-wide values :func:`apply` changed, to be put back by :meth:`SpeedSession.restore`."""

    matmul_precision: str | None = None
    cudnn_tf32: bool | None = None
    cudnn_benchmark: bool | None = None
    suppress_errors: bool | None = None
    recompile_limit: tuple[str, int] | None = None  # (config name, previous value)
    cache_env: tuple[bool, str | None] | None = None  # (changed, previous value)


@dataclass
class SpeedSession:
    """The outcome of :func:`apply`: its report, and the flags to restore when the run ends.

    Usable as a context manager; :meth:`restore` is idempotent.
    """

    report: SpeedReport
    _saved: _SavedFlags = field(default_factory=_SavedFlags, repr=False)

    def restore(self) -> None:
        """Put back the process-wide flags :func:`apply` changed (compiled blocks stay compiled)."""
        s, self._saved = self._saved, _SavedFlags()
        if s.matmul_precision is not None:
            torch.set_float32_matmul_precision(s.matmul_precision)
        if s.cudnn_tf32 is not None:
            torch.backends.cudnn.allow_tf32 = s.cudnn_tf32
        if s.cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = s.cudnn_benchmark
        if s.suppress_errors is not None:
            import torch._dynamo.config as dynamo_config

            dynamo_config.suppress_errors = s.suppress_errors
        if s.recompile_limit is not None:
            import torch._dynamo.config as dynamo_config

            setattr(dynamo_config, s.recompile_limit[0], s.recompile_limit[1])
        if s.cache_env is not None and s.cache_env[0]:
            previous = s.cache_env[1]
            if previous is None:
                os.environ.pop(_COMPILE_CACHE_ENV, None)
            else:
                os.environ[_COMPILE_CACHE_ENV] = previous

    def __enter__(self) -> SpeedSession:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def compile_unavailable(device: torch.device, backend: str = "inductor", *, any_device: bool = False) -> str:
    """Why ``torch.compile`` cannot (or should not) run here; "" when it can.

    Args:
        device: the training device.
        backend: the compile backend; only "inductor" needs Triton and a recent GPU.
        any_device: allow devices other than CUDA (tests).
    """
    if device.type != "cuda" and not any_device:
        return f"compilation is only used on CUDA GPUs (this run is on {device.type})"
    if backend != "inductor" or device.type != "cuda":
        return ""
    from torch.utils._triton import has_triton

    if not has_triton():
        return "Triton is not installed (pip install triton); training runs uncompiled"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return f"the GPU (compute capability {major}.{minor}) is older than Triton supports (7.0); training runs uncompiled"
    return ""


def compile_regions(
    model: nn.Module,
    *,
    class_names: tuple[str, ...] = COMPILE_REGIONS,
    backend: str = "inductor",
    mode: str | None = None,
    dynamic: bool | None = None,
    options: dict | None = None,
) -> int:
    """Regional compilation: ``torch.compile`` every module whose class is in ``class_names``, in place.

    ``nn.Module.compile`` keeps the module and its parameter names (no ``_orig_mod.``), so saving,
    LoRA key names and DDP are unaffected. A region inside another region is left to the outer one.

    Args:
        model: the denoiser (LoRA layers already injected: they are compiled with their block).
        class_names: the region classes.
        backend, mode, dynamic, options: passed to ``torch.compile``.

    Returns:
        How many module instances were compiled.
    """
    names = set(class_names)
    count = 0
    skip: set[int] = set()
    for module in model.modules():
        if id(module) in skip:
            continue
        if type(module).__name__ in names:
            module.compile(backend=backend, mode=mode, dynamic=dynamic, options=options)
            skip.update(id(m) for m in module.modules())
            count += 1
    return count


def compile_methods(
    model: nn.Module,
    *,
    methods: tuple[str, ...] = COMPILE_METHODS,
    backend: str = "inductor",
    mode: str | None = None,
    dynamic: bool | None = None,
    options: dict | None = None,
) -> int:
    """``torch.compile`` the named methods of every instance of their class or a subclass, in place.

    The compiled bound method is set on the instance, as ``nn.Module.compile`` does for its call,
    so all instances share one compiled graph per shape. Modules inside a compiled region are left
    to the region.

    Args:
        model: the denoiser.
        methods: ``"Class.method"`` names.
        backend, mode, dynamic, options: passed to ``torch.compile``.

    Returns:
        How many methods were compiled.

    Raises:
        ValueError: a name that is not ``"Class.method"``.
    """
    wanted: dict[str, list[str]] = {}
    for name in methods:
        cls, _, method = name.partition(".")
        if not cls or not method or "." in method:
            raise ValueError(f"methods: {name!r} is not 'Class.method'")
        wanted.setdefault(cls, []).append(method)
    inside: set[int] = set()
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            inside.update(id(m) for m in module.modules())
    count = 0
    for module in model.modules():
        if id(module) in inside:
            continue
        classes = {c.__name__ for c in type(module).__mro__}
        for cls in classes & wanted.keys():
            for method in wanted[cls]:
                compiled = torch.compile(
                    getattr(module, method), backend=backend, mode=mode, dynamic=dynamic, options=options
                )
                setattr(module, method, compiled)
                count += 1
    return count


def prefer_attention_backends(model: nn.Module, backends: tuple[str, ...]) -> None:
    """Make ``model``'s forward try these SDPA backends first (e.g. ``("CUDNN_ATTENTION",)``).

    The choice is made when an attention call runs or is traced for compilation, so wrapping the
    forward covers the compiled blocks too; backward uses the kernel its forward chose.

    Raises:
        ValueError: an unknown backend name, listing the valid ones.
    """
    import functools

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # A pybind11 enum: its members are listed in __members__, it is not iterable.
    valid = [name for name in SDPBackend.__members__ if name not in ("ERROR", "OVERRIDEABLE")]
    unknown = [b for b in backends if b not in valid]
    if unknown:
        raise ValueError(f"attention_backends: unknown {unknown}; use some of {valid}")
    order = [getattr(SDPBackend, b) for b in backends] + [
        getattr(SDPBackend, b) for b in valid if b not in backends
    ]
    original = model.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        with sdpa_kernel(order, set_priority=True):
            return original(*args, **kwargs)

    model.forward = forward


def _set_flags(
    settings: SpeedSettings, device: torch.device, report: SpeedReport, saved: _SavedFlags
) -> None:
    if device.type != "cuda":
        return
    if settings.tf32:
        saved.matmul_precision = torch.get_float32_matmul_precision()
        saved.cudnn_tf32 = torch.backends.cudnn.allow_tf32
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        report.tf32 = True
    if settings.cudnn_benchmark:
        saved.cudnn_benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        report.cudnn_benchmark = True


def _set_cache_dir(cache_dir: str, report: SpeedReport, saved: _SavedFlags) -> None:
    previous = os.environ.get(_COMPILE_CACHE_ENV)
    if previous:
        report.cache_dir = previous  # the user's choice wins
        return
    if not cache_dir:
        return
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    saved.cache_env = (True, previous)
    os.environ[_COMPILE_CACHE_ENV] = str(cache_dir)
    report.cache_dir = str(cache_dir)


def apply(
    model: nn.Module,
    config: TrainConfig | None,
    device: torch.device | str,
    *,
    settings: SpeedSettings | None = None,
    cache_dir: str | os.PathLike = "",
) -> SpeedSession:
    """Make ``model``'s training steps fast on ``device``, as the config allows.

    Call after the model is on its device with LoRA injected (or unfrozen) and gradient
    checkpointing set, and before the optimizer is built or the model is wrapped for DDP.

    Args:
        model: the denoiser.
        config: the run's config (its switches); ignored when ``settings`` is given.
        device: the training device; off CUDA only what works there is done.
        settings: explicit settings (the benchmark and tests); default from ``config``.
        cache_dir: where compiled artefacts are kept across runs (see :class:`SpeedSettings`).

    Returns:
        A :class:`SpeedSession`; call its ``restore()`` when the run ends.
    """
    device = torch.device(device)
    if settings is None:
        if config is None:
            raise ValueError("apply() needs a config or explicit settings")
        settings = SpeedSettings.from_config(config, cache_dir=cache_dir)
    report = SpeedReport()
    saved = _SavedFlags()
    _set_flags(settings, device, report, saved)
    if settings.attention_backends and device.type == "cuda":
        prefer_attention_backends(model, settings.attention_backends)
        report.attention_backends = ",".join(settings.attention_backends)
    if settings.group_lora_projections and (device.type == "cuda" or settings.any_device):
        from ..lora import projections

        report.grouped_attentions = projections.install(model)
    if settings.split_geglu and (device.type == "cuda" or settings.any_device):
        from . import geglu

        report.split_geglus = geglu.split(model)
    if settings.channels_last and (device.type == "cuda" or settings.any_device):
        from . import channels_last

        report.channels_last = channels_last.convert(model, group_norm=settings.channels_last_group_norm)
    # The compiled glue and forced layout optimisation are measured parts of the channels-last
    # UNet (SDXL). With SD1.5's NCHW stages they met an inductor stride assertion on an H100.
    methods = settings.methods if report.channels_last else ()
    compile_options = settings.compile_options + (CHANNELS_LAST_OPTIONS if report.channels_last else ())
    if settings.compile:
        reason = compile_unavailable(device, settings.backend, any_device=settings.any_device)
        if reason:
            report.compile_skipped = reason
            if device.type == "cuda":
                log.warning("finetune: %s", reason)
        else:
            _set_cache_dir(settings.cache_dir, report, saved)
            import torch._dynamo.config as dynamo_config

            if settings.fallback_to_eager:
                saved.suppress_errors = dynamo_config.suppress_errors
                dynamo_config.suppress_errors = True
            # torch < 2.6 calls it cache_size_limit.
            limit_name = (
                "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
            )
            previous = getattr(dynamo_config, limit_name)
            if previous < RECOMPILE_LIMIT:
                saved.recompile_limit = (limit_name, previous)
                setattr(dynamo_config, limit_name, RECOMPILE_LIMIT)
            # Other backends ignore inductor's options with a warning.
            options = dict(compile_options) if settings.backend == "inductor" and compile_options else None
            report.compiled_regions = compile_regions(
                model,
                class_names=settings.regions,
                backend=settings.backend,
                mode=settings.mode,
                dynamic=settings.dynamic,
                options=options,
            )
            report.compiled_methods = compile_methods(
                model,
                methods=methods,
                backend=settings.backend,
                mode=settings.mode,
                dynamic=settings.dynamic,
                options=options,
            )
            if report.compiled_regions == 0:
                report.compile_skipped = (
                    f"{type(model).__name__} has no {', '.join(settings.regions)} to compile"
                )
            log.info(
                "finetune: compiling %d blocks on first use (%s)", report.compiled_regions, settings.backend
            )
    else:
        report.compile_skipped = "compile is off in the config"
    return SpeedSession(report=report, _saved=saved)
