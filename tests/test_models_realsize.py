"""Real-size single files (random weights, shipped configs) load back exactly. Opt-in: needs ~50 GB RAM.

Run with FINETUNE_REALSIZE=1 (on a big machine); the default suite covers the same code with tiny models.
"""

import gc
import os

import pytest
import torch

from trainer.config import Arch
from trainer.models.bundle import ModelBundle
from trainer.models.configs import scheduler_for, shipped_config_dir
from trainer.models.convert import bundle_to_original
from trainer.models.files import save_safetensors_atomic
from trainer.models.load import load_base_model
from trainer.models.tiny import TINY_TOKENIZER_DIR, tiny_tokenizers

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("FINETUNE_REALSIZE"),
        reason="real-size models need ~50 GB RAM; set FINETUNE_REALSIZE=1",
    ),
]


def _filled(module, gen, dtype):
    """Materialise a meta-device module in ``dtype`` with random values (cheaper than a real init)."""
    module.to(dtype).to_empty(device="cpu")
    if hasattr(module, "tie_weights"):  # to_empty unties T5's shared / encoder.embed_tokens
        module.tie_weights()
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            t.data.uniform_(-1, 1, generator=gen)
    for name, buf in module.named_buffers():
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    return module.eval()


def _random_real_bundle(arch, dtype):
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    cfg = shipped_config_dir(arch)
    gen = torch.Generator().manual_seed(0)

    def diffusers_part(cls, sub):
        with torch.device("meta"):
            module = cls.from_config(cls.load_config(str(cfg / sub)))
        return _filled(module, gen, dtype)

    def text_part(cls, config_cls, sub):
        with torch.device("meta"):
            module = cls(config_cls.from_pretrained(str(cfg / sub)))
        return _filled(module, gen, dtype)

    if arch == Arch.SD3:
        denoiser = diffusers_part(SD3Transformer2DModel, "transformer")
        tes = [
            text_part(CLIPTextModelWithProjection, CLIPTextConfig, "text_encoder"),
            text_part(CLIPTextModelWithProjection, CLIPTextConfig, "text_encoder_2"),
            text_part(T5EncoderModel, T5Config, "text_encoder_3"),
        ]
    else:
        denoiser = diffusers_part(UNet2DConditionModel, "unet")
        tes = [text_part(CLIPTextModel, CLIPTextConfig, "text_encoder")]
        if arch == Arch.SDXL:
            tes.append(text_part(CLIPTextModelWithProjection, CLIPTextConfig, "text_encoder_2"))
    vae = diffusers_part(AutoencoderKL, "vae")
    prediction = "flow" if arch == Arch.SD3 else "epsilon"
    return ModelBundle(
        arch=arch,
        denoiser=denoiser,
        vae=vae,
        text_encoders=tes,
        tokenizers=tiny_tokenizers(arch),
        noise_scheduler=scheduler_for(arch, prediction_type=prediction),
        prediction_type=prediction,
    )


def _flat(module):
    return {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}


@pytest.mark.parametrize("arch", [Arch.SD15, Arch.SDXL, Arch.SD3])
def test_real_size_single_file_roundtrip(arch, tmp_path):
    src = _random_real_bundle(arch, torch.float16)
    path = tmp_path / f"{arch.value}.safetensors"
    tensors = bundle_to_original(src)
    n_keys = len(tensors)
    save_safetensors_atomic(tensors, str(path))
    del tensors
    gc.collect()
    loaded = load_base_model(str(path), tokenizer_dir=str(TINY_TOKENIZER_DIR), dtype=torch.float16)
    path.unlink()
    assert loaded.arch == arch
    pairs = [
        (src.denoiser, loaded.denoiser),
        (src.vae, loaded.vae),
        *zip(src.text_encoders, loaded.text_encoders, strict=True),
    ]
    for mine, theirs in pairs:
        a, b = _flat(mine), _flat(theirs)
        assert sorted(a) == sorted(b)
        assert [k for k in a if not torch.equal(a[k], b[k])] == []
    print(f"{arch.value}: {n_keys} tensors in the single file, every part identical after loading")
