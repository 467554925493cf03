"""encode_prompts matches the diffusers pipelines' own encode_prompt, per architecture."""

import pytest
import torch

from trainer.config import Arch
from trainer.models.pipelines import make_pipeline
from trainer.models.text import TextEmbeds, encode_prompts, sdxl_time_ids
from trainer.models.tiny import CLIP_G, CLIP_L, T5, tiny_bundle

PROMPTS = ["a photo of a cat, red hat", ""]


@pytest.fixture(scope="module")
def bundles():
    return {a: tiny_bundle(a, seed=1) for a in (Arch.SD15, Arch.SDXL, Arch.SD3)}


def test_sd15_last_hidden_state_matches_pipeline(bundles):
    b = bundles[Arch.SD15]
    e = encode_prompts(b, PROMPTS, device="cpu")
    assert tuple(e.prompt_embeds.shape) == (2, 77, CLIP_L["hidden_size"])
    assert e.pooled_embeds is None
    ref, _ = make_pipeline(b).encode_prompt(PROMPTS, "cpu", 1, False)
    assert torch.equal(e.prompt_embeds, ref)


def test_sdxl_penultimate_concat_and_pooled_match_pipeline(bundles):
    b = bundles[Arch.SDXL]
    e = encode_prompts(b, PROMPTS, device="cpu")
    assert tuple(e.prompt_embeds.shape) == (2, 77, CLIP_L["hidden_size"] + CLIP_G["hidden_size"])
    assert tuple(e.pooled_embeds.shape) == (2, CLIP_G["projection_dim"])
    ref, _, ref_pooled, _ = make_pipeline(b).encode_prompt(
        PROMPTS, device="cpu", do_classifier_free_guidance=False
    )
    assert torch.equal(e.prompt_embeds, ref)
    assert torch.equal(e.pooled_embeds, ref_pooled)


@pytest.mark.parametrize("t5_len", [77, 20])
def test_sd3_matches_pipeline(bundles, t5_len):
    b = bundles[Arch.SD3]
    e = encode_prompts(b, PROMPTS, device="cpu", t5_max_length=t5_len)
    assert tuple(e.prompt_embeds.shape) == (2, 77 + t5_len, T5["d_model"])
    assert tuple(e.pooled_embeds.shape) == (2, CLIP_L["projection_dim"] + CLIP_G["projection_dim"])
    ref, _, ref_pooled, _ = make_pipeline(b).encode_prompt(
        PROMPTS, PROMPTS, PROMPTS, device="cpu", do_classifier_free_guidance=False, max_sequence_length=t5_len
    )
    assert torch.equal(e.prompt_embeds, ref)
    assert torch.equal(e.pooled_embeds, ref_pooled)
    clip_width = CLIP_L["hidden_size"] + CLIP_G["hidden_size"]
    assert (
        torch.count_nonzero(e.prompt_embeds[:, :77, clip_width:]) == 0
    )  # CLIP part zero-padded to the T5 width
    assert torch.count_nonzero(e.prompt_embeds[:, 77:]) > 0


def test_sd3_without_t5_gives_zeros_in_t5_part(bundles):
    full = bundles[Arch.SD3]
    b = tiny_bundle(Arch.SD3, seed=1, with_t5=False)
    e = encode_prompts(b, PROMPTS, device="cpu")
    assert tuple(e.prompt_embeds.shape) == (2, 154, T5["d_model"])
    assert torch.count_nonzero(e.prompt_embeds[:, 77:]) == 0
    with_t5 = encode_prompts(full, PROMPTS, device="cpu")
    assert torch.equal(
        e.prompt_embeds[:, :77], with_t5.prompt_embeds[:, :77]
    )  # same CLIP weights (same seed)
    ref, _, _, _ = make_pipeline(b).encode_prompt(
        PROMPTS, PROMPTS, PROMPTS, device="cpu", do_classifier_free_guidance=False, max_sequence_length=77
    )
    assert torch.equal(e.prompt_embeds, ref)


def test_gradients_reach_trained_text_encoder(bundles):
    b = bundles[Arch.SDXL]
    te = b.text_encoders[1]
    te.requires_grad_(True)
    try:
        e = encode_prompts(b, ["a cat"], device="cpu")
        (e.prompt_embeds.sum() + e.pooled_embeds.sum()).backward()
        grad = te.text_model.encoder.layers[0].mlp.fc1.weight.grad
        assert grad is not None and torch.count_nonzero(grad) > 0
    finally:
        te.requires_grad_(False)
        te.zero_grad(set_to_none=True)


def test_prompts_must_be_a_list(bundles):
    with pytest.raises(TypeError, match="prompts must be a list of strings"):
        encode_prompts(bundles[Arch.SD15], "a cat", device="cpu")


def test_text_embeds_to():
    e = TextEmbeds(torch.ones(1, 2, 3), torch.ones(1, 3)).to(dtype=torch.float16)
    assert (e.prompt_embeds.dtype, e.pooled_embeds.dtype) == (torch.float16, torch.float16)


def test_sdxl_time_ids():
    ids = sdxl_time_ids((1024, 768), (16, 0), (512, 512))
    assert ids.dtype == torch.float32
    assert ids.tolist() == [1024.0, 768.0, 16.0, 0.0, 512.0, 512.0]
