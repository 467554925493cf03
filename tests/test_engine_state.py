"""Resume state: safetensors + JSON, atomic, and a faithful round trip of optimizer and RNG state."""

from __future__ import annotations

import json
import random

import pytest
import torch

from trainer.engine.optim import OptimizerSettings, build_optimizer, build_schedule, param_groups
from trainer.engine.state import (
    Position,
    StateError,
    latest_state,
    list_states,
    load_state,
    read_position,
    save_state,
)


def setup(name: str = "adamw", seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    named = {f"denoiser.{n}": p for n, p in model.named_parameters()}
    opt = build_optimizer(
        name, param_groups(denoiser_params=model.parameters(), lr=1e-2), OptimizerSettings(lr=1e-2)
    )
    sched = build_schedule("cosine", opt, warmup_steps=2, total_steps=10)
    return model, named, opt, sched


def steps(model, opt, sched, n: int, gen: torch.Generator) -> None:
    for _ in range(n):
        loss = model(torch.randn(2, 4, generator=gen)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_round_trip_continues_identically(tmp_path, name):
    model, named, opt, sched = setup(name)
    gen = torch.Generator().manual_seed(1)
    steps(model, opt, sched, 3, gen)
    random.seed(9)
    path = save_state(
        tmp_path / "state",
        position=Position(3, 1, 3),
        params=named,
        optimizer=opt,
        scheduler=sched,
        noise_generator=gen,
    )
    assert path.name == "step-00003"
    assert sorted(p.name for p in path.iterdir()) == [
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
        "trainable.safetensors",
    ]
    expected_random = random.random()
    steps(model, opt, sched, 2, gen)
    expected = {k: v.detach().clone() for k, v in named.items()}

    model2, named2, opt2, sched2 = setup(
        name, seed=123
    )  # different init: everything must come from the state
    gen2 = torch.Generator().manual_seed(999)
    pos = load_state(path, params=named2, optimizer=opt2, scheduler=sched2, noise_generator=gen2)
    assert (pos.step, pos.epoch, pos.step_in_epoch) == (3, 1, 3)
    assert random.random() == expected_random
    assert sched2.last_epoch == 3
    steps(model2, opt2, sched2, 2, gen2)
    for k in expected:
        assert torch.equal(named2[k], expected[k]), k


def test_save_replaces_older_states_and_leaves_no_temp(tmp_path):
    model, named, opt, sched = setup()
    gen = torch.Generator().manual_seed(0)
    root = tmp_path / "state"
    save_state(
        root, position=Position(2, 1, 2), params=named, optimizer=opt, scheduler=sched, noise_generator=gen
    )
    save_state(
        root, position=Position(4, 2, 0), params=named, optimizer=opt, scheduler=sched, noise_generator=gen
    )
    assert [s for s, _ in list_states(root)] == [4]
    assert sorted(p.name for p in root.iterdir()) == ["step-00004"]
    assert latest_state(root).name == "step-00004"
    assert read_position(latest_state(root)).epoch == 2
    meta = json.loads((root / "step-00004" / "state.json").read_text())
    assert meta["param_names"] == ["denoiser.bias", "denoiser.weight"]


def test_a_failed_write_keeps_the_previous_state(tmp_path, monkeypatch):
    from trainer.engine import state as state_module

    model, named, opt, sched = setup()
    gen = torch.Generator().manual_seed(0)
    root = tmp_path / "state"
    save_state(
        root, position=Position(2, 1, 2), params=named, optimizer=opt, scheduler=sched, noise_generator=gen
    )

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_module, "save_file", full)
    with pytest.raises(OSError):
        save_state(
            root,
            position=Position(4, 1, 4),
            params=named,
            optimizer=opt,
            scheduler=sched,
            noise_generator=gen,
        )
    assert sorted(p.name for p in root.iterdir()) == ["step-00002"]


def test_a_state_of_another_shape_is_refused(tmp_path):
    model, named, opt, sched = setup()
    gen = torch.Generator().manual_seed(0)
    path = save_state(
        tmp_path / "s",
        position=Position(1, 1, 1),
        params=named,
        optimizer=opt,
        scheduler=sched,
        noise_generator=gen,
    )
    other = torch.nn.Linear(4, 5)
    with pytest.raises(StateError, match="has shape"):
        load_state(
            path,
            params={f"denoiser.{n}": p for n, p in other.named_parameters()},
            optimizer=opt,
            scheduler=sched,
            noise_generator=gen,
        )
    with pytest.raises(StateError, match="does not fit this run: 0 trainable weights missing"):
        load_state(
            path,
            params={"denoiser.weight": named["denoiser.weight"]},
            optimizer=opt,
            scheduler=sched,
            noise_generator=gen,
        )
