"""Cross-cutting HTTP behaviour that is not specific to one app."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5


def database_unavailable_response() -> JsonResponse:
    response = JsonResponse(
        {
            "detail": "The database is unavailable; retry shortly.",
            "code": "database_unavailable",
        },
        status=503,
    )
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


class DatabaseUnavailableMiddleware:
    """Answer 503 JSON with ``Retry-After`` when the database cannot be reached.

    Connection failures (after the backend's bounded retries) and statements
    cancelled by ``statement_timeout`` surface as ``OperationalError`` or
    ``InterfaceError``; neither is the client's fault nor a bug worth a 500.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(
        self, request: HttpRequest, exception: Exception
    ) -> HttpResponse | None:
        if isinstance(exception, OperationalError | InterfaceError):
            # The message is libpq's (host/port, never the password); first line only.
            logger.error(
                "database unavailable for %s %s: %s",
                request.method,
                request.path,
                str(exception).strip().splitlines()[0] if str(exception) else "",
            )
            return database_unavailable_response()
        return None
