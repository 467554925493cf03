"""fp8 storage of frozen base weights: outputs match bf16 to fp8's resolution, LoRA still trains."""

from __future__ import annotations

import torch
from torch import nn

from trainer.engine.fp8 import FP8, Fp8Conv2d, Fp8Linear, quantize, store_fp8, stored_bytes
from trainer.lora.inject import add_lora

# e4m3 keeps 3 mantissa bits: a rounded weight is within 2^-4 of itself (RMS about 2 %); three
# stacked layers compound that to about 4 % of the output's norm, inside one weight's bound.
FP8_RTOL = 2.0**-4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 256, 3, padding=1),  # 18,432 weights: stays as it is
        nn.Conv2d(256, 256, 3, padding=1),
        nn.Flatten(1),
        nn.Linear(256 * 4 * 4, 512),
        nn.Linear(512, 512),
    ).requires_grad_(False)


def test_quantize_round_trips_within_fp8_resolution_and_keeps_the_largest_weight():
    w = torch.randn(512, 512) * 0.02
    data, scale = quantize(w)
    assert data.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == ()
    back = data.float() * scale
    assert float(back.abs().max()) == float(w.abs().max())  # amax maps to 448 exactly
    big = w.abs() > 1e-3  # below e4m3's normal range relative to amax the error is absolute
    assert float(((back - w).abs()[big] / w.abs()[big]).max()) <= 2.0**-4


def test_frozen_layers_store_fp8_and_outputs_match_to_fp8_tolerance():
    model = _model()
    x = torch.randn(2, 8, 4, 4)
    ref = model(x)
    before = stored_bytes(model)
    assert store_fp8(model, compute_dtype=torch.float32) == 3
    kinds = [type(m) for m in model]
    assert kinds == [nn.Conv2d, Fp8Conv2d, nn.Flatten, Fp8Linear, Fp8Linear]
    assert model[1].weight_fp8.dtype == FP8 and model[1].weight.dtype == torch.float32
    assert "weight" not in dict(model[1].named_parameters())
    # fp8 weights: one byte each instead of four (biases and the small conv unchanged).
    big = sum(model[i].weight_fp8.numel() for i in (1, 3, 4))
    assert stored_bytes(model) == before - 3 * big + 3 * 4
    out = model(x)
    rel = float((out - ref).norm() / ref.norm())
    assert rel < FP8_RTOL, rel


def test_bf16_compute_dtype_is_what_the_layers_hand_out():
    model = _model()
    store_fp8(model, compute_dtype=torch.bfloat16)
    assert model[3].weight.dtype == torch.bfloat16
    x = torch.randn(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16


def test_lora_layers_keep_working_on_fp8_base_layers():
    model = _model()
    x = torch.randn(2, 8, 4, 4)
    params = add_lora(model, ["3", "4"], rank=4, alpha=4.0, seed=1)
    with torch.no_grad():
        for p in params:  # non-zero B so the LoRA path contributes
            p.add_(0.01)
    ref = model(x)
    assert store_fp8(model, compute_dtype=torch.float32) == 3
    assert type(model[3].base_layer) is Fp8Linear
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    out = model(x)
    assert float((out - ref).detach().norm() / ref.detach().norm()) < FP8_RTOL
    out.square().mean().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params)
    assert model[3].base_layer.weight_fp8.grad is None
