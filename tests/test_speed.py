"""speed.py on the CPU: its switches and fallbacks, the process-wide flags put back after a run,
channels-last models that still save, and a compiled step (dynamo + AOT autograd through the
``aot_eager`` backend, which needs no C++ compiler) that trains a tiny LoRA UNet to the same losses
and weights as the eager step."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn
from train_helpers import make_images, tiny_config

from trainer.config import Arch, TrainConfig
from trainer.engine.inputs import DenoiserInputs
from trainer.engine.loop import train
from trainer.engine.optim import OptimizerSettings, build_optimizer, param_groups
from trainer.engine.runtime import Runtime
from trainer.engine.setup import prepare_trainables
from trainer.engine.speed import (
    COMPILE_REGIONS,
    SpeedSettings,
    apply,
    compile_regions,
    compile_unavailable,
    prefer_attention_backends,
)
from trainer.engine.step import Objective, batch_loss
from trainer.lora.io import lora_state_dict, read_lora, save_lora
from trainer.models.tiny import tiny_bundle

CPU = torch.device("cpu")


@pytest.fixture
def flags():
    """The process-wide flags speed.py may touch, put back after the test whatever it did."""
    saved = (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    yield saved
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1], saved[2]
    if env is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = env


def _regions(model: nn.Module, names=COMPILE_REGIONS) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ in names]


def test_settings_follow_the_config_switches():
    on = SpeedSettings.from_config(TrainConfig(), cache_dir="/tmp/c")
    assert (on.compile, on.channels_last, on.tf32, on.cudnn_benchmark, on.cache_dir) == (
        True,
        True,
        True,
        True,
        "/tmp/c",
    )
    assert on.group_lora_projections and on.split_geglu  # parts of the compiled fast path
    assert on.regions == ("BasicTransformerBlock", "JointTransformerBlock", "ResnetBlock2D")
    off = SpeedSettings.from_config(
        TrainConfig(compile=False, channels_last=False, allow_tf32=False, cudnn_benchmark=False)
    )
    assert (off.compile, off.channels_last, off.tf32, off.cudnn_benchmark, off.cache_dir) == (
        False,
        False,
        False,
        False,
        "",
    )
    assert not off.group_lora_projections and not off.split_geglu


def test_config_switches_round_trip_through_json():
    cfg = TrainConfig(compile=False, channels_last=False, allow_tf32=False, cudnn_benchmark=False)
    back = TrainConfig.from_dict(json.loads(cfg.to_json()))
    assert (back.compile, back.channels_last, back.allow_tf32, back.cudnn_benchmark) == (
        False,
        False,
        False,
        False,
    )


def test_on_the_cpu_nothing_changes(flags):
    unet = tiny_bundle(Arch.SD15).denoiser
    with apply(unet, TrainConfig(), "cpu") as session:
        report = session.report
        assert report.to_dict() == {
            "compiled_regions": 0,
            "compiled_methods": 0,
            "compile_skipped": "compilation is only used on CUDA GPUs (this run is on cpu)",
            "channels_last": False,
            "tf32": False,
            "cudnn_benchmark": False,
            "cache_dir": "",
            "attention_backends": "",
            "cuda_graphs": False,  # decided by the loop (graphs.step_graphs_for), not by apply()
            "cuda_graphs_skipped": "",
            "grouped_attentions": 0,  # grouping and split GEGLUs are CUDA-only
            "split_geglus": 0,
        }
        assert (
            torch.get_float32_matmul_precision(),
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark,
        ) == flags
        assert unet.conv_in.weight.is_contiguous()
        assert all(getattr(m, "_compiled_call_impl", None) is None for m in unet.modules())


def test_compile_off_in_the_config_is_reported():
    unet = tiny_bundle(Arch.SD15).denoiser
    report = apply(unet, TrainConfig(compile=False), "cpu").report
    assert report.compiled_regions == 0
    assert report.compile_skipped == "compile is off in the config"


def test_cuda_flags_are_set_for_the_run_and_restored(flags):
    # The flags are plain Python state: a "cuda" device needs no GPU as long as nothing compiles.
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.benchmark = False
    unet = tiny_bundle(Arch.SDXL).denoiser
    session = apply(unet, None, "cuda", settings=SpeedSettings(compile=False, channels_last=True))
    assert session.report.tf32 and session.report.cudnn_benchmark and session.report.channels_last
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cudnn.benchmark is True
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not unet.conv_in.weight.is_contiguous()
    session.restore()
    session.restore()  # idempotent: a second call must not undo anything else
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cudnn.benchmark is False


def test_switched_off_parts_leave_flags_alone(flags):
    torch.set_float32_matmul_precision("highest")
    unet = tiny_bundle(Arch.SD15).denoiser
    config = TrainConfig(compile=False, channels_last=False, allow_tf32=False, cudnn_benchmark=False)
    report = apply(unet, config, "cuda").report
    assert (report.tf32, report.cudnn_benchmark, report.channels_last) == (False, False, False)
    assert torch.get_float32_matmul_precision() == "highest"
    assert unet.conv_in.weight.is_contiguous()


def test_compile_unavailable_names_the_reason(monkeypatch):
    import torch.utils._triton as triton_utils

    assert compile_unavailable(CPU) == "compilation is only used on CUDA GPUs (this run is on cpu)"
    assert compile_unavailable(CPU, any_device=True) == ""
    assert compile_unavailable(torch.device("cuda"), "aot_eager") == ""
    monkeypatch.setattr(triton_utils, "has_triton", lambda: False)
    assert (
        compile_unavailable(torch.device("cuda"))
        == "Triton is not installed (pip install triton); training runs uncompiled"
    )
    monkeypatch.setattr(triton_utils, "has_triton", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    assert compile_unavailable(torch.device("cuda")) == (
        "the GPU (compute capability 6.1) is older than Triton supports (7.0); training runs uncompiled"
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert compile_unavailable(torch.device("cuda")) == ""


def test_a_gpu_without_triton_trains_uncompiled(monkeypatch, flags):
    import torch.utils._triton as triton_utils

    monkeypatch.setattr(triton_utils, "has_triton", lambda: False)
    unet = tiny_bundle(Arch.SD15).denoiser
    report = apply(unet, None, "cuda", settings=SpeedSettings(channels_last=False)).report
    assert report.compiled_regions == 0
    assert report.compile_skipped.startswith("Triton is not installed")


def test_compile_regions_compiles_each_block_in_place():
    unet = tiny_bundle(Arch.SD15).denoiser
    names_before = [n for n, _ in unet.named_parameters()]
    regions = _regions(unet)
    # The tiny SD1.5 UNet: transformer blocks 2 down, 1 mid, 3 up; ResNets 2 + 2 down, 2 mid, 3 + 3 up.
    assert sum("transformer_blocks" in n for n in regions) == 6
    assert sum("resnets" in n for n in regions) == 12
    assert compile_regions(unet, backend="eager") == len(regions) == 18
    compiled = [n for n, m in unet.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == regions
    assert [n for n, _ in unet.named_parameters()] == names_before  # no "_orig_mod." in any name


def test_a_region_inside_a_region_is_left_to_the_outer_one():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(x)

    model = nn.Sequential(Outer(), Inner())
    assert compile_regions(model, class_names=("Outer", "Inner"), backend="eager") == 2
    assert model[0]._compiled_call_impl is not None
    assert model[0].inner._compiled_call_impl is None
    assert model[1]._compiled_call_impl is not None


def test_the_compile_cache_folder_is_used_for_the_run_and_put_back(tmp_path, flags):
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    unet = tiny_bundle(Arch.SD15).denoiser
    settings = SpeedSettings(
        backend="eager", any_device=True, channels_last=False, cache_dir=str(tmp_path / "compile")
    )
    with apply(unet, None, "cpu", settings=settings) as session:
        assert session.report.cache_dir == str(tmp_path / "compile")
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile")
        assert (tmp_path / "compile").is_dir()
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_a_cache_folder_the_user_set_wins(tmp_path, flags):
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "mine")
    unet = tiny_bundle(Arch.SD15).denoiser
    settings = SpeedSettings(
        backend="eager", any_device=True, channels_last=False, cache_dir=str(tmp_path / "ours")
    )
    with apply(unet, None, "cpu", settings=settings) as session:
        assert session.report.cache_dir == str(tmp_path / "mine")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert not (tmp_path / "ours").exists()


def test_a_channels_last_lora_saves_and_loads_the_same_weights(tmp_path, flags):
    bundle = tiny_bundle(Arch.SDXL)
    config = TrainConfig(
        lora_targets="attention+ff+conv", lora_rank=4, lora_alpha=4.0, mixed_precision="fp32"
    )
    trainables = prepare_trainables(bundle, config, Runtime(precision="fp32", device="cpu"))
    with torch.no_grad():
        for p in trainables.denoiser:
            p.add_(torch.randn_like(p))  # lora_B starts at zero; give every weight a value
    apply(bundle.denoiser, None, "cuda", settings=SpeedSettings(compile=False, channels_last=True)).restore()
    conv_lora = next(p for p in trainables.denoiser if p.ndim == 4 and p.shape[-1] == 3)
    assert conv_lora.is_contiguous(memory_format=torch.channels_last) and not conv_lora.is_contiguous()
    tensors = lora_state_dict(bundle.denoiser, [None], Arch.SDXL, alpha=4.0, dtype=torch.float32)
    path = save_lora(tmp_path / "cl.safetensors", tensors)
    loaded, _ = read_lora(path)
    assert set(loaded) == set(tensors)
    assert all(torch.equal(loaded[k], tensors[k].contiguous()) for k in tensors)


def _lora_steps(
    *, compiled: bool, arch: Arch = Arch.SD15, channels_last: bool = False, steps: int = 3
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """``steps`` optimizer steps of a tiny UNet LoRA on fixed inputs; returns losses and weights."""
    bundle = tiny_bundle(arch, seed=0)
    config = TrainConfig(
        lora_rank=4,
        lora_alpha=4.0,
        mixed_precision="fp32",
        lora_targets="attention+ff+conv",
        learning_rate=1e-2,
    )
    rt = Runtime(precision="fp32", device="cpu")
    trainables = prepare_trainables(bundle, config, rt)
    settings = SpeedSettings(
        compile=compiled,
        backend="aot_eager",
        any_device=True,
        channels_last=channels_last,
        fallback_to_eager=False,
    )
    regions = len(_regions(bundle.denoiser))
    stages = len(_regions(bundle.denoiser, ("Transformer2DModel",)))
    session = apply(bundle.denoiser, None, CPU, settings=settings)
    assert session.report.compiled_regions == (regions if compiled else 0)
    # With a channels-last UNet each transformer stage gets its norm-in and output glue compiled.
    assert session.report.compiled_methods == (2 * stages if compiled and channels_last else 0)
    assert session.report.channels_last is channels_last
    groups = param_groups(denoiser_params=trainables.denoiser, lr=config.learning_rate)
    optimizer = build_optimizer("adamw", groups, OptimizerSettings(lr=config.learning_rate))
    objective = Objective.for_run(
        model_prediction="epsilon", noise_scheduler=bundle.noise_scheduler, config=config
    )
    g = torch.Generator().manual_seed(0)
    cfg = bundle.denoiser.config
    sdxl = arch == Arch.SDXL
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim if sdxl else 0
    inputs = DenoiserInputs(
        latents=torch.randn(2, 4, 8, 8, generator=g),
        prompt_embeds=torch.randn(2, 77, cfg.cross_attention_dim, generator=g),
        pooled=torch.randn(2, pooled, generator=g) if sdxl else None,
        time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2) if sdxl else None,
        captions=["", ""],
    )
    noise = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        loss = batch_loss(bundle.denoiser, arch, objective, inputs, generator=noise).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    session.restore()
    return losses, {n: p.detach().clone() for n, p in trainables.named.items()}


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_the_compiled_step_trains_like_the_eager_step(flags, caplog, channels_last):
    import torch._dynamo
    import torch._dynamo.config as dynamo_config

    torch._dynamo.reset()
    limit = dynamo_config.recompile_limit
    # Channels-last applies to SDXL's UNet (SD1.5 stays NCHW: trainer/engine/channels_last.py).
    arch = Arch.SDXL if channels_last else Arch.SD15
    eager_losses, eager_weights = _lora_steps(compiled=False, arch=arch)
    fast_losses, fast_weights = _lora_steps(compiled=True, arch=arch, channels_last=channels_last)
    torch._dynamo.reset()
    assert dynamo_config.recompile_limit == limit  # raised for the run only
    # Every ResNet shape got its own graph: none fell back to eager at dynamo's recompile limit.
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]
    assert fast_losses == pytest.approx(eager_losses, rel=1e-5)
    assert eager_losses[0] != pytest.approx(eager_losses[-1], rel=1e-3)  # it trained
    assert set(fast_weights) == set(eager_weights)
    # fp32 rounding differs between the compiled and eager kernels; Adam's normalisation magnifies
    # it for gradients near zero, so compare all LoRA weights together.
    diff = torch.stack([(fast_weights[n] - w).norm() for n, w in eager_weights.items()]).norm()
    total = torch.stack([w.norm() for w in eager_weights.values()]).norm()
    assert float(diff / total) < 1e-3


def test_a_run_records_what_speed_did_in_run_json(tmp_path):
    data = make_images(tmp_path / "data", [(64, 64)], repeats=2)
    config = tiny_config(tmp_path, data, max_steps=1)
    result = train(config, model_loader=lambda c: tiny_bundle(Arch.SD15, seed=0), device="cpu")
    assert result.state.value == "finished", result.message
    run = json.loads((tmp_path / "out" / "finetune" / "tiny" / "run.json").read_text())
    assert run["speed"]["compiled_regions"] == 0
    assert run["speed"]["compile_skipped"] == "compilation is only used on CUDA GPUs (this run is on cpu)"


def test_preferred_attention_backends_keep_the_output():
    torch.manual_seed(0)
    unet = tiny_bundle(Arch.SD15).denoiser
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=ctx).sample
        prefer_attention_backends(unet, ("MATH",))
        after = unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"attention_backends: unknown \['FAST'\]; use some of \["):
        prefer_attention_backends(unet, ("FAST",))
