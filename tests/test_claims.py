"""Workers claiming jobs concurrently through the API; leases; idempotent creates.

The concurrent tests commit for real (``transaction=True``): each thread has
its own PostgreSQL connection, as gunicorn threads do.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from http import HTTPStatus

import pytest
from django.db import connection
from django.db.models.functions import Now
from django.test import Client

from generations.models import Generation, Status
from tests.conftest import ApiClient
from tests.factories import make_generation

JOBS = 200
WORKERS = 8


def in_thread(work):
    """Run ``work`` and close the thread's database connection afterwards."""

    def run(*args):
        try:
            return work(*args)
        finally:
            connection.close()

    return run


@pytest.mark.django_db(transaction=True)
def test_concurrent_workers_claim_every_job_exactly_once(admin_key, owner_key):
    for i in range(JOBS):
        make_generation(api_key=owner_key[0], prompt=f"job {i}")
    start = threading.Barrier(WORKERS)

    @in_thread
    def worker(_: int) -> list[str]:
        api = ApiClient(Client(), admin_key[1])
        start.wait()
        claimed = []
        while (response := api.post("generations/claim")).status_code == 200:
            assert response.json()["status"] == "running"
            claimed.append(response.json()["id"])
        assert response.status_code == HTTPStatus.NO_CONTENT
        return claimed

    with ThreadPoolExecutor(WORKERS) as pool:
        per_worker = list(pool.map(worker, range(WORKERS)))

    claimed = [job for jobs in per_worker for job in jobs]
    duplicates = [job for job, n in Counter(claimed).items() if n > 1]
    assert duplicates == []
    assert len(claimed) == JOBS
    assert set(claimed) == {
        str(pk) for pk in Generation.objects.values_list("pk", flat=True)
    }
    assert Counter(Generation.objects.values_list("status", "attempts")) == {
        (Status.RUNNING, 1): JOBS
    }
    assert sum(1 for jobs in per_worker if jobs) > 1  # they really competed


@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_with_one_idempotency_key_make_one_generation(owner_key):
    start = threading.Barrier(WORKERS)

    @in_thread
    def create(_: int):
        api = ApiClient(Client(), owner_key[1])
        start.wait()
        response = api.post(
            "generations", {"prompt": "once"}, headers={"Idempotency-Key": "race-1"}
        )
        return response.status_code, response.json()["id"]

    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(create, range(WORKERS)))

    assert Generation.objects.count() == 1
    assert {pk for _, pk in results} == {str(Generation.objects.get().pk)}
    assert Counter(status for status, _ in results) == {
        HTTPStatus.CREATED: 1,
        HTTPStatus.OK: WORKERS - 1,
    }


def expire_lease(pk) -> None:
    Generation.objects.filter(pk=pk).update(
        lease_expires_at=Now() - timedelta(seconds=1)
    )


def test_an_expired_lease_is_claimed_again_with_attempts_2(admin_api, owner_key):
    job = make_generation(api_key=owner_key[0], prompt="first")
    assert admin_api.post("generations/claim").json()["id"] == str(job.pk)
    make_generation(api_key=owner_key[0], prompt="younger")
    expire_lease(job.pk)

    again = admin_api.post("generations/claim").json()

    assert again["id"] == str(job.pk)  # expired leases come before the queue
    assert again["attempts"] == 2
    assert again["status"] == "running"


def test_a_live_lease_is_not_claimed_again(admin_api, owner_key):
    make_generation(api_key=owner_key[0])
    admin_api.post("generations/claim")

    assert admin_api.post("generations/claim").status_code == HTTPStatus.NO_CONTENT


def test_after_max_attempts_an_expired_job_fails(admin_api, owner_key, settings):
    settings.MAX_ATTEMPTS = 3
    job = make_generation(api_key=owner_key[0])
    for attempt in (1, 2, 3):
        claimed = admin_api.post("generations/claim").json()
        assert (claimed["id"], claimed["attempts"]) == (str(job.pk), attempt)
        expire_lease(job.pk)

    assert admin_api.post("generations/claim").status_code == HTTPStatus.NO_CONTENT

    failed = admin_api.get(f"generations/{job.pk}").json()
    assert failed["status"] == "failed"
    assert failed["attempts"] == 3
    assert "lease expired" in failed["error_message"]
    assert failed["completed_at"] is not None


def test_a_worker_whose_lease_expired_into_failure_gets_409(
    admin_api, owner_key, settings
):
    settings.MAX_ATTEMPTS = 1
    job = make_generation(api_key=owner_key[0])
    admin_api.post("generations/claim")
    expire_lease(job.pk)
    admin_api.post("generations/claim")  # sweeps the expired lease: failed

    response = admin_api.post(f"generations/{job.pk}/complete", {"output_path": "o"})

    assert response.status_code == HTTPStatus.CONFLICT
    assert response.json()["status"] == "failed"
