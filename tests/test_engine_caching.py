"""Latent and text caches: keys, disk round trips, and caption policies honoured through the cache."""

from __future__ import annotations

import os

import pytest
import torch
from train_helpers import make_images, spec_for

from trainer.config import Arch, CacheMode, CropMode
from trainer.data.buckets import BucketSet, assign_buckets
from trainer.data.order import Sample
from trainer.data.scan import scan_dataset
from trainer.engine.caching import TensorStore, latent_key, latents_cacheable, text_cacheable, text_key
from trainer.engine.inputs import InputBuilder, InputSettings
from trainer.models.tiny import tiny_bundle


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle(Arch.SD15, seed=0)


def builder(bundle, folder, *, latent="memory", text="memory", flip=False, root=None, **policy):
    dataset = scan_dataset(spec_for(folder, **policy))
    buckets = assign_buckets(dataset, BucketSet.make(64, min_side=64, max_side=128))
    return InputBuilder(
        dataset=dataset,
        buckets=buckets,
        bundle=bundle,
        settings=InputSettings(seed=1, crop=CropMode.CENTER, flip=flip, caption_variants=4),
        device=torch.device("cpu"),
        dtype=torch.float32,
        latent_store=TensorStore(mode=latent, root=root and root / "latents"),
        text_store=TensorStore(mode=text, root=root and root / "text"),
        vae_identity="v",
        text_identity="t",
    )


def test_when_caching_is_allowed():
    assert latents_cacheable(crop="center", mode="memory")
    assert not latents_cacheable(crop="random", mode="memory")
    assert not latents_cacheable(crop="center", mode="off")
    assert text_cacheable(mode="disk", train_text_encoder=False)
    assert not text_cacheable(mode="disk", train_text_encoder=True)


def test_shuffled_captions_use_different_cached_variants_across_epochs(tmp_path, bundle):
    data = make_images(tmp_path / "d", [(64, 64)], caption="trigger, red, round, small, shiny")
    b = builder(bundle, data, shuffle=True, keep_tokens=1)
    variants = b.variants(0)
    assert len(variants) == 4 and all(v.startswith("trigger, ") for v in variants)
    drawn = [b.caption_for(Sample(index=0, epoch=e, caption="", position=0)) for e in range(1, 9)]
    assert len(set(drawn)) > 1 and set(drawn) <= set(variants)
    emb = {}
    for _e, text in enumerate(drawn, start=1):
        prompt, pooled = b.text_inputs([text])
        emb.setdefault(text, prompt)
        assert torch.equal(emb[text], prompt)
        assert pooled is None
    assert len({t for t in drawn}) >= 2
    first, second = list(emb)[:2]
    assert not torch.equal(emb[first], emb[second])
    assert b.text_store.misses == len(set(drawn))  # each variant encoded once


def test_caption_dropout_reaches_the_cache_as_the_empty_caption(tmp_path, bundle):
    data = make_images(tmp_path / "d", [(64, 64)], caption="a, b, c")
    b = builder(bundle, data, shuffle=True, caption_dropout_every_n_epochs=2)
    assert b.variants(0)[-1] == ""
    assert b.caption_for(Sample(index=0, epoch=2, caption="", position=0)) == ""
    assert b.caption_for(Sample(index=0, epoch=1, caption="", position=0)) != ""


def test_fixed_captions_encode_once_with_prefix(tmp_path, bundle):
    data = make_images(tmp_path / "d", [(64, 64), (64, 64)], caption="red disc")
    b = builder(bundle, data, prefix="sks")
    samples = [Sample(index=i, epoch=e, caption="", position=i) for e in (1, 2) for i in (0, 1)]
    assert {b.caption_for(s) for s in samples} == {"sks, red disc"}
    out = b.build(samples[:2])
    assert tuple(out.prompt_embeds.shape) == (2, 77, 32)
    assert out.captions == ["sks, red disc", "sks, red disc"]
    b.build(samples[2:])
    assert (b.text_store.hits, b.text_store.misses) == (1, 1)


def test_latent_cache_matches_fresh_encoding_and_keys_follow_the_file(tmp_path, bundle):
    data = make_images(tmp_path / "d", [(64, 64)])
    cached = builder(bundle, data, latent="disk", root=tmp_path / "cache")
    fresh = builder(bundle, data, latent="off")
    sample = Sample(index=0, epoch=1, caption="", position=0)
    a = cached.image_inputs([sample])[0]
    files = list((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    assert len(files) == 1
    again = builder(bundle, data, latent="disk", root=tmp_path / "cache").image_inputs([sample])[0]
    assert torch.equal(a.latents, again.latents)
    assert torch.allclose(a.latents, fresh.image_inputs([sample])[0].latents, atol=1e-6)
    assert (a.original_size, a.crop_top_left, a.target_size) == ((64, 64), (0, 0), (64, 64))
    assert tuple(a.latents.shape) == (4, 32, 32)

    path = cached.dataset.items[0].image_path
    k1 = latent_key(image_path=path, bucket=(64, 64), crop="center", flipped=False, vae_identity="v")
    assert k1 != latent_key(image_path=path, bucket=(64, 64), crop="center", flipped=True, vae_identity="v")
    assert k1 != latent_key(image_path=path, bucket=(64, 64), crop="center", flipped=False, vae_identity="w")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert k1 != latent_key(image_path=path, bucket=(64, 64), crop="center", flipped=False, vae_identity="v")
    assert text_key(text="a", encoder_identity="t") != text_key(text="b", encoder_identity="t")


def test_flips_are_cached_once_per_side(tmp_path, bundle):
    data = make_images(tmp_path / "d", [(64, 64)])
    b = builder(bundle, data, flip=True)
    draws = [Sample(index=0, epoch=1, caption="", position=p) for p in range(12)]
    flips = [b._flip_and_rng(s)[0] for s in draws]
    assert True in flips and False in flips
    b.image_inputs(draws)
    assert len(b.latent_store) == 2


def test_a_damaged_disk_entry_is_a_miss(tmp_path):
    store = TensorStore(mode=CacheMode.DISK, root=tmp_path)
    store.put("ab" * 32, {"x": torch.ones(2)})
    (tmp_path / "ab" / f"{'ab' * 32}.safetensors").write_bytes(b"garbage")
    assert store.get("ab" * 32) is None
    with pytest.raises(ValueError, match="a disk cache needs a root folder"):
        TensorStore(mode="disk")
