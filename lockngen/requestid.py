"""X-Request-ID: one id per request, echoed on the response and in log lines.

The id lives in a context variable for the duration of the request, so every
log record emitted while handling it (ours, Django's, psycopg's) carries it
through ``RequestIDLogFilter``; gunicorn's access log reads the response
header.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from contextvars import ContextVar

from django.http import HttpRequest, HttpResponse

HEADER = "X-Request-ID"
META_KEY = "HTTP_X_REQUEST_ID"
MAX_LENGTH = 200
NO_REQUEST = "-"

request_id_var: ContextVar[str] = ContextVar("request_id", default=NO_REQUEST)


def is_sane(value: str) -> bool:
    """At most 200 visible ASCII characters: safe to echo and to log."""
    return 0 < len(value) <= MAX_LENGTH and all("!" <= ch <= "~" for ch in value)


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIDMiddleware:
    """Adopt the client's ``X-Request-ID`` when sane, else generate one."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        sent = request.META.get(META_KEY, "")
        request_id = sent if is_sane(sent) else new_request_id()
        request.request_id = request_id
        token = request_id_var.set(request_id)
        try:
            response = self.get_response(request)
        finally:
            request_id_var.reset(token)
        response[HEADER] = request_id
        return response


class RequestIDLogFilter(logging.Filter):
    """Give every record a ``request_id`` attribute (``-`` outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = request_id_var.get()
        if request_id == NO_REQUEST:
            # Django logs 4xx/5xx ("django.request") after the middleware chain
            # has returned, with the request attached to the record.
            request = getattr(record, "request", None)
            request_id = getattr(request, "request_id", NO_REQUEST)
        record.request_id = request_id
        return True
