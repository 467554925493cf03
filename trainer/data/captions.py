"""Drawing a caption under a :class:`~trainer.config.CaptionPolicy`, the way kohya's trainer does.

Every draw is seeded by ``(seed, epoch, index)`` with its own :class:`random.Random`, so a run is
reproducible, each epoch sees a different order, and nothing touches the global RNG. Order of
operations (kohya's ``process_caption``):

1. prefix and suffix are added as chunks (the prefix counts toward ``keep_tokens``);
2. whole-caption dropout (at a rate, or every N-th epoch, epochs counted from 1) gives ``""``;
3. the caption is split on the separator (and on sentence-ending periods if asked), blanks removed;
4. the first ``keep_tokens`` chunks (or everything before ``keep_separator``) stay in place;
5. the rest is shuffled (if ``shuffle``) and each of its chunks dropped at ``tag_dropout_rate``;
6. the chunks are joined with ``join_separator``.
"""

from __future__ import annotations

import dataclasses
import random
import re

from ..config import CaptionPolicy

# A period ends a sentence only before whitespace or the end, so "1.5" and "v2.1" stay whole.
_SENTENCE_END = re.compile(r"\.(?=\s|$)")


def _rng(seed: int, epoch: int, index: int) -> random.Random:
    # A str seed is hashed with SHA-512 by random.Random: stable across processes and Python runs.
    return random.Random(f"caption:{seed}:{epoch}:{index}")


def _chunks(text: str, policy: CaptionPolicy) -> list[str]:
    """Split ``text`` into stripped, non-empty chunks."""
    pieces = text.split(policy.separator)
    if policy.split_on_period:
        pieces = [p for piece in pieces for p in _SENTENCE_END.split(piece)]
    return [p.strip() for p in pieces if p.strip()]


def _is_dropped(policy: CaptionPolicy, rng: random.Random, epoch: int) -> bool:
    # Always consume one number so the shuffle that follows does not depend on the dropout rate.
    roll = rng.random()
    if policy.caption_dropout_rate > 0 and roll < policy.caption_dropout_rate:
        return True
    n = policy.caption_dropout_every_n_epochs
    return n > 0 and epoch % n == 0


def _fixed_and_flexible(caption: str, policy: CaptionPolicy) -> tuple[list[str], list[str], list[str]]:
    """Split a caption into (kept head, shuffleable middle, kept tail) chunks, prefix and suffix included."""
    prefix = _chunks(policy.prefix, policy)
    suffix = _chunks(policy.suffix, policy)
    marker = policy.keep_separator
    if marker and marker in caption:
        head, rest = caption.split(marker, 1)
        # A second marker fixes a tail too, as in kohya ("fixed ||| shuffled ||| fixed").
        middle, tail = rest.split(marker, 1) if marker in rest else (rest, "")
        return prefix + _chunks(head, policy), _chunks(middle, policy) + suffix, _chunks(tail, policy)
    chunks = prefix + _chunks(caption, policy) + suffix
    keep = policy.keep_tokens
    return chunks[:keep], chunks[keep:], []


def draw_caption(caption: str, policy: CaptionPolicy, *, seed: int, epoch: int, index: int) -> str:
    """The caption one sample gets when drawn.

    Args:
        caption: The caption as read from its file.
        policy: Prefix/suffix, shuffle, keep and dropout settings.
        seed: The run's seed.
        epoch: Epoch number, counted from 1 (``caption_dropout_every_n_epochs`` depends on it).
        index: Which draw within the epoch (the sample's position), so repeats differ.

    Returns:
        The caption text; ``""`` when dropped.
    """
    rng = _rng(seed, epoch, index)
    if _is_dropped(policy, rng, epoch):
        return ""
    rearranges = policy.shuffle or policy.tag_dropout_rate > 0
    has_marker = bool(policy.keep_separator) and policy.keep_separator in caption
    if not rearranges and not has_marker and not policy.split_on_period:
        # Nothing to rearrange: keep the caption's own punctuation, only add prefix and suffix.
        parts = [policy.prefix.strip(), caption.strip(), policy.suffix.strip()]
        return policy.join_separator.join(p for p in parts if p)
    fixed, flexible, tail = _fixed_and_flexible(caption, policy)
    if policy.shuffle:
        rng.shuffle(flexible)
    if policy.tag_dropout_rate > 0:
        flexible = [chunk for chunk in flexible if rng.random() >= policy.tag_dropout_rate]
    return policy.join_separator.join(fixed + flexible + tail)


def caption_varies(policy: CaptionPolicy) -> bool:
    """Whether two draws of the same caption can differ (then one cached encoding is not enough)."""
    return (
        policy.shuffle
        or policy.tag_dropout_rate > 0
        or policy.caption_dropout_rate > 0
        or policy.caption_dropout_every_n_epochs > 0
    )


def _drops_whole_captions(policy: CaptionPolicy) -> bool:
    return policy.caption_dropout_rate > 0 or policy.caption_dropout_every_n_epochs > 0


def caption_variants(caption: str, policy: CaptionPolicy, *, seed: int, index: int, k: int) -> list[str]:
    """Up to ``k`` different draws of a caption, for pre-encoding with a text-encoder cache.

    Args:
        caption: The caption as read from its file.
        policy: The caption policy of the item's dataset part.
        seed: The run's seed.
        index: The item's index in the dataset (keeps items' variants independent).
        k: How many non-empty variants to aim for.

    Returns:
        Distinct draws without whole-caption dropout (fewer than ``k`` when the caption has fewer
        orders), followed by ``""`` when the policy drops whole captions. Pick one per draw with
        :func:`choose_variant`.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    kept = dataclasses.replace(policy, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0)
    variants: list[str] = []
    # Short captions have few orders; stop trying well before looping for long.
    for attempt in range(1, 8 * k + 1):
        text = draw_caption(caption, kept, seed=seed, epoch=attempt, index=index)
        if text not in variants:
            variants.append(text)
            if len(variants) == k or not caption_varies(kept):
                break
    if _drops_whole_captions(policy) and "" not in variants:
        variants.append("")
    return variants


def choose_variant(variants: list[str], policy: CaptionPolicy, *, seed: int, epoch: int, index: int) -> str:
    """Which pre-encoded variant a draw uses, with the same whole-caption dropout as :func:`draw_caption`.

    Args:
        variants: What :func:`caption_variants` returned for this item.
        policy: The item's caption policy.
        seed: The run's seed.
        epoch: Epoch number, counted from 1.
        index: Which draw within the epoch (the sample's position).

    Returns:
        ``""`` exactly when :func:`draw_caption` would drop the caption, else one of the non-empty
        variants (or ``""`` if that is the only one).
    """
    rng = _rng(seed, epoch, index)
    if _is_dropped(policy, rng, epoch):
        return ""
    candidates = [v for v in variants if v] or [""]
    return candidates[rng.randrange(len(candidates))]
