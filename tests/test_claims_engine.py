"""The v2 claim (SPEC §5): fair between keys, capped per key, routed by model,
in batches, fenced per job; the per-key counters the database keeps for it.

The concurrent tests commit for real (``transaction=True``): each thread has
its own PostgreSQL connection, as gunicorn threads do.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from http import HTTPStatus

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, Q
from django.db.models.functions import Now
from django.test import Client

from apikeys.models import ApiKey
from generations.claims import generation_claim
from generations.models import NO_KEY, Generation, KeyQueue, Status
from generations.services import (
    generation_cancel,
    generation_complete,
    generation_delete_many,
    generation_fail,
    generation_restore_many,
)
from tests.conftest import ApiClient
from tests.factories import make_api_key, make_generation
from tests.test_claims import in_thread


def queue(api_key: ApiKey | None, jobs: int, *, model: str = "sdxl") -> None:
    """``jobs`` queued jobs of ``api_key``, 1 ms apart, in one INSERT (as a
    bulk load would write them: the counters must follow that too)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO generations (id, prompt, model, api_key_id, created_at)"
            " SELECT gen_random_uuid(), 'job ' || i, %s, %s,"
            " clock_timestamp() + i * interval '1 ms'"
            " FROM generate_series(1, %s) AS i",
            [model, api_key and api_key.pk, jobs],
        )


def capped(api_key: ApiKey, max_running: int | None) -> ApiKey:
    ApiKey.objects.filter(pk=api_key.pk).update(max_running=max_running)
    api_key.refresh_from_db()
    return api_key


def true_counts() -> dict[uuid.UUID, tuple[int, int]]:
    """(queued, running) per key, counted from the generations themselves."""
    rows = (
        Generation.all_objects.values("api_key")
        .annotate(
            queued=Count("pk", filter=Q(status=Status.QUEUED, is_deleted=False)),
            running=Count("pk", filter=Q(status=Status.RUNNING, is_deleted=False)),
        )
        .values_list("api_key", "queued", "running")
    )
    return {
        key or NO_KEY: (queued, running)
        for key, queued, running in rows
        if queued or running
    }


def kept_counts() -> dict[uuid.UUID, tuple[int, int]]:
    return {
        row.api_key_id: (row.queued, row.running)
        for row in KeyQueue.objects.all()
        if row.queued or row.running
    }


# --- The counters the claim reads ---------------------------------------------


def test_the_key_counters_follow_every_path_that_changes_a_job(owner_key, other_key):
    owner, other = owner_key[0], other_key[0]
    queue(owner, 5)
    queue(other, 3, model="flux")
    make_generation(api_key=None)  # the keyless lane
    assert kept_counts() == true_counts()

    jobs = generation_claim(max_jobs=4)
    assert kept_counts() == true_counts()
    generation_complete(pk=jobs[0].pk, lease_token=jobs[0].lease_token, output_path="o")
    generation_fail(pk=jobs[1].pk, lease_token=jobs[1].lease_token)
    generation_cancel(generation=jobs[2])
    assert kept_counts() == true_counts()

    # Bulk paths: a queryset soft delete (live jobs cancelled), restore, a
    # queryset transition, a hard delete, raw SQL.
    generation_delete_many(queryset=Generation.objects.filter(api_key=other))
    generation_restore_many(queryset=Generation.all_objects.filter(api_key=other))
    Generation.objects.filter(pk=jobs[3].pk).transition(Status.QUEUED)
    Generation.objects.filter(api_key=owner, status=Status.QUEUED)[
        :1
    ].get().hard_delete()
    with connection.cursor() as cursor:
        cursor.execute("UPDATE generations SET status = 4 WHERE api_key_id IS NULL")
    assert kept_counts() == true_counts()


@pytest.mark.django_db(transaction=True)
def test_truncating_the_jobs_empties_the_counters():
    queue(make_api_key()[0], 3)
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE generations CASCADE")  # webhook_deliveries too
    assert KeyQueue.objects.count() == 0


def test_the_database_refuses_to_run_a_key_past_its_cap_on_any_path(owner_key):
    owner = capped(owner_key[0], 1)
    queue(owner, 2)
    generation_claim()

    with pytest.raises(IntegrityError, match="max_running"), transaction.atomic():
        Generation.objects.filter(api_key=owner, status=Status.QUEUED).transition(
            Status.RUNNING
        )
    assert true_counts()[owner.pk] == (1, 1)


def test_a_cap_set_later_counts_the_jobs_already_running(owner_key):
    owner = owner_key[0]
    queue(owner, 5)
    generation_claim(max_jobs=3)

    capped(owner, 2)  # below what already runs: no new claim until two finish

    assert generation_claim() == []
    assert KeyQueue.objects.get(pk=owner.pk).max_running == 2


# --- Fair, capped, routed, batched --------------------------------------------


def test_one_keys_backlog_does_not_starve_a_key_that_comes_later(
    admin_api, owner_key, other_key
):
    a, b = owner_key[0], other_key[0]
    queue(a, 1000)
    queue(b, 10)
    bs = {str(pk) for (pk,) in Generation.objects.filter(api_key=b).values_list("pk")}

    claimed = [admin_api.claim_one()["id"] for _ in range(20)]

    assert bs <= set(claimed)
    assert len(set(claimed)) == 20


def test_keys_never_served_go_by_their_oldest_job_then_take_turns(owner_key, other_key):
    late, early = owner_key[0], other_key[0]
    queue(early, 3)
    queue(late, 3)

    owners = [generation_claim()[0].api_key_id for _ in range(6)]

    assert owners == [early.pk, late.pk] * 3


def test_within_a_key_the_oldest_job_goes_first(owner_key):
    queue(owner_key[0], 5)
    oldest_first = list(
        Generation.objects.order_by("created_at", "id").values_list("pk", flat=True)
    )

    assert [generation_claim()[0].pk for _ in range(5)] == oldest_first


def test_a_key_at_its_cap_is_skipped_and_blocks_no_one(owner_key, other_key):
    busy = capped(owner_key[0], 1)
    queue(busy, 50)
    queue(other_key[0], 3)

    claimed = [job.api_key_id for job in generation_claim(max_jobs=10)]

    assert Counter(claimed) == {busy.pk: 1, other_key[0].pk: 3}


def test_a_routed_batch_shares_among_the_keys_with_jobs_of_those_models(
    owner_key, other_key
):
    queue(owner_key[0], 100, model="flux")
    for n in range(10):
        queue(make_api_key(name=f"sdxl client {n}")[0], 100, model="sdxl")

    jobs = generation_claim(max_jobs=10, models=["flux"])

    assert len(jobs) == 10
    assert {job.model for job in jobs} == {"flux"}


def test_a_deleted_running_job_holds_no_slot(owner_key):
    owner = capped(owner_key[0], 1)
    queue(owner, 2)
    stale = generation_claim()[0]
    with connection.cursor() as cursor:  # as a row deleted before v2 could be
        cursor.execute(
            "UPDATE generations SET is_deleted = true WHERE id = %s", [stale.pk]
        )

    assert len(generation_claim()) == 1
    assert kept_counts() == true_counts()


def test_a_batch_is_distinct_jobs_each_with_its_own_lease(admin_api, owner_key):
    queue(owner_key[0], 30)

    response = admin_api.post("generations/claim", {"max": 10, "worker": "gpu-7"})

    jobs = response.json()["jobs"]
    assert len(jobs) == 10
    assert len({job["id"] for job in jobs}) == 10
    assert len({job["lease_token"] for job in jobs}) == 10
    assert {job["claimed_by"] for job in jobs} == {"gpu-7"}
    assert Generation.objects.filter(status=Status.RUNNING).count() == 10


def test_a_batch_is_shared_between_the_keys_with_work(owner_key, other_key):
    queue(owner_key[0], 20)
    queue(other_key[0], 20)

    claimed = Counter(job.api_key_id for job in generation_claim(max_jobs=10))

    assert claimed == {owner_key[0].pk: 5, other_key[0].pk: 5}


def test_models_never_hand_out_another_models_job(admin_api, owner_key, other_key):
    queue(owner_key[0], 5, model="flux")
    queue(other_key[0], 5, model="sdxl")
    queue(None, 2, model="sd3")

    response = admin_api.post(
        "generations/claim", {"max": 50, "models": ["sdxl", "sd3"]}
    )

    assert sorted(job["model"] for job in response.json()["jobs"]) == [
        *["sd3"] * 2,
        *["sdxl"] * 5,
    ]
    nothing = admin_api.post("generations/claim", {"models": ["sdxl", "kandinsky"]})
    assert nothing.status_code == HTTPStatus.NO_CONTENT
    assert Generation.objects.filter(model="flux", status=Status.QUEUED).count() == 5


def test_an_expired_lease_of_another_model_stays_for_its_own_workers(
    admin_api, owner_key
):
    queue(owner_key[0], 1, model="flux")
    job = generation_claim()[0]
    Generation.objects.filter(pk=job.pk).update(lease_expires_at=Now() - timedelta(1))

    assert admin_api.post("generations/claim", {"models": ["sdxl"]}).status_code == 204
    assert admin_api.claim_one(models=["flux"])["id"] == str(job.pk)


def test_claimed_by_is_kept_with_the_lease_and_cleared_with_it(admin_api, owner_key):
    queue(owner_key[0], 1)
    job = admin_api.claim_one(worker="gpu-box-7")

    assert Generation.objects.get(pk=job["id"]).claimed_by == "gpu-box-7"
    assert admin_api.get(f"generations/{job['id']}").json()["claimed_by"] == "gpu-box-7"
    admin_api.post(
        f"generations/{job['id']}/complete",
        {"lease_token": job["lease_token"], "output_path": "o.png"},
    )
    assert Generation.objects.get(pk=job["id"]).claimed_by is None


def test_a_client_never_sees_which_worker_holds_its_job(
    admin_api, owner_api, owner_key
):
    make_generation(api_key=owner_key[0])
    job = admin_api.claim_one(worker="gpu-box-7")

    assert "claimed_by" not in owner_api.get(f"generations/{job['id']}").json()
    listed = owner_api.get("generations").json()["results"]
    assert "claimed_by" not in listed[0]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max": 0}, "max"),
        ({"max": 51}, "max"),
        ({"max": "10"}, "max"),
        ({"models": []}, "models"),
        ({"models": "sdxl"}, "models"),
        ({"models": ["m"] * 21}, "models"),
        ({"models": ["x" * 101]}, "models"),
        ({"models": [None]}, "models"),
        ({"worker": "w" * 101}, "worker"),
        ({"worker": 7}, "worker"),
        ({"workers": "typo"}, "workers"),
    ],
)
def test_a_bad_claim_body_is_400_and_claims_nothing(admin_api, owner_key, body, field):
    queue(owner_key[0], 2)

    response = admin_api.post("generations/claim", body)

    assert response.status_code == HTTPStatus.BAD_REQUEST
    assert field in response.json()
    assert Generation.objects.filter(status=Status.RUNNING).count() == 0


# --- Fencing per job of a batch -----------------------------------------------


def test_a_stale_token_of_one_job_of_a_batch_changes_nothing(admin_api, owner_key):
    queue(owner_key[0], 3)
    first, *others = admin_api.post("generations/claim", {"max": 3}).json()["jobs"]
    Generation.objects.filter(pk=first["id"]).update(
        lease_expires_at=Now() - timedelta(seconds=1)
    )
    again = admin_api.claim_one()  # the expired job, with a new token
    assert again["id"] == first["id"]
    before = {row["id"]: row for row in Generation.objects.values()}

    stale = admin_api.post(
        f"generations/{first['id']}/complete",
        {"lease_token": first["lease_token"], "output_path": "stale.png"},
    )

    assert stale.status_code == HTTPStatus.CONFLICT
    assert stale.json()["code"] == "lease_lost"
    assert {row["id"]: row for row in Generation.objects.values()} == before
    for job in others:
        done = admin_api.post(
            f"generations/{job['id']}/complete",
            {"lease_token": job["lease_token"], "output_path": "o.png"},
        )
        assert done.status_code == HTTPStatus.OK


# --- Under concurrency --------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_sixteen_claimers_never_run_a_capped_key_past_its_cap():
    owner = capped(make_api_key(name="capped")[0], 2)
    queue(owner, 50)
    claimers = 16
    barrier = threading.Barrier(claimers)

    @in_thread
    def claim(_: int) -> list[Generation]:
        barrier.wait()
        return generation_claim()

    def round_of_claims() -> list[Generation]:
        with ThreadPoolExecutor(claimers) as pool:
            return [job for jobs in pool.map(claim, range(claimers)) for job in jobs]

    holding = round_of_claims()
    assert len(holding) == 2
    for _ in range(20):
        done = holding.pop()
        generation_complete(pk=done.pk, lease_token=done.lease_token, output_path="o")
        started = round_of_claims()
        assert len(started) == 1  # exactly the one slot completing freed
        holding += started
        assert Generation.objects.filter(status=Status.RUNNING).count() == 2
    assert kept_counts() == true_counts()


@pytest.mark.django_db(transaction=True)
def test_eight_batch_claimers_drain_2000_jobs_each_exactly_once():
    keys = [make_api_key(name=f"client {n}")[0] for n in range(4)]
    for key in keys:
        queue(key, 500)
    worker = make_api_key(name="worker", is_admin=True, rate_limit=0)[1]
    claimers = 8
    barrier = threading.Barrier(claimers)

    @in_thread
    def drain(n: int) -> list[str]:
        api = ApiClient(Client(), worker)
        barrier.wait()
        taken = []
        while (
            response := api.post("generations/claim", {"max": 10})
        ).status_code == 200:
            taken += [job["id"] for job in response.json()["jobs"]]
        assert response.status_code == HTTPStatus.NO_CONTENT
        return taken

    with ThreadPoolExecutor(claimers) as pool:
        per_claimer = list(pool.map(drain, range(claimers)))

    claimed = [job for jobs in per_claimer for job in jobs]
    assert len(claimed) == 2000
    assert len(set(claimed)) == 2000
    assert Counter(Generation.objects.values_list("status", "attempts")) == {
        (Status.RUNNING, 1): 2000
    }
    assert sum(1 for jobs in per_claimer if jobs) > 1  # they really competed
    assert kept_counts() == true_counts()


@pytest.mark.django_db(transaction=True)
def test_a_claim_and_a_transaction_across_two_keys_do_not_deadlock():
    """A capped key's claim holds no row lock of its counter, so a transaction
    that changes jobs of an uncapped and then of the capped key (in counter
    row order or not) and a claim taking jobs of both never wait in a cycle."""
    capped_key = capped(make_api_key(name="capped")[0], 5)
    open_key = make_api_key(name="open")[0]
    queue(capped_key, 4)
    queue(open_key, 4)
    first_of = {
        key: Generation.objects.filter(api_key=key).order_by("created_at").first()
        for key in (capped_key, open_key)
    }
    holding = threading.Event()
    claimed = threading.Event()
    outcome: dict[str, object] = {}

    @in_thread
    def other_transaction() -> None:
        with transaction.atomic():
            generation_cancel(generation=first_of[open_key])  # locks its counter
            holding.set()
            claimed.wait(2)  # the claim is now waiting on that counter row
            generation_cancel(generation=first_of[capped_key])
        outcome["other"] = "committed"

    @in_thread
    def claim() -> None:
        holding.wait(10)
        timer = threading.Timer(0.5, claimed.set)
        timer.start()
        try:
            outcome["claim"] = len(generation_claim(max_jobs=4))
        except Exception as exc:  # noqa: BLE001 -- reported below
            outcome["claim"] = repr(exc)

    threads = [threading.Thread(target=f) for f in (other_transaction, claim)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert outcome == {"other": "committed", "claim": 4}
    assert kept_counts() == true_counts()


@pytest.mark.django_db(transaction=True)
def test_a_cap_set_while_a_keys_first_jobs_are_queued_holds():
    """The key's counter row is written by whichever commits second, the cap
    or the first jobs: its copy of the cap is the committed one either way."""
    key = make_api_key(name="new client")[0]
    capping = threading.Event()

    @in_thread
    def set_cap() -> None:
        with transaction.atomic():
            ApiKey.objects.filter(pk=key.pk).update(max_running=1)
            capping.set()
            time.sleep(0.5)  # the first jobs are inserted meanwhile

    @in_thread
    def first_jobs() -> None:
        capping.wait(10)
        queue(key, 3)

    threads = [threading.Thread(target=f) for f in (set_cap, first_jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert KeyQueue.objects.get(pk=key.pk).max_running == 1
    assert len(generation_claim(max_jobs=10)) == 1


# --- The claim is a prepared statement ----------------------------------------


def prepared_claims() -> list[tuple[int, int]]:
    """(generic_plans, custom_plans) of this connection's prepared claims."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
            " WHERE statement LIKE %s",
            ["%WITH exhausted AS%"],
        )
        return cursor.fetchall()


def test_a_claim_is_prepared_once_per_connection_and_then_only_executed(owner_key):
    queue(owner_key[0], 12)

    for _ in range(10):
        assert len(generation_claim(max_jobs=1)) == 1

    (plans,) = prepared_claims()
    assert sum(plans) == 10
    assert plans[0] > 0, "PostgreSQL never settled on one plan for every value"
    generation_claim(max_jobs=2)  # another batch size, its own statement
    assert len(prepared_claims()) == 2
