"""Optimisers and schedules by name: the registry, parameter groups and warm-up."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from trainer.engine.optim import OptimizerSettings, build_optimizer, build_schedule, param_groups


def params(n: int = 2) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(3)) for _ in range(n)]


def test_param_groups_split_denoiser_and_text_encoder_rates():
    frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    groups = param_groups(denoiser_params=params() + [frozen], text_params=params(1), lr=1e-4, text_lr=0.0)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [
        ("denoiser", 1e-4, 2),
        ("text_encoder", 1e-4, 1),
    ]
    groups = param_groups(denoiser_params=params(), text_params=params(1), lr=1e-4, text_lr=5e-6)
    assert groups[1]["lr"] == 5e-6
    with pytest.raises(ValueError, match="nothing to train"):
        param_groups(denoiser_params=[frozen], lr=1e-4)


def test_registry_builds_each_optimizer_and_refuses_unknown_names():
    groups = param_groups(denoiser_params=params(), lr=1e-3)
    adamw = build_optimizer("adamw", groups, OptimizerSettings(lr=1e-3, weight_decay=0.1, betas=(0.8, 0.9)))
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["betas"] == (0.8, 0.9) and adamw.param_groups[0]["weight_decay"] == 0.1
    ada = build_optimizer(
        "adafactor", param_groups(denoiser_params=params(), lr=1e-3), OptimizerSettings(lr=1e-3)
    )
    assert type(ada).__name__ == "Adafactor" and ada.defaults["relative_step"] is False
    with pytest.raises(
        ValueError, match=r"optimizer 'sgd' is unknown; use one of \['adamw', 'adamw8bit', 'adafactor'\]"
    ):
        build_optimizer("sgd", groups, OptimizerSettings(lr=1e-3))


def test_adamw8bit_without_bitsandbytes_says_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        build_optimizer(
            "adamw8bit", param_groups(denoiser_params=params(), lr=1e-3), OptimizerSettings(lr=1e-3)
        )


def lrs(name: str, *, warmup: int, total: int, **kw) -> list[float]:
    opt = torch.optim.SGD(params(1), lr=1.0)
    sched = build_schedule(name, opt, warmup_steps=warmup, total_steps=total, **kw)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedules_warm_up_then_follow_their_shape():
    assert lrs("constant_with_warmup", warmup=2, total=5) == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])
    assert lrs("constant", warmup=2, total=3) == pytest.approx([1.0, 1.0, 1.0])
    assert lrs("linear", warmup=0, total=4) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    cosine = lrs("cosine", warmup=1, total=5)
    assert cosine[0] == 0.0 and cosine[1] == pytest.approx(1.0) and cosine[3] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_scheduler 'step' is unknown"):
        lrs("step", warmup=0, total=2)
