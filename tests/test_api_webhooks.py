"""The webhook endpoints (SPEC §5): the key's secret, a job's deliveries."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from http import HTTPStatus

import pytest
from django.db import connection

from tests.factories import make_generation
from tests.webhooks import emit
from webhooks.models import WebhookDelivery

pytestmark = pytest.mark.django_db

DELIVERY_FIELDS = {
    "id",
    "event",
    "state",
    "attempts",
    "last_status",
    "last_attempt_at",
    "next_attempt_at",
    "delivered_at",
    "created_at",
}


@pytest.mark.sqlite_smoke
def test_the_secret_is_created_on_first_use_and_kept(owner_api, other_api):
    first = owner_api.get("webhooks/secret")
    assert first.status_code == HTTPStatus.OK
    body = first.json()
    assert body["secret"].startswith("whsec_")
    assert body["rotated_at"] is None and body["previous_valid_until"] is None
    assert owner_api.get("webhooks/secret/").json()["secret"] == body["secret"]
    assert other_api.get("webhooks/secret").json()["secret"] != body["secret"]


def test_rotate_makes_a_new_secret_and_the_old_one_signs_for_24_hours(owner_api):
    old = owner_api.get("webhooks/secret").json()["secret"]
    response = owner_api.post("webhooks/secret/rotate")
    assert response.status_code == HTTPStatus.OK
    body = response.json()
    assert body["secret"] != old
    rotated = datetime.fromisoformat(body["rotated_at"])
    until = datetime.fromisoformat(body["previous_valid_until"])
    assert until - rotated == timedelta(hours=24)
    assert owner_api.get("webhooks/secret").json()["secret"] == body["secret"]


def test_a_first_rotation_works_without_a_prior_read(owner_api):
    response = owner_api.post("webhooks/secret/rotate")
    assert response.status_code == HTTPStatus.OK
    assert response.json()["secret"].startswith("whsec_")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "webhooks/secret"),
        ("POST", "webhooks/secret/rotate"),
        ("GET", f"generations/{uuid.uuid4()}/deliveries"),
    ],
)
def test_webhook_endpoints_need_a_key(api_as, method, path):
    response = api_as(None).request(method, path)
    assert response.status_code == HTTPStatus.UNAUTHORIZED


def test_the_secret_is_never_in_key_json(owner_api, admin_api, owner_key):
    secret = owner_api.get("webhooks/secret").json()["secret"]
    texts = [
        owner_api.get("keys/me").content,
        admin_api.get("keys").content,
        admin_api.get(f"keys/{owner_key[0].pk}").content,
    ]
    for text in texts:
        assert secret.encode() not in text
        assert b"whsec_" not in text


def emitted(generation, event="generation.completed"):
    return emit(generation, event, url="http://127.0.0.1:9/h")


def test_the_owner_lists_a_jobs_deliveries_newest_first(owner_api, owner_key):
    generation = make_generation(api_key=owner_key[0])
    start = emitted(generation, "generation.start")
    completed = emitted(generation, "generation.completed")
    emitted(make_generation(api_key=owner_key[0]))  # another job's

    response = owner_api.get(f"generations/{generation.pk}/deliveries")

    assert response.status_code == HTTPStatus.OK
    body = response.json()
    assert [d["id"] for d in body["results"]] == [str(completed.pk), str(start.pk)]
    assert set(body["results"][0]) == DELIVERY_FIELDS
    first = body["results"][1]
    assert (first["event"], first["state"], first["attempts"]) == (
        "generation.start",
        "pending",
        0,
    )
    assert body["next"] is None and body["previous"] is None


def test_someone_elses_deliveries_are_not_found(owner_key, other_api, admin_api):
    generation = make_generation(api_key=owner_key[0])
    row = emitted(generation)
    path = f"generations/{generation.pk}/deliveries"
    assert other_api.get(path).status_code == HTTPStatus.NOT_FOUND
    assert (
        other_api.post(f"{path}/{row.pk}/redeliver").status_code == HTTPStatus.NOT_FOUND
    )
    assert admin_api.get(path).status_code == HTTPStatus.OK  # admins see all


def test_a_deleted_jobs_deliveries_are_not_found(owner_api, owner_key):
    generation = make_generation(api_key=owner_key[0])
    emitted(generation)
    assert owner_api.delete(f"generations/{generation.pk}").status_code == 204
    response = owner_api.get(f"generations/{generation.pk}/deliveries")
    assert response.status_code == HTTPStatus.NOT_FOUND


def queued() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = 'webhooks'"
        )
        return cursor.fetchone()[0]


def test_redeliver_queues_one_more_attempt(owner_api, owner_key):
    generation = make_generation(api_key=owner_key[0])
    row = emitted(generation)
    WebhookDelivery.objects.filter(pk=row.pk).update(
        state="failed", attempts=8, next_attempt_at=None
    )
    before = queued()

    response = owner_api.post(
        f"generations/{generation.pk}/deliveries/{row.pk}/redeliver"
    )

    assert response.status_code == HTTPStatus.ACCEPTED
    body = response.json()
    assert (body["id"], body["state"], body["attempts"]) == (str(row.pk), "pending", 8)
    assert queued() == before + 1


def test_redeliver_of_another_jobs_delivery_is_not_found(owner_api, owner_key):
    one = make_generation(api_key=owner_key[0])
    other = emitted(make_generation(api_key=owner_key[0]))
    response = owner_api.post(f"generations/{one.pk}/deliveries/{other.pk}/redeliver")
    assert response.status_code == HTTPStatus.NOT_FOUND


def test_a_malformed_id_is_a_400(owner_api, owner_key):
    generation = make_generation(api_key=owner_key[0])
    bad_job = owner_api.get("generations/not-a-uuid/deliveries")
    bad_delivery = owner_api.post(
        f"generations/{generation.pk}/deliveries/not-a-uuid/redeliver"
    )
    assert bad_job.status_code == HTTPStatus.BAD_REQUEST
    assert "generation_id" in bad_job.json()
    assert bad_delivery.status_code == HTTPStatus.BAD_REQUEST
