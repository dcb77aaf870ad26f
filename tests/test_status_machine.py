"""The status machine of SPEC §3 and the lifecycle services built on it."""

from __future__ import annotations

import itertools
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import F
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext

from generations.models import Generation, InvalidTransition, Status
from generations.services import (
    LeaseLost,
    generation_cancel,
    generation_complete,
    generation_fail,
    generation_heartbeat,
)
from tests.factories import claim_one, make_generation

pytestmark = pytest.mark.django_db

ALLOWED = {
    (Status.QUEUED, Status.RUNNING),
    (Status.RUNNING, Status.QUEUED),
    (Status.QUEUED, Status.CANCELLED),
    (Status.RUNNING, Status.COMPLETED),
    (Status.RUNNING, Status.FAILED),
    (Status.RUNNING, Status.CANCELLED),
}
PAIRS = list(itertools.product(Status, Status))


def pair_id(pair: tuple[Status, Status]) -> str:
    return f"{pair[0].label}->{pair[1].label}"


def generation_in(status: Status) -> Generation:
    generation = make_generation()
    values = {"status": status}
    if status != Status.QUEUED:
        values |= {"started_at": Now(), "attempts": 1}
    if status == Status.RUNNING:
        values["lease_expires_at"] = Now() + timedelta(minutes=5)
        values["lease_token"] = uuid.uuid4()
    if status in Status.terminal():
        values["completed_at"] = Now()
    Generation.all_objects.filter(pk=generation.pk).update(**values)
    generation.refresh_from_db()
    return generation


@pytest.mark.parametrize(
    ("source", "target"), sorted(ALLOWED), ids=[pair_id(p) for p in sorted(ALLOWED)]
)
def test_allowed_transition_is_applied(source, target):
    generation = generation_in(source)

    fields = generation.transition_to(target, lease_seconds=60)
    generation.save(update_fields=fields)
    generation.refresh_from_db()

    assert generation.status == target
    assert generation.updated_at is not None


FORBIDDEN = [pair for pair in PAIRS if pair not in ALLOWED]


@pytest.mark.parametrize(
    ("source", "target"), FORBIDDEN, ids=[pair_id(pair) for pair in FORBIDDEN]
)
def test_forbidden_transition_raises_and_changes_nothing(source, target):
    generation = generation_in(source)

    with pytest.raises(InvalidTransition):
        generation.transition_to(target)

    assert Generation.objects.filter(pk=generation.pk).transition(target) == 0
    assert Generation.objects.get(pk=generation.pk).status == source


def test_bulk_transition_moves_only_rows_that_may_move():
    queued, running, done = (
        generation_in(Status.QUEUED),
        generation_in(Status.RUNNING),
        generation_in(Status.COMPLETED),
    )

    moved = Generation.objects.filter(
        pk__in=[queued.pk, running.pk, done.pk]
    ).transition(Status.CANCELLED)

    assert moved == 2
    assert Generation.objects.get(pk=done.pk).status == Status.COMPLETED


def test_transition_timestamps_come_from_the_database_clock():
    make_generation()

    with CaptureQueriesContext(connection) as ctx:
        claim_one()

    update = next(
        q["sql"] for q in ctx.captured_queries if "UPDATE" in q["sql"].upper()
    )
    assert "statement_timestamp()" in update.lower()
    assert "now()" not in update.lower()  # the transaction's start, not the claim's


def test_claim_sets_started_at_lease_and_attempts(settings):
    settings.LEASE_SECONDS = 120
    generation = make_generation()

    claimed = claim_one()

    assert claimed.pk == generation.pk
    assert claimed.status == Status.RUNNING
    assert claimed.attempts == 1
    assert claimed.updated_at == claimed.started_at
    assert claimed.lease_expires_at == claimed.started_at + timedelta(seconds=120)


def test_claim_takes_the_oldest_queued_job_and_skips_deleted_ones():
    deleted = make_generation(name="deleted")
    oldest = make_generation(name="oldest")
    make_generation(name="newer")
    deleted.delete()

    assert claim_one().pk == oldest.pk


def test_claim_returns_none_when_nothing_is_queued():
    generation_in(Status.COMPLETED)

    assert claim_one() is None


def test_complete_sets_completed_at_duration_and_output():
    generation = generation_in(Status.RUNNING)
    Generation.objects.filter(pk=generation.pk).update(
        started_at=Now() - timedelta(seconds=3)
    )

    done = generation_complete(
        pk=generation.pk,
        lease_token=generation.lease_token,
        output_path="out/1.png",
        thumbnail_path="out/1.jpg",
    )

    assert done.status == Status.COMPLETED
    assert (done.output_path, done.thumbnail_path) == ("out/1.png", "out/1.jpg")
    assert (done.lease_expires_at, done.lease_token) == (None, None)
    assert done.completed_at >= done.created_at
    elapsed_ms = (done.completed_at - done.started_at) / timedelta(milliseconds=1)
    assert abs(done.duration_ms - elapsed_ms) <= 1
    assert done.duration_ms >= 3000


def test_fail_records_the_error():
    running = generation_in(Status.RUNNING)
    failed = generation_fail(
        pk=running.pk,
        lease_token=running.lease_token,
        error_message="CUDA out of memory",
    )

    assert failed.status == Status.FAILED
    assert failed.error_message == "CUDA out of memory"
    assert failed.duration_ms is not None


def test_cancelling_a_queued_job_has_no_duration():
    cancelled = generation_cancel(generation=make_generation())

    assert cancelled.status == Status.CANCELLED
    assert cancelled.completed_at is not None
    assert cancelled.duration_ms is None


def test_duration_is_capped_instead_of_overflowing_integer():
    generation = generation_in(Status.RUNNING)
    Generation.objects.filter(pk=generation.pk).update(
        started_at=Now() - timedelta(days=30)
    )

    assert generation_cancel(generation=generation).duration_ms == 2**31 - 1


@pytest.mark.parametrize(
    "terminal",
    sorted(Status.terminal() - {Status.CANCELLED}),
    ids=lambda status: status.label,
)
def test_services_refuse_to_move_terminal_jobs(terminal):
    generation = generation_in(terminal)

    with pytest.raises(InvalidTransition):
        generation_cancel(generation=generation)
    token = uuid.uuid4()  # no token is current once a job is finished
    with pytest.raises(InvalidTransition):
        generation_complete(pk=generation.pk, lease_token=token, output_path="x")
    with pytest.raises(InvalidTransition):
        generation_heartbeat(pk=generation.pk, lease_token=token)


def test_heartbeat_extends_the_lease():
    generation = generation_in(Status.RUNNING)
    Generation.objects.filter(pk=generation.pk).update(lease_expires_at=F("started_at"))
    before = Generation.objects.get(pk=generation.pk).lease_expires_at

    beat = generation_heartbeat(pk=generation.pk, lease_token=generation.lease_token)
    assert beat.lease_expires_at > before


def test_heartbeat_on_a_cancelled_job_returns_it_so_its_worker_stops():
    make_generation()
    held = claim_one()
    generation_cancel(generation=held)

    beat = generation_heartbeat(pk=held.pk, lease_token=held.lease_token)
    assert (beat.status, beat.lease_token) == (Status.CANCELLED, held.lease_token)
    assert beat.lease_expires_at is None  # told, not extended


def test_heartbeat_on_a_cancelled_job_with_another_token_is_lease_lost():
    """Only the cancelled job's last holder is told (SPEC §5): another
    worker's token, or one never issued, learns nothing of it."""
    make_generation()
    held = claim_one()
    generation_cancel(generation=held)
    queued_then_cancelled = generation_cancel(generation=make_generation())

    for pk, token in [
        (held.pk, uuid.uuid4()),
        (queued_then_cancelled.pk, uuid.uuid4()),
        (queued_then_cancelled.pk, held.lease_token),
    ]:
        with pytest.raises(LeaseLost):
            generation_heartbeat(pk=pk, lease_token=token)


def test_heartbeat_on_a_queued_job_is_lease_lost():
    with pytest.raises(LeaseLost):
        generation_heartbeat(pk=make_generation().pk, lease_token=uuid.uuid4())


def expire_lease(generation: Generation) -> None:
    Generation.objects.filter(pk=generation.pk).update(
        lease_expires_at=Now() - timedelta(seconds=1)
    )


def test_expired_lease_is_claimed_again_then_fails_after_max_attempts(settings):
    settings.MAX_ATTEMPTS = 3
    generation = make_generation()

    first = claim_one()
    expire_lease(first)
    second = claim_one()
    assert (second.pk, second.status, second.attempts) == (
        generation.pk,
        Status.RUNNING,
        2,
    )
    expire_lease(second)
    third = claim_one()
    assert third.attempts == 3
    expire_lease(third)

    assert claim_one() is None
    failed = Generation.objects.get(pk=generation.pk)
    assert failed.status == Status.FAILED
    assert failed.attempts == 3
    assert "lease expired" in failed.error_message
    assert failed.completed_at is not None


def test_an_expired_lease_goes_before_the_queue_head():
    stuck = make_generation(name="stuck")
    claim_one()
    make_generation(name="waiting")
    expire_lease(stuck)

    assert claim_one().pk == stuck.pk
