"""Step graphs (trainer/engine/graphs.py) on the CPU.

A real CUDA graph needs a GPU (bench/ runs it there); here the graphs are emulated: capturing keeps
the step function, a replay runs it again on the graph's own input tensors. That is what a CUDA
graph sees, so these tests catch inputs not copied in, gradients not accumulated or not zeroed,
and a noise stream that differs from the eager step's: a run through emulated graphs must give the
eager run's losses and weights exactly.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_images, tiny_config

from trainer.checkpoints import CheckpointStore
from trainer.config import Arch, Precision, TrainConfig
from trainer.engine import graphs as graphs_module
from trainer.engine import loop as loop_module
from trainer.engine.events import Callbacks, RunState
from trainer.engine.graphs import StepGraphs, graphs_unavailable
from trainer.engine.inputs import DenoiserInputs
from trainer.engine.loop import train
from trainer.engine.runtime import Runtime
from trainer.engine.setup import prepare_trainables
from trainer.engine.step import Objective
from trainer.models.tiny import tiny_bundle
from trainer.runfolder import RunFolder

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def _fused_adamw(monkeypatch) -> None:
    """The fused AdamW a CUDA run gets (the CPU has the kernel too): graph steps need its
    device-side skip of an update."""
    real = loop_module.build_optimizer

    def fused(kind, groups, settings):
        return real(kind, groups, replace(settings, device_type="cuda"))

    monkeypatch.setattr(loop_module, "build_optimizer", fused)


def _emulated(monkeypatch) -> list[StepGraphs]:
    """Make train() use emulated step graphs on the CPU; returns the graphs each run built."""
    built: list[StepGraphs] = []

    def factory(model, arch, trainables, *, runtime, enabled, lora_dropout, report):
        assert enabled
        g = StepGraphs(runtime.unwrap(model), arch, trainables.denoiser, autocast_dtype=None, emulate=True)
        report.cuda_graphs = True
        built.append(g)
        return g

    # The diffusers backend builds its graphs in prepare() (trainer.engine.denoiser).
    monkeypatch.setattr(graphs_module, "step_graphs_for", factory)
    return built


def _final(config, step: int) -> dict[str, torch.Tensor]:
    folder = RunFolder.for_run(config.output_dir, config.run_name)
    return load_file(str(CheckpointStore(folder.path, config.run_name).path_for(step)))


def _losses(config) -> list[float]:
    return [r["loss"] for r in RunFolder.for_run(config.output_dir, config.run_name).read_metrics(0)]


@pytest.mark.parametrize("arch", [Arch.SD15, Arch.SDXL, Arch.SD3])
def test_a_run_through_graphs_equals_the_eager_run(tmp_path, monkeypatch, arch):
    # Two buckets and two micro-batches per step (the last step of an epoch has one): several
    # graph keys, replays of a key with new images, and gradients summed over micro-batches.
    data = make_images(tmp_path / "data", [(64, 64), (64, 64), (64, 64), (128, 64), (128, 64)])
    common = dict(
        batch_size=1,
        gradient_accumulation=2,
        epochs=4,
        resolution=128,
        max_bucket_resolution=256,
        min_snr_gamma=5.0 if arch != Arch.SD3 else 0.0,
        noise_offset=0.05 if arch != Arch.SD3 else 0.0,
    )
    _fused_adamw(monkeypatch)
    eager = tiny_config(tmp_path / "eager", data, **common)
    result = train(eager, model_loader=lambda c: tiny_bundle(arch, seed=0), device="cpu")
    assert result.state == RunState.FINISHED, result.message

    built = _emulated(monkeypatch)
    graphed = tiny_config(tmp_path / "graphs", data, **common)
    result = train(graphed, model_loader=lambda c: tiny_bundle(arch, seed=0), device="cpu")
    assert result.state == RunState.FINISHED, result.message

    stats = built[0].stats
    # Keys: (64x64 or 128x64) x (divisor 2 or 1); two warm-ups each before a capture.
    assert stats.captured >= 2 and stats.replayed >= 6, stats
    assert stats.disabled == "released"  # never turned off mid-run; freed when the run ended
    assert built[0].flat == [] and built[0].params == []
    assert _losses(graphed) == _losses(eager)
    steps = result.step
    a, b = _final(eager, steps), _final(graphed, steps)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_nan_loss_in_a_graph_step_never_reaches_the_weights(tmp_path, monkeypatch):
    _fused_adamw(monkeypatch)
    _emulated(monkeypatch)
    real = graphs_module.per_sample_loss
    calls = {"n": 0}

    def nan_at_step_3(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(graphs_module, "per_sample_loss", nan_at_step_3)
    bundles = []

    def load(config):
        bundles.append(tiny_bundle(Arch.SD15, seed=0))
        return bundles[-1]

    class Snapshot(Callbacks):
        weights: dict[str, torch.Tensor] = {}

        def on_progress(self, progress):
            if progress.step == 2:
                named = bundles[0].denoiser.named_parameters()
                Snapshot.weights = {n: p.detach().clone() for n, p in named if p.requires_grad}

    data = make_images(tmp_path / "data", [(64, 64), (64, 64)])
    config = tiny_config(tmp_path, data, max_steps=6, epochs=5, checkpoint_every=3)
    result = train(config, callbacks=Snapshot(), model_loader=load, device="cpu")
    assert result.state == RunState.FAILED
    assert result.message.startswith(
        "the loss became nan at step 3; the run was stopped before saving anything"
    )
    folder = RunFolder.for_run(config.output_dir, "tiny")
    assert CheckpointStore(folder.path, "tiny").list() == []
    assert [r["step"] for r in folder.read_metrics(0)] == [1, 2]
    now = {n: p.detach() for n, p in bundles[0].denoiser.named_parameters() if p.requires_grad}
    assert Snapshot.weights and now.keys() == Snapshot.weights.keys()
    for name, before in Snapshot.weights.items():
        assert torch.equal(now[name], before), name


def _tiny_setup(method: str = "lora"):
    config = TrainConfig.from_dict(
        {"mixed_precision": "fp32", "lora_rank": 4, "lora_alpha": 4.0, "seed": 1, "method": method}
    )
    rt = Runtime(precision="fp32", device="cpu")
    bundle = tiny_bundle(Arch.SD15, seed=0)
    trainables = prepare_trainables(bundle, config, rt)
    objective = Objective.for_run(
        model_prediction=bundle.prediction_type, noise_scheduler=bundle.noise_scheduler, config=config
    )
    return trainables, objective, bundle


def _tiny_graphs(*, warmup=1, max_graphs=4, autocast_dtype=None, method="lora"):
    trainables, objective, bundle = _tiny_setup(method)
    g = StepGraphs(
        bundle.denoiser,
        bundle.arch,
        trainables.denoiser,
        autocast_dtype=autocast_dtype,
        warmup=warmup,
        max_graphs=max_graphs,
        emulate=True,
    )
    return g, trainables, objective, bundle


def _batch(bundle, size: int, seed: int) -> DenoiserInputs:
    g = torch.Generator().manual_seed(seed)
    cross = bundle.denoiser.config.cross_attention_dim
    return DenoiserInputs(
        latents=torch.randn(1, 4, size, size, generator=g),
        prompt_embeds=torch.randn(1, 77, cross, generator=g),
        pooled=None,
        time_ids=None,
        captions=[""],
    )


def test_replays_read_the_new_inputs_and_gradients_accumulate_in_place():
    g, trainables, objective, bundle = _tiny_graphs(warmup=1)
    first_grad = trainables.denoiser[0].grad
    addresses = [p.grad.data_ptr() for p in trainables.denoiser]
    losses = []
    for seed in range(4):  # eager, capture + replay, replay, replay
        inputs = _batch(bundle, 8, seed)
        noised = objective.noised(inputs.latents, generator=torch.Generator().manual_seed(seed))
        losses.append(float(g.forward_backward(noised, inputs, divisor=1)))
        g.zero_grad()
    assert g.stats.captured == 1 and g.stats.replayed == 3 and g.stats.eager == 1
    assert len(set(losses)) == 4  # each replay saw its own batch, not the captured one

    # The same batch twice without zeroing: the flat buffer holds twice the single gradient.
    inputs = _batch(bundle, 8, 9)
    noised = objective.noised(inputs.latents, generator=torch.Generator().manual_seed(9))
    g.forward_backward(noised, inputs, divisor=1)
    once = [p.grad.clone() for p in trainables.denoiser]
    g.forward_backward(noised, inputs, divisor=1)
    for p, single in zip(trainables.denoiser, once, strict=True):
        torch.testing.assert_close(p.grad, 2 * single)
    assert trainables.denoiser[0].grad is first_grad
    assert [p.grad.data_ptr() for p in trainables.denoiser] == addresses

    # Something set the gradients to None (an optimizer's zero_grad): they come back as the views.
    for p in trainables.denoiser:
        p.grad = None
    g.zero_grad()
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0 for p in trainables.denoiser)
    assert [p.grad.data_ptr() for p in trainables.denoiser] == addresses


def test_shapes_over_the_limit_run_eagerly():
    g, _, objective, bundle = _tiny_graphs(warmup=0, max_graphs=1)
    for size in (8, 16, 8, 16):
        inputs = _batch(bundle, size, size)
        noised = objective.noised(inputs.latents, generator=torch.Generator().manual_seed(0))
        g.forward_backward(noised, inputs, divisor=1)
    assert g.stats.captured == 1 and g.stats.replayed == 2 and g.stats.eager == 2


def test_bf16_copies_of_the_lora_weights_give_autocasts_gradients_bit_for_bit():
    """Under bf16 autocast the graphs read one bf16 copy of the LoRA weights instead of casting
    each weight at each use: the gradients (accumulated over micro-batches, through the eager
    warm-up, the capture and a replay) are autocast's to the bit."""
    trainables, objective, bundle = _tiny_setup()
    model, params = bundle.denoiser, trainables.denoiser
    batches = []
    for seed in (0, 1):
        inputs = _batch(bundle, 8, seed)
        batches.append(
            (objective.noised(inputs.latents, generator=torch.Generator().manual_seed(seed)), inputs)
        )

    def autocast_gradients(micro_batches) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        for noised, inputs in micro_batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                loss = graphs_module.per_sample_loss(
                    graphs_module.denoise(model, Arch.SD15, noised, inputs), noised
                ).mean()
            (loss / len(micro_batches)).backward()
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return grads

    both = autocast_gradients(batches)
    before = {n: p for n, p in model.named_parameters()}

    g = StepGraphs(model, Arch.SD15, params, autocast_dtype=torch.bfloat16, warmup=1, emulate=True)
    seen = []  # what a LoRA layer's forward reads: the bf16 copy
    lora_a = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
    lora_a.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    for noised, inputs in batches:  # eager warm-up, then capture + first replay
        g.forward_backward(noised, inputs, divisor=2)
    assert g.stats.eager == 1 and g.stats.captured == 1
    assert seen == [torch.bfloat16, torch.bfloat16]
    for p, want in zip(params, both, strict=True):
        assert torch.equal(p.grad, want)
    g.zero_grad()
    for noised, inputs in reversed(batches):  # replays, each reading its own inputs
        g.forward_backward(noised, inputs, divisor=2)
    assert g.stats.replayed == 3
    for p, want in zip(params, both, strict=True):  # two fp32 terms: the order does not matter
        assert torch.equal(p.grad, want)
    # The modules hold the fp32 parameters again (what is saved and what the optimizer updates).
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert all(p.dtype == torch.float32 for p in params)


def test_no_bf16_copies_where_autocast_would_not_cast_every_trained_weight():
    # A full fine-tune trains norm weights, which autocast runs in fp32.
    g, *_ = _tiny_graphs(autocast_dtype=torch.bfloat16, method="full")
    assert g._copies is None
    g, *_ = _tiny_graphs(autocast_dtype=None)  # fp32 training: nothing to cast
    assert g._copies is None


def test_a_failed_capture_turns_graphs_off_and_the_step_goes_on(monkeypatch, caplog):
    g, trainables, objective, bundle = _tiny_graphs(warmup=0)

    def broken(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(g, "_capture", broken)
    inputs = _batch(bundle, 8, 0)
    noised = objective.noised(inputs.latents, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="finetune"):
        loss = g.forward_backward(noised, inputs, divisor=1)
    assert torch.isfinite(loss)
    assert any(float(p.grad.abs().sum()) > 0 for p in trainables.denoiser)
    assert "capture failed: RuntimeError" in g.stats.disabled
    assert "CUDA graphs are off" in caplog.text
    g.forward_backward(noised, inputs, divisor=1)
    assert g.stats.eager == 2 and g.stats.captured == 0


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        (dict(enabled=False), "off in the config"),
        (dict(device=CPU), "need a CUDA GPU"),
        (dict(precision=Precision.FP16), "use bf16"),
        (dict(trains_text=True), "text encoder"),
        (dict(lora_dropout=0.1), "dropout"),
        (dict(), ""),
    ],
)
def test_when_graphs_are_used(kwargs, reason):
    args = dict(enabled=True, device=CUDA, precision=Precision.BF16, trains_text=False, lora_dropout=0.0)
    args.update(kwargs)
    got = graphs_unavailable(**args)
    assert (reason in got) if reason else got == ""


def test_a_cpu_run_records_why_it_has_no_graphs(tmp_path):
    data = make_images(tmp_path / "data", [(64, 64)])
    config = tiny_config(tmp_path, data, max_steps=1)
    assert (
        train(config, model_loader=lambda c: tiny_bundle(Arch.SD15, seed=0), device="cpu").state
        == RunState.FINISHED
    )
    speed = json.loads(RunFolder.for_run(config.output_dir, "tiny").run_json.read_text())["speed"]
    assert speed["cuda_graphs"] is False
    assert "CUDA GPU" in speed["cuda_graphs_skipped"]


@pytest.mark.parametrize("dropout,preserve", [(0.0, False), (0.1, True)])
def test_gradient_checkpointing_saves_rng_state_only_for_lora_dropout(monkeypatch, dropout, preserve):
    seen = []
    original = torch.utils.checkpoint.checkpoint

    def spy(fn, *args, **kwargs):
        seen.append(kwargs.get("preserve_rng_state"))
        return original(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    config = TrainConfig.from_dict(
        {"mixed_precision": "fp32", "lora_rank": 4, "gradient_checkpointing": True, "lora_dropout": dropout}
    )
    bundle = tiny_bundle(Arch.SD15, seed=0)
    prepare_trainables(bundle, config, Runtime(precision="fp32", device="cpu"))
    inputs = _batch(bundle, 8, 0)
    out = bundle.denoiser(
        inputs.latents, torch.tensor([10]), encoder_hidden_states=inputs.prompt_embeds
    ).sample
    out.mean().backward()
    assert seen and set(seen) == {preserve}


def _reduce_on_rank(rank: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        layer = torch.nn.Linear(3, 2)
        g = StepGraphs(layer, Arch.SD15, list(layer.parameters()), autocast_dtype=None, emulate=True)
        for p in layer.parameters():
            p.grad.fill_(float(rank + 1))  # rank 0: ones, rank 1: twos
        g.all_reduce_mean(2)
        torch.save([p.grad.clone() for p in layer.parameters()], f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_gradients_are_averaged_over_processes_with_one_collective_per_buffer(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_reduce_on_rank, args=(f"file://{tmp_path}/pg", str(tmp_path)), nprocs=2)
    for rank in range(2):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        assert all(torch.equal(g, torch.full_like(g, 1.5)) for g in grads)


def test_flat_gradients_take_their_parameters_layout():
    # A channels-last UNet's conv weights: fused AdamW wants each gradient in its weight's layout.
    conv = torch.nn.Parameter(torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last))
    linear = torch.nn.Parameter(torch.randn(5, 2))
    buffers, views, _ = graphs_module._flat_gradients([conv, linear])
    assert [v.stride() for v in views] == [conv.stride(), linear.stride()]
    assert all(v.untyped_storage().data_ptr() == buffers[0].untyped_storage().data_ptr() for v in views)
    views[0].copy_(torch.ones_like(conv))
    assert float(buffers[0][: conv.numel()].sum()) == conv.numel()  # each view owns its own slice
    assert float(buffers[0][conv.numel() :].abs().sum()) == 0.0
