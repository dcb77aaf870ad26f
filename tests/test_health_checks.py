"""Our health checks one by one, in-process against the run's PostgreSQL database."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
import time_machine
from asgiref.sync import async_to_sync
from django.db import connection
from django.db.models.functions import Now
from django.utils import timezone
from health_check.base import HealthCheckResult
from health_check.exceptions import ServiceUnavailable, ServiceWarning

from generations.health import QueueGauges
from generations.models import Generation
from lockngen.health import (
    ConnectionPool,
    DatabaseBackend,
    Migrations,
    RateLimitCache,
    State,
    overall_state,
)
from tests.factories import claim_one, make_generation
from tests.serving import closed_port

REDIS_URL = "redis://127.0.0.1:6379/15"


def result(error: Exception | None) -> HealthCheckResult:
    return HealthCheckResult(check=DatabaseBackend(), error=error, time_taken=0.0)


@pytest.mark.parametrize(
    ("errors", "state"),
    [
        ([None, None], State.HEALTHY),
        ([None, ServiceWarning("slow")], State.DEGRADED),
        ([ServiceWarning("slow"), ServiceUnavailable("down")], State.UNHEALTHY),
        ([ServiceUnavailable("down")], State.UNHEALTHY),
    ],
    ids=["all-ok", "warning", "warning-and-error", "error"],
)
def test_warnings_degrade_and_errors_make_unhealthy(errors, state):
    assert overall_state([result(error) for error in errors]) is state


@pytest.mark.parametrize(
    ("state", "code"),
    [(State.HEALTHY, 200), (State.DEGRADED, 200), (State.UNHEALTHY, 503)],
)
def test_degraded_still_answers_200(state, code):
    assert state.http_status == code


@pytest.mark.django_db
def test_queue_gauges_count_queued_running_and_expired_leases():
    make_generation(prompt="claimed first")
    make_generation(prompt="claimed, lease expired")
    make_generation(prompt="queued")
    make_generation(prompt="queued too")
    make_generation(prompt="deleted").delete()  # soft-deleted rows do not count
    claim_one()
    expired = claim_one()
    assert expired is not None
    Generation.objects.filter(pk=expired.pk).update(
        lease_expires_at=Now() - timedelta(seconds=1)
    )

    check = QueueGauges()
    async_to_sync(check.run)()

    assert check.metrics["queued"] == 2
    assert check.metrics["running"] == 2
    assert check.metrics["expired_leases"] == 1
    assert check.metrics["oldest_queued_age_seconds"] >= 0


@pytest.mark.django_db
def test_queue_gauges_report_the_age_of_the_oldest_queued_job():
    old = make_generation()
    make_generation()
    Generation.objects.filter(pk=old.pk).update(created_at=Now() - timedelta(hours=2))
    check = QueueGauges()
    async_to_sync(check.run)()
    assert check.metrics["queued"] == 2
    assert check.metrics["oldest_queued_age_seconds"] >= 7200


@pytest.mark.django_db
def test_empty_queue_reports_zero_age():
    check = QueueGauges()
    async_to_sync(check.run)()
    assert check.metrics == {
        "queued": 0,
        "oldest_queued_age_seconds": 0.0,
        "running": 0,
        "expired_leases": 0,
        "queued_per_model": {},
        "oldest_queued_age_seconds_per_model": {},
        "keys_at_cap": 0,
    }


@pytest.mark.django_db
def test_migrations_check_passes_on_the_migrated_test_database():
    async_to_sync(Migrations().run)()


def test_rate_limits_in_local_memory_are_a_warning(settings):
    settings.REDIS_URL = ""
    with pytest.raises(ServiceWarning, match="REDIS_URL"):
        RateLimitCache().run()


def test_rate_limits_in_redis_are_fine(settings):
    settings.REDIS_URL = REDIS_URL
    RateLimitCache().run()


def test_an_unreachable_redis_is_a_warning_not_an_error(settings):
    """Limits then run per process: degraded, never unhealthy (SPEC §12)."""
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
    with pytest.raises(ServiceWarning, match="Redis is unavailable"):
        RateLimitCache().run()


def test_sqlite_fallback_is_a_warning(settings):
    settings.DATABASE_FALLBACK = True
    with pytest.raises(ServiceWarning, match="DATABASE_URL"):
        asyncio.run(DatabaseBackend().run())


def test_pool_check_fails_without_a_pool():
    with pytest.raises(ServiceUnavailable, match="no connection pool"):
        asyncio.run(ConnectionPool().run())


def test_gauges_stay_out_of_the_check_labels_and_repr():
    check = QueueGauges()
    check.metrics = {"queued": 3}
    assert repr(check) == "QueueGauges(alias='default')"
    assert check.labels == {"check": "QueueGauges", "alias": "default"}


@pytest.mark.django_db
def test_queue_age_is_taken_on_the_database_clock():
    """An app server whose clock runs a day ahead reports the same age."""
    old = make_generation()
    Generation.objects.filter(pk=old.pk).update(created_at=Now() - timedelta(hours=2))
    check = QueueGauges()
    with time_machine.travel(timezone.now() + timedelta(days=1), tick=True):
        async_to_sync(check.run)()
    assert 7200 <= check.metrics["oldest_queued_age_seconds"] < 7200 + 3600


@pytest.mark.django_db
def test_a_missing_record_of_an_earlier_migration_is_pending():
    with connection.cursor() as cursor:
        cursor.execute(
            "DELETE FROM django_migrations WHERE app = 'apikeys' AND name = %s",
            ["0001_initial"],
        )
    with pytest.raises(ServiceUnavailable, match=r"apikeys\.0001_initial"):
        async_to_sync(Migrations().run)()
