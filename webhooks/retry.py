"""The delivery task's "try again at" signal, and its quiet log line.

No Django imports: the logging configuration loads ``QuietRetries`` before
the apps are ready.
"""

from __future__ import annotations

import logging
from datetime import datetime


class RetryAt(Exception):  # noqa: N818 - a signal to the retry strategy, not an error
    """Raised by the delivery task after a failed attempt it recorded."""

    def __init__(self, when: datetime) -> None:
        self.when = when
        super().__init__(f"next attempt at {when.isoformat()}")


class QuietRetries(logging.Filter):
    """procrastinate logs every retried job with its traceback; for a
    scheduled retry (the receiver said no) the one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], RetryAt):
            record.exc_info = None
            record.exc_text = None
        return True
