"""The webhook gauges in ``/health/`` (SPEC §6, §10)."""

from __future__ import annotations

import json
from datetime import timedelta
from http import HTTPStatus

import pytest
from django.db import connection
from django.db.models.functions import Now
from health_check.exceptions import ServiceWarning

from tests.factories import make_api_key, make_generation
from tests.webhooks import emit
from webhooks.health import DeliveryGauges
from webhooks.models import WebhookDelivery

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fresh_report(settings):
    settings.HEALTH_REPORT_SECONDS = 0
    settings.REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture
def key():
    return make_api_key(name="hooks", rate_limit=0)[0]


def emitted(key):
    return emit(make_generation(api_key=key), url="http://127.0.0.1:9/h")


def worker_heartbeat(seconds_ago: float) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO procrastinate_workers (last_heartbeat) "
            "VALUES (now() - %s * interval '1 second')",
            [seconds_ago],
        )


def gauges() -> tuple[dict, Exception | None]:
    check = DeliveryGauges()
    try:
        check.check()
    except ServiceWarning as exc:
        return check.metrics, exc
    return check.metrics, None


def test_no_deliveries_and_no_worker_is_fine():
    metrics, warning = gauges()
    assert warning is None
    assert metrics == {
        "pending": 0,
        "oldest_pending_age_seconds": 0.0,
        "failed_last_hour": 0,
        "workers_alive": 0,
    }


def test_pending_deliveries_without_a_live_worker_degrade(key):
    emitted(key)
    worker_heartbeat(seconds_ago=120)  # a dead worker's last word
    metrics, warning = gauges()
    assert "no delivery worker alive" in str(warning)
    assert (metrics["pending"], metrics["workers_alive"]) == (1, 0)

    worker_heartbeat(seconds_ago=1)
    metrics, warning = gauges()
    assert warning is None
    assert (metrics["pending"], metrics["workers_alive"]) == (1, 1)


def test_oldest_pending_age_and_recent_failures_are_counted(key):
    old, recent_failure, old_failure, delivered = (emitted(key) for _ in range(4))
    WebhookDelivery.objects.filter(pk=old.pk).update(
        created_at=Now() - timedelta(minutes=10)
    )
    WebhookDelivery.objects.filter(pk=recent_failure.pk).update(
        state="failed", last_attempt_at=Now() - timedelta(minutes=5)
    )
    WebhookDelivery.objects.filter(pk=old_failure.pk).update(
        state="failed", last_attempt_at=Now() - timedelta(hours=2)
    )
    WebhookDelivery.objects.filter(pk=delivered.pk).update(state="delivered")
    worker_heartbeat(seconds_ago=0)

    metrics, warning = gauges()

    assert warning is None
    assert metrics["pending"] == 1
    assert 600 <= metrics["oldest_pending_age_seconds"] < 700
    assert metrics["failed_last_hour"] == 1


def test_the_report_carries_the_gauges_and_names_the_degradation(client, key):
    emitted(key)
    response = client.get("/health/?format=json")
    assert response.status_code == HTTPStatus.OK
    report = json.loads(response.content)
    assert report["status"] == "degraded"
    assert set(report["metrics"]["webhooks"]) == {
        "pending",
        "oldest_pending_age_seconds",
        "failed_last_hour",
        "workers_alive",
    }
    (reason,) = [v for k, v in report["checks"].items() if "DeliveryGauges" in k]
    assert "no delivery worker alive" in reason

    text = client.get("/health/?format=openmetrics").content.decode()
    assert "\nlockngen_webhooks_pending 1" in text


@pytest.mark.sqlite_smoke
def test_the_sqlite_fallback_reports_webhooks_unavailable(settings):
    settings.DATABASE_FALLBACK = True
    _, warning = gauges()
    assert "webhooks are unavailable" in str(warning)
    assert "DATABASE_URL" in str(warning)
