"""Collect log messages: ComfyUI reports a LoRA key it did not load, or a weight a loader missed,
only through logging, and diffusers/peft warn the same way."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class LogCapture(logging.Handler):
    """Collects the messages of every record it is given, at every level."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def captured_logs(*names: str) -> Iterator[list[str]]:
    """The messages the named loggers (none: the root logger, which every record reaches) log at
    any level inside the block; their handlers and levels are as they were after it."""
    capture = LogCapture()
    loggers = [logging.getLogger(n) for n in names] or [logging.getLogger()]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(capture)
        lg.setLevel(logging.DEBUG)
    try:
        yield capture.messages
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(capture)
            lg.setLevel(level)
