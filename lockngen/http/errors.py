"""Errors as JSON: the DRF exception handler, the ``/api/`` catch-all 404
and the middleware that turns any other error page under ``/api/`` or
``/health/`` into JSON."""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import DataError, InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.views import set_rollback

from lockngen.http.inbound import RequestBodyTooLarge
from lockngen.middleware import database_unavailable_response

logger = logging.getLogger(__name__)
request_logger = logging.getLogger("django.request")

API_PREFIX = "/api/"
# Where every error is JSON (SPEC §5, §12). The one exception: /health/'s own
# report, whose 503 "unhealthy" page is content-negotiated (HTML for humans).
JSON_ERROR_PREFIXES = (API_PREFIX, "/health/")
HEALTH_REPORT_PATH = "/health/"


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> HttpResponse:
    """DRF's handler, plus: database outage → 503, bad bytes → 400, and any
    other exception → a logged 500 in JSON (also with ``DEBUG`` on).
    """
    if isinstance(exc, OperationalError | InterfaceError):
        set_rollback()
        first_line = str(exc).strip().splitlines()[0] if str(exc) else ""
        logger.error("database unavailable: %s", first_line)
        return database_unavailable_response()
    if isinstance(exc, DataError):
        # Input validation should have stopped this; never show the driver's text.
        set_rollback()
        logger.warning("database refused a value: %s", exc)
        return Response(
            {"detail": "Invalid input.", "code": "invalid"},
            status=HTTPStatus.BAD_REQUEST,
        )
    if isinstance(exc, RequestDataTooBig):  # Content-Length over the limit
        exc = RequestBodyTooLarge()
    if isinstance(exc, SuspiciousOperation):
        return Response({"detail": "Bad request."}, status=HTTPStatus.BAD_REQUEST)
    response = drf_exception_handler(exc, context)
    if response is not None:
        if isinstance(exc, exceptions.PermissionDenied):
            role_code(exc, response)
        return response
    set_rollback()
    request = context.get("request")
    request_logger.error(
        "Internal Server Error: %s",
        getattr(request, "path", "?"),
        exc_info=exc,
        # DRF's Request proxies the HttpRequest attributes handlers read.
        extra={"status_code": 500, "request": request},
    )
    body: dict[str, Any] = {"detail": "Internal server error.", "code": "error"}
    if settings.DEBUG:
        body["exception"] = f"{type(exc).__name__}: {exc}"
    return Response(body, status=HTTPStatus.INTERNAL_SERVER_ERROR)


def role_code(exc: exceptions.PermissionDenied, response: Response) -> None:
    """A permission class's ``code`` (the role it needs, apikeys.permissions)
    goes into the 403 body beside ``detail``, for clients to act on."""
    code = exc.get_codes()
    if isinstance(code, str) and code != exceptions.PermissionDenied.default_code:
        response.data["code"] = code


def not_found(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
    """Catch-all for unknown ``/api/`` paths (``handler404`` is ignored under
    ``DEBUG``)."""
    return JsonResponse({"detail": "Not found."}, status=HTTPStatus.NOT_FOUND)


class ApiErrorsAsJsonMiddleware:
    """Safety net: an error response under ``/api/`` or ``/health/`` that is
    not JSON yet (a 400 from host validation, a 403 from CSRF, a 500 raised in
    a middleware, Django's debug pages) becomes ``{"detail": …}`` with the same
    status and headers.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if (
            response.status_code >= HTTPStatus.BAD_REQUEST
            and request.path.startswith(JSON_ERROR_PREFIXES)
            and not response.get("Content-Type", "").startswith("application/json")
            and not is_health_report(request, response)
        ):
            return as_json(response)
        return response


def is_health_report(request: HttpRequest, response: HttpResponse) -> bool:
    # By path, not by resolved view: a cached report may be answered before
    # URL resolution.
    return (
        request.path_info == HEALTH_REPORT_PATH
        and response.status_code == HTTPStatus.SERVICE_UNAVAILABLE
    )


def as_json(response: HttpResponse) -> JsonResponse:
    status = response.status_code
    try:
        detail = HTTPStatus(status).phrase
    except ValueError:
        detail = "Error"
    replacement = JsonResponse({"detail": f"{detail}."}, status=status)
    for header, value in response.items():
        if header.lower() not in {"content-type", "content-length"}:
            replacement[header] = value
    return replacement
