"""memory_mode: the estimate against the measured figures, the chooser's choices on faked cards,
explicit settings winning, and the refusal of a card too small."""

from __future__ import annotations

import dataclasses

import pytest

from trainer.config import Arch, LoraTargets, MemoryMode, Method, OptimizerName, Precision, TrainConfig
from trainer.engine.memory import (
    FAMILIES,
    CardTooSmall,
    GiB,
    MemoryPlan,
    MemorySettings,
    choose,
    estimate,
    settings_for,
    user_set,
)

# bench/NOTES.md, H100, peak allocated of a step with cached inputs (fifth session's table).
MEASURED = [
    (MemorySettings(Arch.SDXL, Method.LORA, 1024, 4), 26.6),
    (MemorySettings(Arch.SDXL, Method.LORA, 1024, 4, gradient_checkpointing=True), 7.86),
    (MemorySettings(Arch.SD15, Method.LORA, 512, 16), 13.4),
    (MemorySettings(Arch.SD3, Method.LORA, 1024, 4), 18.7),
    (MemorySettings(Arch.SD15, Method.FULL, 512, 4), 17.6),
    (MemorySettings(Arch.SDXL, Method.FULL, 1024, 1), 48.5),
]


@pytest.mark.parametrize("settings,gib", MEASURED, ids=[s.describe() for s, _ in MEASURED])
def test_the_estimate_reproduces_the_measured_peaks_within_2_percent(settings, gib):
    assert abs(estimate(settings)["step"] / GiB - gib) / gib < 0.02


def test_the_estimate_with_encoders_on_the_gpu_is_near_the_end_to_end_figure():
    # The SDXL LoRA end to end, text encoders and VAE left on the GPU: 13.1 GiB at b1.
    s = MemorySettings(Arch.SDXL, Method.LORA, 1024, 1, frozen_on_gpu=True)
    parts = estimate(s)
    assert abs(parts["total"] / GiB - 13.1) / 13.1 < 0.05
    assert round(parts["frozen"] / GiB, 2) == 1.68  # CLIP-L + CLIP-G + VAE in bf16
    assert estimate(dataclasses.replace(s, frozen_on_gpu=False))["frozen"] == 0


def test_estimate_parts_follow_each_saver():
    base = MemorySettings(Arch.SDXL, Method.LORA, 1024, 2)
    e = estimate(base)
    assert estimate(dataclasses.replace(base, fp8_base=True))["weights"] * 2 == e["weights"]
    assert estimate(dataclasses.replace(base, batch_size=1))["activations"] * 2 == pytest.approx(
        e["activations"], abs=2
    )
    # 8-bit state: 2 bytes a trained parameter instead of 8.
    lora = 16 * FAMILIES[Arch.SDXL].lora_fan[LoraTargets.ATTENTION]
    eight = estimate(dataclasses.replace(base, optimizer=OptimizerName.ADAMW_8BIT))
    assert e["trained"] - eight["trained"] == 6 * lora
    full = MemorySettings(Arch.SD15, Method.FULL, 512, 1)
    n = FAMILIES[Arch.SD15].denoiser_params
    assert estimate(full)["trained"] == 18 * n
    assert estimate(dataclasses.replace(full, bf16_weights=True))["trained"] == 8 * n
    assert (
        estimate(dataclasses.replace(full, bf16_weights=True, optimizer=OptimizerName.ADAMW_8BIT))["trained"]
        == 6 * n
    )
    # A full fine-tune that trains SD1.5's CLIP too pays for its parameters the same way.
    te = FAMILIES[Arch.SD15].text_encoder_params
    assert estimate(dataclasses.replace(full, train_text_encoder=True))["trained"] == 18 * (n + te)
    # Twice the pixels, twice the activations.
    at_768 = estimate(MemorySettings(Arch.SD15, Method.LORA, 724, 1))["activations"]
    at_512 = estimate(MemorySettings(Arch.SD15, Method.LORA, 512, 1))["activations"]
    assert at_768 / at_512 == pytest.approx((724 / 512) ** 2, rel=1e-6)


def test_family_figures_match_the_shipped_configs():
    """The parameter counts in memory.FAMILIES are those of the real architectures."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from trainer.lora.targets import target_modules
    from trainer.models.configs import __file__ as configs_init

    root = configs_init.rsplit("/", 1)[0]
    for arch, cls, sub in [
        (Arch.SD15, UNet2DConditionModel, "sd15/unet"),
        (Arch.SDXL, UNet2DConditionModel, "sdxl/unet"),
        (Arch.SD3, SD3Transformer2DModel, "sd3/transformer"),
    ]:
        with init_empty_weights():
            model = cls.from_config(cls.load_config(f"{root}/{sub}"))
        fam = FAMILIES[arch]
        assert sum(p.numel() for p in model.parameters()) == fam.denoiser_params
        modules = dict(model.named_modules())
        for preset in LoraTargets:
            fan = 0
            for name in target_modules(arch, preset, model, part="denoiser"):
                m = modules[name]
                if isinstance(m, torch.nn.Linear):
                    fan += m.in_features + m.out_features
                else:
                    fan += m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels
            assert fan == fam.lora_fan[preset], (arch, preset)


# --------------------------------------------------------------------------------------------
# The chooser on faked cards: free memory = the card less 0.5 GiB (driver and ComfyUI's context).

CASES = {
    "SD1.5 LoRA 512 b4": MemorySettings(Arch.SD15, Method.LORA, 512, 4),
    "SDXL LoRA 1024 b4": MemorySettings(Arch.SDXL, Method.LORA, 1024, 4),
    "SD3 Medium LoRA 1024 b4": MemorySettings(Arch.SD3, Method.LORA, 1024, 4),
    "SD1.5 full 512 b4": MemorySettings(Arch.SD15, Method.FULL, 512, 4),
    "SDXL full 1024 b1": MemorySettings(Arch.SDXL, Method.FULL, 1024, 1),
}
CARDS = (8, 12, 16, 24, 80)
GC, B8, FP8, BF16 = "gradient checkpointing", "8-bit optimizer state", "fp8 base weights", "bf16 weights"
NO = "refused"

# Without bitsandbytes (the 8-bit step is skipped) and with it.
EXPECTED = {
    False: {
        "SD1.5 LoRA 512 b4": [[], [], [], [], []],
        "SDXL LoRA 1024 b4": [[GC, FP8], [GC], [GC], [GC], []],
        "SD3 Medium LoRA 1024 b4": [NO, NO, [GC], [], []],
        "SD1.5 full 512 b4": [NO, [GC, BF16], [GC, BF16], [], []],
        "SDXL full 1024 b1": [NO, NO, NO, [GC, BF16], []],
    },
    True: {
        "SD1.5 LoRA 512 b4": [[], [], [], [], []],
        "SDXL LoRA 1024 b4": [[GC, B8, FP8], [GC], [GC], [GC], []],
        "SD3 Medium LoRA 1024 b4": [NO, NO, [GC], [], []],
        "SD1.5 full 512 b4": [[GC, B8, BF16], [GC, B8, BF16], [GC, B8], [], []],
        "SDXL full 1024 b1": [NO, NO, NO, [GC, B8, BF16], []],
    },
}


def free_of(card_gib: int) -> int:
    return int((card_gib - 0.5) * GiB)


@pytest.mark.parametrize("bitsandbytes", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_auto_chooses_exactly_these_savers_on_each_card(case, bitsandbytes):
    got = []
    for card in CARDS:
        try:
            plan = choose(CASES[case], free=free_of(card), bitsandbytes=bitsandbytes)
        except CardTooSmall:
            got.append(NO)
            continue
        assert plan.fits, plan.message
        assert plan.settings.batch_size * plan.settings.gradient_accumulation == CASES[case].batch_size
        got.append(plan.chosen)
    assert got == EXPECTED[bitsandbytes][case]


def test_the_message_says_what_was_chosen_and_why():
    plan = choose(CASES["SDXL LoRA 1024 b4"], free=free_of(12))
    assert plan.message == (
        "memory auto: 11.5 GiB free; SDXL LoRA 1024 b4 needs ~26.6 GiB → gradient checkpointing (~7.9 GiB)"
    )
    assert plan.to_dict() == {
        "mode": "auto",
        "free_bytes": free_of(12),
        "estimate_bytes": plan.before,
        "chosen_estimate_bytes": plan.after,
        "chosen": ["gradient checkpointing"],
        "kept": [],
        "fits": True,
        "settings": {
            "gradient_checkpointing": True,
            "optimizer": "adamw",
            "fp8_base": False,
            "bf16_weights": False,
            "batch_size": 4,
            "gradient_accumulation": 1,
        },
        "message": plan.message,
    }
    roomy = choose(CASES["SDXL LoRA 1024 b4"], free=free_of(80))
    assert (
        roomy.message == "memory auto: 79.5 GiB free; SDXL LoRA 1024 b4 needs ~26.6 GiB, fits as configured"
    )
    assert choose(CASES["SD1.5 LoRA 512 b4"], free=None).message == (
        "memory auto: no GPU, nothing to fit (SD1.5 LoRA 512 b4)"
    )


def test_a_smaller_batch_with_accumulation_keeps_the_effective_batch():
    # SDXL LoRA b8 with checkpointing already on, on an 8 GiB card: fp8 is not enough, b4 × 2 fits.
    s = MemorySettings(Arch.SDXL, Method.LORA, 1024, 8, gradient_checkpointing=True)
    plan = choose(s, free=free_of(8))
    assert plan.chosen == ["fp8 base weights", "batch 4 × accumulation 2"]
    assert (plan.settings.batch_size, plan.settings.gradient_accumulation) == (4, 2)
    assert plan.message.endswith("→ fp8 base weights, batch 4 × accumulation 2 (~5.5 GiB)")
    # An accumulation the user set multiplies: b8 × 3 becomes b4 × 6.
    acc = choose(dataclasses.replace(s, gradient_accumulation=3), free=free_of(8))
    assert (acc.settings.batch_size, acc.settings.gradient_accumulation) == (4, 6)


def test_explicit_settings_win_and_are_named():
    s = MemorySettings(Arch.SDXL, Method.LORA, 1024, 8, gradient_accumulation=2)
    plan = choose(s, free=free_of(8), explicit={"gradient_checkpointing", "gradient_accumulation"})
    assert plan.chosen == ["fp8 base weights"]
    assert plan.kept == ["gradient_checkpointing=off", "gradient_accumulation=2"]
    assert not plan.fits
    assert plan.settings.gradient_checkpointing is False and plan.settings.batch_size == 8
    assert plan.message.endswith(
        "; kept as set: gradient_checkpointing=off, gradient_accumulation=2 — it may run out of memory"
    )
    # A chosen optimizer is never swapped for the 8-bit one.
    full = CASES["SD1.5 full 512 b4"]
    plan = choose(full, free=free_of(12), bitsandbytes=True, explicit={"optimizer"})
    assert plan.chosen == [GC, BF16] and plan.kept == ["optimizer"]
    assert plan.settings.optimizer == OptimizerName.ADAMW


def test_user_set_means_changed_from_the_default():
    assert user_set(TrainConfig()) == set()
    cfg = TrainConfig(gradient_checkpointing=True, optimizer=OptimizerName.ADAFACTOR, gradient_accumulation=2)
    assert user_set(cfg) == {"gradient_checkpointing", "optimizer", "gradient_accumulation"}


def test_lowest_turns_everything_on_and_off_changes_nothing():
    s = CASES["SDXL LoRA 1024 b4"]
    low = choose(s, free=free_of(80), mode=MemoryMode.LOWEST, bitsandbytes=True)
    assert low.chosen == [GC, B8, FP8, "batch 1 × accumulation 4"]
    off = choose(s, free=free_of(12), mode=MemoryMode.OFF)
    assert off.chosen == [] and off.settings == s and not off.fits
    assert off.message == (
        "memory off: 11.5 GiB free; SDXL LoRA 1024 b4 needs ~26.6 GiB, as configured (it may run out of memory)"
    )


def test_sd3_with_t5_needs_16_gib_for_its_caching_and_without_t5_fits_8():
    sd3 = CASES["SD3 Medium LoRA 1024 b4"]
    plan = choose(sd3, free=free_of(16))
    assert plan.message == (
        "memory auto: 15.5 GiB free; SD3 Medium LoRA 1024 b4 needs ~18.7 GiB → gradient checkpointing "
        "(~5.9 GiB a step, ~12.1 GiB while caching)"
    )
    with pytest.raises(CardTooSmall, match=r"only 11\.5 GiB is free on this GPU; turn use_t5 off \(T5-XXL"):
        choose(sd3, free=free_of(12))
    no_t5 = choose(dataclasses.replace(sd3, use_t5=False), free=free_of(8))
    assert no_t5.chosen == [GC] and no_t5.fits


def test_fp16_full_fine_tunes_never_get_half_precision_weights():
    fp16 = dataclasses.replace(CASES["SD1.5 full 512 b4"], precision=Precision.FP16)
    plan = choose(fp16, free=free_of(16), mode=MemoryMode.LOWEST)
    assert plan.chosen == [GC, "batch 1 × accumulation 4"]
    assert not plan.settings.bf16_weights


def test_a_card_too_small_is_refused_with_one_sentence():
    with pytest.raises(CardTooSmall) as err:
        choose(CASES["SDXL full 1024 b1"], free=free_of(12))
    assert str(err.value) == (
        "memory_mode: SDXL full 1024 b1 needs at least ~23.2 GiB of GPU memory even with every memory "
        "saver on, but only 11.5 GiB is free on this GPU; use a smaller resolution or model, LoRA "
        "instead of a full fine-tune, or close what else uses the GPU"
    )
    assert err.value.field == "memory_mode"


def test_settings_from_a_config_and_a_recorded_plan_round_trip():
    cfg = TrainConfig(batch_size=4, lora_rank=32, mixed_precision=Precision.BF16)
    s = settings_for(cfg, Arch.SDXL)
    assert (s.resolution, s.batch_size, s.lora_rank, s.method) == (1024, 4, 32, Method.LORA)
    plan = choose(dataclasses.replace(s, batch_size=8, gradient_checkpointing=True), free=free_of(8))
    back = MemoryPlan.from_dict(plan.to_dict(), s)
    assert back.settings.batch_size == 4 and back.settings.gradient_accumulation == 2
    assert back.settings.fp8_base and back.chosen == plan.chosen
    applied = back.apply(cfg)
    assert (applied.batch_size, applied.gradient_accumulation, applied.gradient_checkpointing) == (4, 2, True)
    assert cfg.batch_size == 4 and cfg.gradient_checkpointing is False  # the user's config untouched
