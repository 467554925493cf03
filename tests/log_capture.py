"""A logging handler that keeps each record's message: ComfyUI reports a LoRA key it did not load,
or a weight a loader missed, only through logging."""

from __future__ import annotations

import logging


class LogCapture(logging.Handler):
    """Collects the messages of every record it is given, at every level."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
