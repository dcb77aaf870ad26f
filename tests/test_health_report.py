"""``/health/`` reuses the request thread's connection and remembers its report.

Each unauthenticated probe used to open three fresh PostgreSQL sessions (the
library's executor threads and its ``Database`` check): a flood of probes
multiplied backends. ``connection_created`` is Django's signal for every new
database session, whichever thread opens it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus

import pytest
from django.db import connection
from django.db.backends.signals import connection_created
from django.test.utils import CaptureQueriesContext

from tests.factories import make_generation

pytestmark = pytest.mark.django_db
PROBES = 20
REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture
def new_sessions() -> Iterator[list[str]]:
    """Names of the threads that opened a database session during the test."""
    opened: list[str] = []

    def record(sender, connection, **kwargs) -> None:
        opened.append(threading.current_thread().name)

    connection_created.connect(record, weak=False)
    try:
        yield opened
    finally:
        connection_created.disconnect(record)


@pytest.fixture(autouse=True)
def healthy_setup(settings):
    settings.REDIS_URL = REDIS_URL


def report(client) -> dict:
    response = client.get("/health/?format=json")
    assert response.status_code == HTTPStatus.OK, response.content
    return json.loads(response.content)


def test_probes_open_no_database_session_of_their_own(client, settings, new_sessions):
    settings.HEALTH_REPORT_SECONDS = 0  # every probe runs every check
    connection.ensure_connection()  # the request thread's own, as in gunicorn

    with CaptureQueriesContext(connection) as queries:
        reports = [report(client) for _ in range(PROBES)]

    assert new_sessions == []
    assert {r["status"] for r in reports} == {"healthy"}
    assert len(queries) >= PROBES  # the checks ran, on this thread's connection


def test_a_flood_of_probes_costs_one_run_of_the_checks(client, settings, new_sessions):
    settings.HEALTH_REPORT_SECONDS = 60
    connection.ensure_connection()
    first = report(client)

    with CaptureQueriesContext(connection) as queries:
        flood = [report(client) for _ in range(PROBES)]

    assert new_sessions == []
    assert len(queries) == 0
    assert all(r == first for r in flood)


def test_the_remembered_report_is_renewed_after_its_interval(client, settings):
    settings.HEALTH_REPORT_SECONDS = 2
    make_generation()
    before = report(client)["metrics"]["queue"]["queued"]
    make_generation()
    remembered = report(client)["metrics"]["queue"]["queued"]
    time.sleep(2.1)
    renewed = report(client)["metrics"]["queue"]["queued"]

    assert (before, remembered, renewed) == (1, 1, 2)


def test_a_settings_change_forgets_the_remembered_report(client, settings):
    """Degraded still shows (unhealthy: tests/test_health.py's real servers)."""
    settings.HEALTH_REPORT_SECONDS = 60
    healthy = report(client)

    settings.REDIS_URL = ""
    degraded = report(client)

    assert healthy["status"] == "healthy"
    assert degraded["status"] == "degraded"
    assert "REDIS_URL" in degraded["checks"]["RateLimitCache()"]
