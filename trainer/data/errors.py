"""The error the dataset side raises for bad user data, and the named reasons a file can be bad."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum


class ProblemReason(str, Enum):
    """Why a file of a dataset cannot be used. The values are what users read."""

    UNREADABLE_IMAGE = "unreadable image"
    ZERO_BYTE = "zero-byte file"
    IMAGE_TOO_LARGE = "image too large"
    IMAGE_TOO_SMALL = "image too small"
    MISSING_CAPTION = "missing caption"
    EMPTY_CAPTION = "empty caption"
    CAPTION_NOT_UTF8 = "caption not UTF-8"
    ORPHAN_CAPTION = "caption with no image"


class DatasetError(ValueError):
    """A dataset, or one of its files, that cannot be used as it is.

    The message names the offending file(s), what is wrong and how to fix it; ``paths`` carries
    the same files for UIs that want to list or link them, and ``reason`` says what is wrong when
    a single file is at fault.
    """

    def __init__(self, message: str, *, paths: Iterable[str] = (), reason: ProblemReason | None = None):
        super().__init__(message)
        self.paths: list[str] = [str(p) for p in paths]
        self.reason = reason
