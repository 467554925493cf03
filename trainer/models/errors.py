"""The one error type of the model layer: a model (or a part of one) that cannot be loaded."""

from __future__ import annotations


class ModelLoadError(Exception):
    """A base model, VAE, text encoder or tokenizer could not be loaded.

    The message names the file or folder, what was found there, and what to do about it.

    Attributes:
        path: The file or folder that failed ("" when the problem is not tied to one path).
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path
