"""Workers claiming jobs concurrently through the API; leases; idempotent creates.

The concurrent tests commit for real (``transaction=True``): each thread has
its own PostgreSQL connection, as gunicorn threads do.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from http import HTTPStatus

import psycopg
import pytest
from django.db import connection
from django.db.models.functions import Now
from django.test import Client
from django.test.utils import CaptureQueriesContext

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
            (job,) = response.json()["jobs"]
            assert job["status"] == "running"
            claimed.append(job["id"])
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


@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_with_one_key_and_two_bodies_are_decided_once(owner_key):
    threads = 16
    start = threading.Barrier(threads)

    @in_thread
    def create(n: int):
        api = ApiClient(Client(), owner_key[1])
        start.wait()
        response = api.post(
            "generations",
            {"prompt": "a cat" if n % 2 else "a dog"},
            headers={"Idempotency-Key": "race-2"},
        )
        return n % 2, response.status_code, response.json()

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(create, range(threads)))

    winner = Generation.objects.get()  # exactly one row
    won = 1 if winner.prompt == "a cat" else 0
    assert Counter((body == won, status) for body, status, _ in results) == {
        (True, HTTPStatus.CREATED): 1,
        (True, HTTPStatus.OK): threads // 2 - 1,
        (False, HTTPStatus.UNPROCESSABLE_ENTITY): threads // 2,
    }
    for _, status, reply in results:
        if status == HTTPStatus.UNPROCESSABLE_ENTITY:
            assert reply["code"] == "idempotency_key_reused"
        else:
            assert reply["id"] == str(winner.pk)


def expire_lease(pk) -> None:
    Generation.objects.filter(pk=pk).update(
        lease_expires_at=Now() - timedelta(seconds=1)
    )


def test_a_live_lease_is_not_claimed_again(admin_api, owner_key):
    make_generation(api_key=owner_key[0])
    admin_api.post("generations/claim")

    assert admin_api.post("generations/claim").status_code == HTTPStatus.NO_CONTENT


def test_a_worker_whose_lease_expired_into_failure_gets_409(
    admin_api, owner_key, settings
):
    settings.MAX_ATTEMPTS = 1
    job = make_generation(api_key=owner_key[0])
    token = admin_api.claim_one()["lease_token"]
    expire_lease(job.pk)
    admin_api.post("generations/claim")  # sweeps the expired lease: failed

    response = admin_api.post(
        f"generations/{job.pk}/complete", {"lease_token": token, "output_path": "o"}
    )

    assert response.status_code == HTTPStatus.CONFLICT
    assert response.json()["status"] == "failed"


# --- Fencing (SPEC §5): a worker that stalled past its lease changes nothing ---


def body_of(verb: str, token: str | None) -> dict:
    body = {"output_path": f"{verb}.png"} if verb == "complete" else {}
    return body if token is None else {"lease_token": token, **body}


def test_a_stale_worker_cannot_touch_the_job_its_successor_holds(
    admin_api, owner_api, owner_key
):
    job = make_generation(api_key=owner_key[0])
    worker_a = admin_api.claim_one()
    expire_lease(job.pk)  # A stalls past its lease
    worker_b = admin_api.claim_one()
    assert (worker_b["id"], worker_b["attempts"]) == (str(job.pk), 2)
    assert worker_b["lease_token"] != worker_a["lease_token"]
    held_by_b = Generation.objects.values().get(pk=job.pk)

    for verb in ("heartbeat", "complete", "fail"):
        stale = admin_api.post(
            f"generations/{job.pk}/{verb}", body_of(verb, worker_a["lease_token"])
        )
        assert stale.status_code == HTTPStatus.CONFLICT, verb
        assert stale.json()["code"] == "lease_lost", verb
        assert Generation.objects.values().get(pk=job.pk) == held_by_b, verb

    for verb in ("heartbeat", "complete", "fail"):
        missing = admin_api.post(f"generations/{job.pk}/{verb}", body_of(verb, None))
        assert missing.status_code == HTTPStatus.BAD_REQUEST, verb
        assert "lease_token" in missing.json(), verb
    assert Generation.objects.values().get(pk=job.pk) == held_by_b

    beat = admin_api.post(
        f"generations/{job.pk}/heartbeat", body_of("heartbeat", worker_b["lease_token"])
    )
    assert beat.status_code == HTTPStatus.OK
    assert beat.json()["lease_token"] == worker_b["lease_token"]
    done = admin_api.post(
        f"generations/{job.pk}/complete", body_of("complete", worker_b["lease_token"])
    )
    assert done.status_code == HTTPStatus.OK
    assert (done.json()["status"], done.json()["output_path"]) == (
        "completed",
        "complete.png",
    )

    # Nothing a client or admin reads shows a token.
    for api in (owner_api, admin_api):
        assert "lease_token" not in api.get(f"generations/{job.pk}").json()
        assert all(
            "lease_token" not in g for g in api.get("generations").json()["results"]
        )


@pytest.mark.parametrize("token", ["not-a-uuid", 42, None], ids=["text", "int", "null"])
def test_a_malformed_lease_token_is_400_and_changes_nothing(
    admin_api, owner_key, token
):
    job = make_generation(api_key=owner_key[0])
    admin_api.post("generations/claim")
    before = Generation.objects.values().get(pk=job.pk)

    response = admin_api.post(f"generations/{job.pk}/heartbeat", {"lease_token": token})

    assert response.status_code == HTTPStatus.BAD_REQUEST
    assert "lease_token" in response.json()
    assert Generation.objects.values().get(pk=job.pk) == before


def test_every_claim_hands_out_a_fresh_token_and_a_requeue_clears_it(
    admin_api, owner_api, owner_key
):
    """A cancel (or a delete, which cancels) keeps the holder's token, so
    that holder alone is told the job was cancelled; going back to the queue
    clears it."""
    jobs = [make_generation(api_key=owner_key[0]) for _ in range(3)]
    claimed = {
        job["id"]: job["lease_token"] for job in (admin_api.claim_one() for _ in jobs)
    }
    assert len(set(claimed.values())) == 3  # one per claim, never shared

    owner_api.post(f"generations/{jobs[0].pk}/cancel")
    owner_api.delete(f"generations/{jobs[1].pk}")
    expire_lease(jobs[2].pk)
    Generation.objects.filter(pk=jobs[2].pk).transition(Status.QUEUED)

    stored = dict(Generation.all_objects.values_list("id", "lease_token"))
    assert {str(pk): token and str(token) for pk, token in stored.items()} == {
        str(jobs[0].pk): claimed[str(jobs[0].pk)],
        str(jobs[1].pk): claimed[str(jobs[1].pk)],
        str(jobs[2].pk): None,
    }


@pytest.fixture
def warm_admin(admin_api):
    """The key's ``last_used_at`` was just written: requests now skip that write."""
    admin_api.get("keys/me")
    return admin_api


@pytest.mark.parametrize("verb", ["heartbeat", "complete"])
def test_fenced_heartbeat_and_complete_are_one_update_each(warm_admin, owner_key, verb):
    job = make_generation(api_key=owner_key[0])
    claimed = warm_admin.claim_one()

    with CaptureQueriesContext(connection) as queries:
        response = warm_admin.post(
            f"generations/{job.pk}/{verb}", body_of(verb, claimed["lease_token"])
        )

    assert response.status_code == HTTPStatus.OK
    statements = [
        q["sql"]
        for q in queries
        if not q["sql"].upper().startswith(("SAVEPOINT", "RELEASE SAVEPOINT"))
    ]
    updates = [sql for sql in statements if sql.startswith("UPDATE")]
    assert len(updates) == 1, statements
    assert '"lease_token" =' in updates[0].split("WHERE", 1)[1], updates[0]
    assert not any("FOR UPDATE" in sql for sql in statements), statements
    # the key lookup, the fenced UPDATE, and reading back what it wrote
    assert len(statements) <= 3, statements


# --- PATCH is a locked update (SPEC §11) ------------------------------------------


def wait_for_a_lock_wait(database_url: str, timeout: float = 10.0) -> None:
    """Return once some session of this database waits for a row lock."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as probe:
        while time.monotonic() < deadline:
            waiting = probe.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()[0]
            if waiting:
                return
            time.sleep(0.02)
    pytest.fail("the PATCH never waited for the row lock")


@pytest.mark.django_db(transaction=True)
def test_a_patch_racing_a_delete_is_404_and_writes_nothing(
    owner_key, test_database_url
):
    from django.db import transaction

    from generations.services import generation_delete

    generation = make_generation(api_key=owner_key[0], name="before")
    deleted, release = threading.Event(), threading.Event()

    @in_thread
    def delete() -> None:
        # DELETE's transaction stays open (row locked) until the PATCH waits.
        with transaction.atomic():
            generation_delete(generation=generation)
            deleted.set()
            assert release.wait(15)

    @in_thread
    def patch():
        assert deleted.wait(15)
        api = ApiClient(Client(), owner_key[1])
        return api.patch(f"generations/{generation.pk}", {"name": "after"})

    with ThreadPoolExecutor(2) as pool:
        deleting = pool.submit(delete)
        patching = pool.submit(patch)
        assert deleted.wait(15)
        try:
            wait_for_a_lock_wait(test_database_url)
        finally:
            release.set()
        deleting.result(15)
        response = patching.result(15)

    assert response.status_code == HTTPStatus.NOT_FOUND
    stored = Generation.all_objects.get(pk=generation.pk)
    assert (stored.is_deleted, stored.name) == (True, "before")
