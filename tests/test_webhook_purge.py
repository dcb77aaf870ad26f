"""``purge_deleted`` also prunes old webhook deliveries and delivery jobs (SPEC §10)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.models.functions import Now

from tests.factories import make_api_key, make_generation
from tests.webhooks import emit, job_of
from webhooks.models import WebhookDelivery

pytestmark = pytest.mark.django_db


def emitted(key, *, state: str, days_old: int) -> WebhookDelivery:
    row = emit(make_generation(api_key=key), url="http://127.0.0.1:9/h")
    WebhookDelivery.objects.filter(pk=row.pk).update(
        state=state, created_at=Now() - timedelta(days=days_old)
    )
    return row


def finish_job(job_id: int, *, status: str, days_ago: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE procrastinate_jobs SET status = %s WHERE id = %s",
            [status, job_id],
        )
        cursor.execute(
            "UPDATE procrastinate_events SET at = now() - %s * interval '1 day' "
            "WHERE job_id = %s",
            [days_ago, job_id],
        )


def jobs() -> set[int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT id FROM procrastinate_jobs")
        return {row[0] for row in cursor.fetchall()}


def test_old_finished_deliveries_and_their_jobs_go_pending_and_recent_ones_stay():
    key, _ = make_api_key(name="hooks", rate_limit=0)
    old = {
        state: emitted(key, state=state, days_old=40)
        for state in ("delivered", "failed", "gone")
    }
    old_pending = emitted(key, state="pending", days_old=40)
    recent = emitted(key, state="delivered", days_old=1)
    for row in old.values():
        finish_job(job_of(row), status="succeeded", days_ago=40)
    finish_job(job_of(recent), status="succeeded", days_ago=1)
    kept_jobs = {job_of(old_pending), job_of(recent)}

    call_command("purge_deleted", older_than_days=30, batch_size=2)

    assert set(WebhookDelivery.objects.values_list("pk", flat=True)) == {
        old_pending.pk,
        recent.pk,
    }
    assert jobs() == kept_jobs


def test_purging_a_generation_takes_its_deliveries_with_it():
    key, _ = make_api_key(name="hooks", rate_limit=0)
    row = emitted(key, state="pending", days_old=0)
    generation = row.generation
    generation.delete()
    type(generation).all_objects.filter(pk=generation.pk).update(
        deleted_at=Now() - timedelta(days=5)
    )

    call_command("purge_deleted", older_than_days=1)

    assert not WebhookDelivery.objects.filter(pk=row.pk).exists()
