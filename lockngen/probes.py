"""``/health/live`` and ``/health/ready``, answered before anything can refuse a probe.

Load balancers and orchestrators probe over plain HTTP with whatever ``Host``
they like (a pod IP, a container name). In production ``SecurityMiddleware``
would redirect them to HTTPS and host validation would answer 400, so this
middleware sits first in ``MIDDLEWARE`` and answers these two paths itself,
never calling ``request.get_host()``.

``/health/ready`` uses the request thread's own connection, which Django's
request signals manage like any other request's (``CONN_MAX_AGE``, pool):
a probe opens nothing that outlives it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from django.db import DatabaseError, connections
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.cache import add_never_cache_headers

from lockngen.health import State, degradations, pending_migrations
from lockngen.middleware import RETRY_AFTER_SECONDS

logger = logging.getLogger(__name__)

LIVE_PATHS = frozenset({"/health/live", "/health/live/"})
READY_PATHS = frozenset({"/health/ready", "/health/ready/"})
PROBE_METHODS = frozenset({"GET", "HEAD"})

# Once this process has seen every migration applied it stops looking
# (SPEC §6): migrations only ever get applied, and reading the migration graph
# on every probe would cost far more than the SELECT 1.
_migrations_applied = False


def liveness() -> tuple[State, dict[str, Any]]:
    """The process answers. Touches no database."""
    reasons = degradations()
    body: dict[str, Any] = {"status": (State.DEGRADED if reasons else State.HEALTHY)}
    if reasons:
        body["warnings"] = reasons
    return body["status"], body


def readiness(alias: str = "default") -> tuple[State, dict[str, Any]]:
    """The database answers and no migration is pending."""
    global _migrations_applied
    connection = connections[alias]
    body: dict[str, Any] = {"database": "ok", "migrations": "ok"}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        if not _migrations_applied:
            pending = pending_migrations(connection)
            _migrations_applied = not pending
            if pending:
                body["migrations"] = "pending"
    except DatabaseError as exc:
        # Class name only: libpq's message names hosts, the URL may hold a password.
        logger.warning("readiness: database unavailable (%s)", type(exc).__name__)
        body |= {"database": "unavailable", "migrations": "unknown"}
    if body["database"] != "ok" or body["migrations"] != "ok":
        state = State.UNHEALTHY
    else:
        state, live = liveness()
        body |= {key: value for key, value in live.items() if key != "status"}
    return state, {"status": state} | body


def probe_response(state: State, body: dict[str, Any]) -> JsonResponse:
    response = JsonResponse(body, status=state.http_status)
    if state.http_status == HTTPStatus.SERVICE_UNAVAILABLE:
        response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    add_never_cache_headers(response)
    return response


class HealthProbeMiddleware:
    """Answer ``/health/live`` and ``/health/ready``; must be first in MIDDLEWARE."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.method in PROBE_METHODS:
            if request.path_info in LIVE_PATHS:
                return probe_response(*liveness())
            if request.path_info in READY_PATHS:
                return probe_response(*readiness())
        return self.get_response(request)
