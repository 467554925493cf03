"""The shipped real-size configs (checked by parameter count on the meta device) and the tiny tokenizers."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from trainer.config import Arch
from trainer.models.configs import scheduler_for, shipped_config_dir
from trainer.models.tiny import TINY_TOKENIZER_DIR, tiny_clip_vocab, tiny_tokenizers


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _diffusers_meta(cls, arch, sub):
    with torch.device("meta"):
        return cls.from_config(cls.load_config(str(shipped_config_dir(arch) / sub)))


@pytest.mark.parametrize(
    ("arch", "cls", "sub", "count"),
    [
        (Arch.SD15, UNet2DConditionModel, "unet", 859_520_964),
        (Arch.SDXL, UNet2DConditionModel, "unet", 2_567_463_684),
        (Arch.SD3, SD3Transformer2DModel, "transformer", 2_028_328_000),
        (Arch.SD15, AutoencoderKL, "vae", 83_653_863),
        (Arch.SDXL, AutoencoderKL, "vae", 83_653_863),
        (Arch.SD3, AutoencoderKL, "vae", 83_819_683),
    ],
)
def test_real_denoiser_and_vae_sizes(arch, cls, sub, count):
    assert _n_params(_diffusers_meta(cls, arch, sub)) == count


@pytest.mark.parametrize(
    ("arch", "sub", "cls", "count"),
    [
        (Arch.SD15, "text_encoder", CLIPTextModel, 123_060_480),
        (Arch.SDXL, "text_encoder", CLIPTextModel, 123_060_480),
        (Arch.SDXL, "text_encoder_2", CLIPTextModelWithProjection, 694_659_840),
        (Arch.SD3, "text_encoder", CLIPTextModelWithProjection, 123_650_304),
        (Arch.SD3, "text_encoder_2", CLIPTextModelWithProjection, 694_659_840),
    ],
)
def test_real_clip_sizes(arch, sub, cls, count):
    config = CLIPTextConfig.from_pretrained(str(shipped_config_dir(arch) / sub), local_files_only=True)
    with torch.device("meta"):
        assert _n_params(cls(config)) == count


def test_real_t5_size():
    config = T5Config.from_pretrained(
        str(shipped_config_dir(Arch.SD3) / "text_encoder_3"), local_files_only=True
    )
    with torch.device("meta"):
        assert _n_params(T5EncoderModel(config)) == 4_762_310_656


def test_scheduler_configs():
    sd15 = scheduler_for(Arch.SD15, prediction_type="epsilon")
    assert type(sd15).__name__ == "DDPMScheduler"
    assert (sd15.config.beta_start, sd15.config.beta_end, sd15.config.beta_schedule) == (
        0.00085,
        0.012,
        "scaled_linear",
    )
    assert sd15.config.num_train_timesteps == 1000
    assert scheduler_for(Arch.SDXL, prediction_type="v_prediction").config.prediction_type == "v_prediction"
    sd3 = scheduler_for(Arch.SD3, prediction_type="flow")
    assert (type(sd3).__name__, sd3.config.shift) == ("FlowMatchEulerDiscreteScheduler", 3.0)
    with pytest.raises(ValueError, match="UNet models predict 'epsilon' or 'v_prediction', got 'flow'"):
        scheduler_for(Arch.SD15, prediction_type="flow")


def test_model_index_names_the_pipelines():
    names = {
        a: json.loads((shipped_config_dir(a) / "model_index.json").read_text())["_class_name"]
        for a in (Arch.SD15, Arch.SDXL, Arch.SD3)
    }
    assert names == {
        Arch.SD15: "StableDiffusionPipeline",
        Arch.SDXL: "StableDiffusionXLPipeline",
        Arch.SD3: "StableDiffusion3Pipeline",
    }


def test_shipped_tiny_tokenizer_files_match_generator():
    vocab, merges = tiny_clip_vocab()
    assert json.loads((TINY_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8")) == vocab
    lines = (TINY_TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert [tuple(line.split(" ")) for line in lines[1:]] == merges


def test_tiny_tokenizers_tokenize_exactly():
    clip_l, clip_g, t5 = tiny_tokenizers(Arch.SD3)
    assert clip_l("a photo of a cat!").input_ids == [588, 320, 526, 515, 320, 552, 256, 589]
    assert clip_g("a Cat", padding="max_length", max_length=6).input_ids == [588, 320, 552, 589, 0, 0]
    assert clip_l("a Cat", padding="max_length", max_length=6).input_ids == [588, 320, 552, 589, 589, 589]
    assert t5("a red cat, sks").input_ids == [74, 91, 87, 66, 95, 1]
    assert (len(clip_l), len(t5), clip_l.model_max_length) == (590, 100, 77)
