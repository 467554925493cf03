"""Caption drawing: kohya's order of operations, seeded per (seed, epoch, index), dropout rates."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.config import CaptionPolicy
from trainer.data.captions import caption_variants, caption_varies, choose_variant, draw_caption

CAPTION = "sks, red hat, blue coat, smiling, outdoors, sunny day, long hair, standing"

chunk = st.text(alphabet="abcdefgh xyz", min_size=1, max_size=8).map(str.strip).filter(bool)


@settings(max_examples=150, deadline=None)
@given(
    chunks=st.lists(chunk, min_size=0, max_size=9),
    keep=st.integers(0, 10),
    seed=st.integers(0, 2**32),
    epoch=st.integers(1, 50),
)
def test_kept_chunks_stay_and_shuffle_keeps_the_multiset(chunks, keep, seed, epoch):
    policy = CaptionPolicy(shuffle=True, keep_tokens=keep)
    drawn = draw_caption(", ".join(chunks), policy, seed=seed, epoch=epoch, index=3)
    out = drawn.split(", ") if drawn else []
    assert out[:keep] == chunks[:keep]
    assert Counter(out) == Counter(chunks)


def test_same_key_same_caption_and_epochs_differ():
    policy = CaptionPolicy(shuffle=True, keep_tokens=1)
    first = draw_caption(CAPTION, policy, seed=7, epoch=1, index=0)
    assert draw_caption(CAPTION, policy, seed=7, epoch=1, index=0) == first
    assert draw_caption(CAPTION, policy, seed=7, epoch=2, index=0) != first
    assert draw_caption(CAPTION, policy, seed=8, epoch=1, index=0) != first
    assert draw_caption(CAPTION, policy, seed=7, epoch=1, index=1) != first
    assert first.startswith("sks, ")


def test_no_shuffle_keeps_the_text_and_adds_prefix_and_suffix():
    policy = CaptionPolicy(prefix="ohwx", suffix="best quality")
    assert (
        draw_caption("a cat,on a mat", policy, seed=1, epoch=1, index=0)
        == "ohwx, a cat,on a mat, best quality"
    )
    assert draw_caption("  a cat  ", CaptionPolicy(), seed=1, epoch=1, index=0) == "a cat"


def test_prefix_counts_toward_keep():
    policy = CaptionPolicy(prefix="ohwx", shuffle=True, keep_tokens=1)
    draws = [draw_caption("red, green, blue, cyan", policy, seed=0, epoch=e, index=0) for e in range(1, 41)]
    assert all(d.startswith("ohwx, ") for d in draws)
    # With the prefix taking the kept slot, the caption's own first chunk moves around.
    assert {d.split(", ")[1] for d in draws} == {"red", "green", "blue", "cyan"}
    assert all(sorted(d.split(", ")[1:]) == ["blue", "cyan", "green", "red"] for d in draws)


def test_suffix_is_a_chunk_that_shuffles_like_kohya():
    policy = CaptionPolicy(suffix="8k", shuffle=True)
    draws = {draw_caption("a, b", policy, seed=0, epoch=e, index=0) for e in range(1, 60)}
    assert {d.split(", ")[-1] for d in draws} == {"a", "b", "8k"}


def test_keep_separator_fixes_everything_before_it():
    policy = CaptionPolicy(shuffle=True, keep_tokens=0, keep_separator="|||")
    caption = "sks, in the style of k4s4 ||| red, green, blue, cyan"
    draws = [draw_caption(caption, policy, seed=3, epoch=e, index=0) for e in range(1, 30)]
    for d in draws:
        chunks = d.split(", ")
        assert chunks[:2] == ["sks", "in the style of k4s4"]
        assert sorted(chunks[2:]) == ["blue", "cyan", "green", "red"]
        assert "|||" not in d
    assert len(set(draws)) > 5


def test_second_keep_separator_fixes_a_tail():
    policy = CaptionPolicy(shuffle=True, keep_separator="|||")
    draws = {
        draw_caption("head ||| a, b, c ||| tail, end", policy, seed=0, epoch=e, index=0) for e in range(1, 30)
    }
    assert all(d.startswith("head, ") and d.endswith(", tail, end") for d in draws)
    assert len(draws) == 6  # every order of a, b, c


def test_keep_separator_without_shuffle_only_removes_the_marker():
    policy = CaptionPolicy(keep_separator="|||")
    assert draw_caption("sks ||| a,b", policy, seed=0, epoch=1, index=0) == "sks, a, b"


def test_split_on_period_splits_sentences_not_numbers():
    policy = CaptionPolicy(split_on_period=True, join_separator=" | ")
    text = "A cat sits. It wears a hat, red. Version 1.5 art."
    assert (
        draw_caption(text, policy, seed=0, epoch=1, index=0)
        == "A cat sits | It wears a hat | red | Version 1.5 art"
    )


def test_caption_dropout_rate_holds():
    policy = CaptionPolicy(caption_dropout_rate=0.3)
    dropped = sum(draw_caption("a, b", policy, seed=5, epoch=1, index=i) == "" for i in range(10_000))
    assert 0.28 <= dropped / 10_000 <= 0.32


def test_tag_dropout_rate_holds_and_spares_kept_chunks():
    policy = CaptionPolicy(tag_dropout_rate=0.25, keep_tokens=1)
    kept = Counter()
    for i in range(10_000):
        chunks = draw_caption("sks, a, b, c, d", policy, seed=9, epoch=2, index=i).split(", ")
        assert chunks[0] == "sks"
        kept.update(chunks[1:])
    for tag in "abcd":
        assert 0.73 <= kept[tag] / 10_000 <= 0.77


def test_caption_dropout_every_n_epochs_counts_from_one():
    policy = CaptionPolicy(caption_dropout_every_n_epochs=3)
    drawn = [draw_caption("a, b", policy, seed=0, epoch=e, index=0) for e in range(1, 10)]
    assert [d == "" for d in drawn] == [False, False, True, False, False, True, False, False, True]
    assert drawn[0] == "a, b"


def test_blank_chunks_are_removed_when_rearranging():
    policy = CaptionPolicy(shuffle=True, keep_tokens=2)
    assert draw_caption(" ,a,, b ,  ,c", policy, seed=0, epoch=1, index=0).split(", ")[:2] == ["a", "b"]


def test_caption_varies():
    assert not caption_varies(CaptionPolicy())
    assert not caption_varies(CaptionPolicy(prefix="x", keep_tokens=2))
    assert caption_varies(CaptionPolicy(shuffle=True))
    assert caption_varies(CaptionPolicy(caption_dropout_rate=0.1))
    assert caption_varies(CaptionPolicy(caption_dropout_every_n_epochs=4))
    assert caption_varies(CaptionPolicy(tag_dropout_rate=0.1))


def test_caption_variants_are_distinct_and_include_empty_with_dropout():
    policy = CaptionPolicy(shuffle=True, keep_tokens=1, caption_dropout_rate=0.1)
    variants = caption_variants("sks, a, b, c", policy, seed=1, index=4, k=4)
    assert len(variants) == 5 and variants[-1] == ""
    assert len(set(variants)) == 5
    assert all(v.startswith("sks, ") and sorted(v.split(", ")[1:]) == ["a", "b", "c"] for v in variants[:-1])
    # Only 2 orders exist for two movable chunks.
    assert sorted(caption_variants("sks, a, b", policy, seed=1, index=4, k=8)) == [
        "",
        "sks, a, b",
        "sks, b, a",
    ]
    assert caption_variants("a, b", CaptionPolicy(prefix="p"), seed=1, index=0, k=8) == ["p, a, b"]


def test_choose_variant_drops_exactly_when_draw_caption_does():
    policy = CaptionPolicy(shuffle=True, caption_dropout_rate=0.2)
    variants = caption_variants("a, b, c", policy, seed=2, index=0, k=6)
    for position in range(300):
        chosen = choose_variant(variants, policy, seed=2, epoch=3, index=position)
        drawn = draw_caption("a, b, c", policy, seed=2, epoch=3, index=position)
        assert (chosen == "") == (drawn == "")
        assert chosen in variants
