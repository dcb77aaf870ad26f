"""A job's webhook events from its transitions (SPEC §10, §11): which events,
when, with what payload, written in the transition's own transaction.

The end-to-end test runs the delivery worker as a real process against a real
receiver; the others read the outbox rows the transitions wrote.
"""

from __future__ import annotations

import json
from datetime import timedelta
from http import HTTPStatus

import pytest
from django.db import transaction
from django.db.models.functions import Now

from generations.claims import generation_claim
from generations.models import Generation
from generations.services import generation_cancel
from tests.test_webhook_worker import (  # noqa: F401 -- fixtures
    WAIT_S,
    clean_queue,
    receivers,
    settled,
    start_worker,
)
from tests.webhooks import payload, verifies
from webhooks import services
from webhooks.models import WebhookDelivery

HOOK = "http://127.0.0.1:9/hooks"  # never contacted: no worker runs in these


def events(job_id: str) -> list[tuple[str, str]]:
    """(event, job status in its payload) of a job's deliveries, in order."""
    rows = WebhookDelivery.objects.filter(generation_id=job_id).order_by("created_at")
    return [
        (row.event, json.loads(services.delivery_payload(row))["data"]["status"])
        for row in rows
    ]


def create(api, **body) -> dict:
    response = api.post("generations", {"prompt": "a lighthouse", **body})
    assert response.status_code == HTTPStatus.CREATED, response.content
    return response.json()


@pytest.mark.django_db(transaction=True)
def test_start_and_completed_arrive_signed_over_the_whole_worker_loop(
    api_as,
    start_worker,  # noqa: F811 -- the fixture imported above
    receivers,  # noqa: F811
):
    from tests.factories import make_api_key

    owner, owner_raw = make_api_key(name="owner", rate_limit=0)
    worker_raw = make_api_key(name="gpu", is_worker=True)[1]
    owner_api, worker_api = api_as(owner_raw), api_as(worker_raw)
    receiver = receivers()
    secret = services.webhook_secret_get(api_key=owner).current
    start_worker()
    job = create(owner_api, webhook=receiver.url)
    assert job["webhook"] == receiver.url
    assert job["webhook_events_filter"] == ["start", "completed"]

    claimed = worker_api.claim_one(worker="gpu-1")
    done = worker_api.post(
        f"generations/{job['id']}/complete",
        {"lease_token": claimed["lease_token"], "output_path": "out.png"},
    )
    assert done.status_code == HTTPStatus.OK

    got = receiver.wait_for(2, WAIT_S)
    by_type = {payload(r)["type"]: r for r in got}
    assert set(by_type) == {"generation.start", "generation.completed"}
    for received in got:
        assert verifies(secret, received)
        assert received.headers["content-type"] == "application/json"
        assert received.headers["user-agent"].startswith("lockngen-webhooks/")
    assert payload(by_type["generation.start"])["data"]["status"] == "running"
    # The owner's view: what the owner's GET answers now (no claimed_by).
    final = owner_api.get(f"generations/{job['id']}").json()
    assert payload(by_type["generation.completed"])["data"] == final
    for row in WebhookDelivery.objects.filter(generation_id=job["id"]):
        settled(row, "delivered")


def test_a_first_claim_starts_and_a_finish_completes(owner_api, admin_api):
    job = create(owner_api, webhook=HOOK)

    claimed = admin_api.claim_one()
    admin_api.post(
        f"generations/{job['id']}/fail",
        {"lease_token": claimed["lease_token"], "error_message": "CUDA OOM"},
    )

    assert events(job["id"]) == [
        ("generation.start", "running"),
        ("generation.completed", "failed"),
    ]


def test_a_claim_after_an_expired_lease_starts_nothing_again(owner_api, admin_api):
    job = create(owner_api, webhook=HOOK)
    admin_api.claim_one()
    Generation.objects.filter(pk=job["id"]).update(
        lease_expires_at=Now() - timedelta(seconds=1)
    )

    assert admin_api.claim_one()["attempts"] == 2

    assert events(job["id"]) == [("generation.start", "running")]


def test_a_lease_that_expires_with_no_attempts_left_completes(
    owner_api, admin_api, settings
):
    settings.MAX_ATTEMPTS = 1
    job = create(owner_api, webhook=HOOK)
    admin_api.claim_one()
    Generation.objects.filter(pk=job["id"]).update(
        lease_expires_at=Now() - timedelta(seconds=1)
    )

    assert admin_api.post("generations/claim").status_code == HTTPStatus.NO_CONTENT

    assert events(job["id"]) == [
        ("generation.start", "running"),
        ("generation.completed", "failed"),
    ]


@pytest.mark.parametrize("how", ["cancel", "delete"])
def test_cancelling_or_deleting_a_live_job_completes_it(owner_api, admin_api, how):
    job = create(owner_api, webhook=HOOK)
    admin_api.claim_one()

    if how == "cancel":
        owner_api.post(f"generations/{job['id']}/cancel")
    else:
        owner_api.delete(f"generations/{job['id']}")

    assert events(job["id"])[-1] == ("generation.completed", "cancelled")


def test_deleting_a_finished_job_announces_nothing_more(owner_api, admin_api):
    job = create(owner_api, webhook=HOOK)
    owner_api.post(f"generations/{job['id']}/cancel")

    owner_api.delete(f"generations/{job['id']}")

    assert events(job["id"]) == [("generation.completed", "cancelled")]


def test_the_events_filter_chooses_the_events(owner_api, admin_api):
    job = create(owner_api, webhook=HOOK, webhook_events_filter=["completed"])
    assert job["webhook_events_filter"] == ["completed"]
    claimed = admin_api.claim_one()
    admin_api.post(
        f"generations/{job['id']}/complete",
        {"lease_token": claimed["lease_token"], "output_path": "o.png"},
    )

    assert events(job["id"]) == [("generation.completed", "completed")]


def test_a_job_without_a_webhook_announces_nothing(owner_api, admin_api):
    job = create(owner_api)
    admin_api.claim_one()
    owner_api.post(f"generations/{job['id']}/cancel")

    assert events(job["id"]) == []


def test_a_transition_that_rolls_back_announces_nothing(owner_api):
    job = create(owner_api, webhook=HOOK)

    with pytest.raises(RuntimeError), transaction.atomic():
        generation_cancel(generation=Generation.objects.get(pk=job["id"]))
        assert len(events(job["id"])) == 1  # written in the transition's transaction
        raise RuntimeError("the transaction around the cancel fails")

    assert events(job["id"]) == []
    assert Generation.objects.get(pk=job["id"]).status == 0


def test_a_claim_that_rolls_back_starts_nothing(owner_api):
    job = create(owner_api, webhook=HOOK)

    with pytest.raises(RuntimeError), transaction.atomic():
        assert generation_claim()
        raise RuntimeError("the worker's transaction fails")

    assert events(job["id"]) == []


def test_the_idempotency_fingerprint_covers_the_webhook(owner_api):
    headers = {"Idempotency-Key": "hooked-1"}
    first = owner_api.post(
        "generations", {"prompt": "p", "webhook": HOOK}, headers=headers
    )
    other = owner_api.post(
        "generations",
        {"prompt": "p", "webhook": "http://127.0.0.1:10/else"},
        headers=headers,
    )

    assert first.status_code == HTTPStatus.CREATED
    assert other.status_code == HTTPStatus.UNPROCESSABLE_ENTITY
    assert Generation.objects.count() == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/h",
        "https://127.0.0.1/h",
        "https://[::1]/h",
        "https://10.0.0.7/h",
        "https://169.254.169.254/latest/meta-data",
        "https://[fd00::1]/h",
        "https://user:pw@example.com/h",
        "https://example.com/" + "x" * 2000,
    ],
)
def test_production_refuses_a_webhook_that_could_reach_inside(owner_api, settings, url):
    settings.PRODUCTION = True
    settings.WEBHOOK_ALLOW_PRIVATE = False

    response = owner_api.post("generations", {"prompt": "p", "webhook": url})

    assert response.status_code == HTTPStatus.BAD_REQUEST
    assert set(response.json()) == {"webhook"}
    assert Generation.objects.count() == 0


@pytest.mark.sqlite_smoke
def test_without_postgresql_a_webhook_is_refused_naming_database_url(
    owner_api, settings
):
    settings.DATABASE_FALLBACK = True  # what the SQLite fallback sets

    response = owner_api.post("generations", {"prompt": "p", "webhook": HOOK})

    assert response.status_code == HTTPStatus.BAD_REQUEST
    assert "DATABASE_URL" in response.json()["webhook"][0]
    assert Generation.objects.count() == 0
    assert owner_api.post("generations", {"prompt": "p"}).status_code == 201
