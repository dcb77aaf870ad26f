"""Webhooks in process (SPEC §10): the outbox write, one attempt at a time
against a real receiver on 127.0.0.1, signatures, rotation, the guard at
send time. The worker itself runs in tests/test_webhook_worker.py."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection, transaction
from django.db.models.functions import Now

from generations.api import OUTPUT, generation_json
from generations.models import Generation
from tests.factories import make_api_key, make_generation
from tests.receiver import Receiver
from tests.serving import BASE_DIR, free_port
from tests.webhooks import emit, job_of, payload, verifies
from webhooks import services
from webhooks.models import DeliveryState, WebhookDelivery, WebhookSecret

pytestmark = pytest.mark.django_db


@pytest.fixture
def receiver():
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def key():
    api_key, _ = make_api_key(name="hooks", rate_limit=0)
    return api_key


def queued_jobs() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = 'webhooks'"
        )
        return cursor.fetchone()[0]


def emitted(generation, event="generation.completed", url="http://x.invalid/", **kw):
    return emit(generation, event, url=url, **kw)


def test_emit_writes_the_delivery_and_its_job_in_the_callers_transaction(key):
    generation = make_generation(api_key=key, webhook="http://x.invalid/")
    before = queued_jobs()

    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), transaction.atomic():
        (delivery_id,) = services.emit([generation.pk], "generation.start")
        assert WebhookDelivery.objects.get().pk == delivery_id
        assert queued_jobs() == before + 1
        raise Rollback

    assert WebhookDelivery.objects.count() == 0
    assert queued_jobs() == before

    row = emitted(generation, "generation.start")
    assert WebhookDelivery.objects.get().pk == row.pk
    assert queued_jobs() == before + 1


JOB_COLUMNS = (
    "queue_name, task_name, priority, lock, queueing_lock, args, status, "
    "scheduled_at, attempts, abort_requested, worker_id"
)


def test_emits_one_statement_writes_what_the_orm_and_deliver_defer_would(key):
    from webhooks.tasks import deliver

    generation = make_generation(api_key=key, webhook="http://x.invalid/")
    with transaction.atomic():
        (delivery_id,) = services.emit([generation.pk], "generation.completed")
        # The job procrastinate's own defer writes for the same delivery.
        deliver.defer(delivery_id=str(delivery_id), redelivery=False)

    fields = [field.attname for field in WebhookDelivery._meta.concrete_fields]
    row = WebhookDelivery.objects.get(pk=delivery_id)
    orm = WebhookDelivery(
        generation_id=generation.pk,
        event="generation.completed",
        url="http://x.invalid/",
        snapshot=row.snapshot,
    )
    # What the ORM would have stored, but for the id and the clock (the
    # first attempt is due at once, on the statement's clock).
    clock = {"id": row.id, "created_at": row.created_at}
    expected = {f: getattr(orm, f) for f in fields} | clock
    assert {f: getattr(row, f) for f in fields} == expected | {
        "next_attempt_at": row.created_at
    }
    assert (row.state, row.attempts, row.last_status) == ("pending", 0, "")
    # No payload yet: the job as the transition left it, but for what its
    # owner never sees.
    assert row.payload is None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT to_jsonb(g) FROM generations g WHERE id = %s", [row.generation_id]
        )
        whole = json.loads(cursor.fetchone()[0])
    seen = {Generation._meta.get_field(name).column for name in OUTPUT}
    assert {"lease_token", "claimed_by", "idempotency_key"} <= set(whole) - seen
    assert row.snapshot == {k: v for k, v in whole.items() if k in seen}
    body = json.loads(services.delivery_payload(row))
    assert (body["type"], body["data"]) == (
        "generation.completed",
        generation_json(generation),
    )

    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {JOB_COLUMNS}, count(*) FROM procrastinate_jobs "  # noqa: S608
            "WHERE args ->> 'delivery_id' = %s GROUP BY " + JOB_COLUMNS,
            [str(row.pk)],
        )
        jobs = cursor.fetchall()
    # Two jobs, one from emit and one from deliver.defer(), identical.
    assert len(jobs) == 1 and jobs[0][-1] == 2
    queue, task, priority, lock, queueing_lock, args, status, *_ = jobs[0]
    assert (queue, task, priority, lock, queueing_lock, status) == (
        "webhooks",
        "webhooks.deliver",
        0,
        None,
        None,
        "todo",
    )
    assert json.loads(args) == {"delivery_id": str(row.pk), "redelivery": False}
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT e.type::text, count(*) FROM procrastinate_events e "
            "JOIN procrastinate_jobs j ON j.id = e.job_id "
            "WHERE j.args ->> 'delivery_id' = %s GROUP BY 1",
            [str(row.pk)],
        )
        # procrastinate's insert trigger ran for both.
        assert cursor.fetchall() == [("deferred", 2)]


def test_one_statement_emits_for_many_jobs_and_skips_those_without_a_webhook(key):
    hooked = [
        make_generation(api_key=key, webhook=f"http://x.invalid/{n}") for n in range(3)
    ]
    bare = make_generation(api_key=key)
    with transaction.atomic():
        ids = services.emit([job.pk for job in [*hooked, bare]], "generation.start")
    rows = WebhookDelivery.objects.filter(pk__in=ids)
    assert sorted((row.generation_id, row.url) for row in rows) == sorted(
        (job.pk, job.webhook) for job in hooked
    )
    jobs = {job_of(row) for row in rows}
    assert len(jobs) == 3 and None not in jobs  # a procrastinate job each


def test_emit_reading_reads_the_job_back_as_the_orm_does(key):
    hooked = make_generation(api_key=key, webhook="http://x.invalid/", seed=2**40)
    bare = make_generation(api_key=key, guidance=0.1, negative_prompt="blur")
    for job in (hooked, bare):
        with transaction.atomic():
            read = services.emit_reading(job.pk, "generation.completed")
        orm = Generation.objects.get(pk=job.pk)
        assert read.get_deferred_fields() == set()
        assert [getattr(read, f.attname) for f in Generation._meta.concrete_fields] == [
            getattr(orm, f.attname) for f in Generation._meta.concrete_fields
        ]
    (row,) = WebhookDelivery.objects.all()
    assert row.generation_id == hooked.pk


def test_the_payload_made_from_a_snapshot_is_the_owners_view_of_the_row(key):
    """Every field type of the job through ``to_jsonb`` and back: floats,
    big integers, text with quotes and non-ASCII, NULLs, timestamps with and
    without microseconds."""
    generation = make_generation(
        api_key=key,
        webhook="http://x.invalid/",
        name='the "north" tower — ☾',
        guidance=0.1,
        seed=2**53 + 1,
        negative_prompt=None,
        model="flux",
    )
    Generation.objects.filter(pk=generation.pk).update(
        started_at=datetime(2026, 12, 2, 9, 0, tzinfo=UTC),
        error_message="ünïcode\n",
    )
    row = emitted(generation, "generation.start")
    job = Generation.objects.get(pk=generation.pk)
    body = json.loads(services.delivery_payload(row))
    assert body == {
        "type": "generation.start",
        "timestamp": "2026-12-02T09:00:00+00:00",
        "data": generation_json(job),
    }
    # A column the snapshot lacks (one added after it was taken): its default.
    assert row.snapshot["model"] == "flux"
    del row.snapshot["model"]
    assert json.loads(services.delivery_payload(row))["data"]["model"] == "sdxl"


def test_an_attempt_sends_the_payload_kept_before_it_and_keeps_it(key, receiver):
    """An attempt that finds a payload kept already (another attempt made it
    first) sends those bytes and does not replace them."""
    row = emitted(make_generation(api_key=key), url=receiver.url)
    kept = services.delivery_payload(row).replace('"queued"', '"kept"')
    WebhookDelivery.objects.filter(pk=row.pk).update(payload=kept)

    assert services.delivery_attempt(delivery_id=row.pk).state == "delivered"

    (got,) = receiver.wait_for(1)
    assert got.body.decode() == kept
    row.refresh_from_db()
    assert (row.payload, row.snapshot) == (kept, None)


def test_emit_refuses_to_run_outside_a_transaction(key):
    generation = make_generation(api_key=key)
    # pytest-django's test transaction is an atomic block: leave it for real.
    with pytest.raises(RuntimeError, match="inside the transition"):
        connection.in_atomic_block = False
        try:
            services.emit([generation.pk], "generation.start")
        finally:
            connection.in_atomic_block = True


@pytest.mark.parametrize(
    ("event", "events_filter", "url", "with_key", "sent"),
    [
        ("generation.start", None, "http://x.invalid/", True, True),
        ("generation.completed", ["completed"], "http://x.invalid/", True, True),
        ("generation.start", ["completed"], "http://x.invalid/", True, False),
        ("generation.completed", ["start"], "http://x.invalid/", True, False),
        ("generation.completed", [], "http://x.invalid/", True, False),
        ("generation.completed", None, None, True, False),
        ("generation.completed", None, "http://x.invalid/", False, False),
    ],
    ids=[
        "default-both",
        "completed-wanted",
        "start-not-wanted",
        "completed-not-wanted",
        "empty-filter",
        "no-webhook",
        "no-key",
    ],
)
def test_emit_follows_the_jobs_filter_and_skips_keyless_jobs(
    key, event, events_filter, url, with_key, sent
):
    generation = make_generation(api_key=key if with_key else None)
    row = emitted(generation, event, url=url, events_filter=events_filter)
    assert (row is not None) == sent
    assert WebhookDelivery.objects.count() == int(sent)


def test_emit_is_unavailable_on_the_sqlite_fallback(key, settings):
    settings.DATABASE_FALLBACK = True
    generation = make_generation(api_key=key)
    with pytest.raises(services.WebhooksUnavailable, match="DATABASE_URL"):
        emitted(generation)


def test_a_delivery_is_signed_and_carries_the_owners_view_of_the_job(key, receiver):
    generation = make_generation(api_key=key, name="dusk")
    row = emitted(generation, url=receiver.url)

    result = services.delivery_attempt(delivery_id=row.pk)

    assert result.state == DeliveryState.DELIVERED
    (got,) = receiver.wait_for(1)
    secret = services.webhook_secret_get(api_key=key).current
    assert verifies(secret, got)
    assert not verifies(services.delivery.new_secret(), got)
    assert got.headers["webhook-id"] == str(row.pk)
    assert got.headers["content-type"] == "application/json"
    assert got.headers["user-agent"].startswith("lockngen-webhooks/")
    assert got.path == "/hooks/lockngen"
    body = payload(got)
    assert body["type"] == "generation.completed"
    assert body["data"] == generation_json(generation)
    assert "claimed_by" not in body["data"] and "lease_token" not in body["data"]
    row.refresh_from_db()
    # The body it sent is kept; the snapshot it was made from is gone.
    assert (row.payload, row.snapshot) == (got.body.decode(), None)
    assert (row.state, row.attempts, row.last_status) == ("delivered", 1, "200")
    assert row.delivered_at is not None and row.next_attempt_at is None


def test_a_delivered_attempt_is_one_read_and_one_write(
    key, receiver, django_assert_num_queries
):
    services.webhook_secret_get(api_key=key)  # made on the key's first delivery
    row = emitted(make_generation(api_key=key), url=receiver.url)
    with django_assert_num_queries(2):  # delivery + secrets; the UPDATE
        result = services.delivery_attempt(delivery_id=row.pk)
    assert result == services.AttemptResult(state="delivered", retry_at=None)
    row.refresh_from_db()
    assert (row.state, row.attempts, row.last_status) == ("delivered", 1, "200")
    assert row.delivered_at == row.last_attempt_at is not None


def test_a_tampered_body_does_not_verify(key, receiver):
    row = emitted(make_generation(api_key=key), url=receiver.url)
    services.delivery_attempt(delivery_id=row.pk)
    (got,) = receiver.wait_for(1)
    secret = services.webhook_secret_get(api_key=key).current
    tampered = type(got)(got.path, got.headers, got.body.replace(b"queued", b"complet"))
    assert verifies(secret, got)
    assert not verifies(secret, tampered)


def test_the_second_key_has_its_own_secret(key):
    other, _ = make_api_key(name="other", rate_limit=0)
    mine = services.webhook_secret_get(api_key=key).current
    assert mine.startswith("whsec_") and len(mine) == 6 + 44
    assert services.webhook_secret_get(api_key=key).current == mine  # kept
    assert services.webhook_secret_get(api_key=other).current != mine


def test_during_the_overlap_both_secrets_verify_and_after_it_only_the_new(
    key, receiver
):
    old = services.webhook_secret_get(api_key=key).current
    new = services.webhook_secret_rotate(api_key=key).current
    assert new != old

    row = emitted(make_generation(api_key=key), url=receiver.url)
    services.delivery_attempt(delivery_id=row.pk)
    (during,) = receiver.wait_for(1)
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    assert verifies(new, during)
    assert verifies(old, during)

    WebhookSecret.objects.filter(api_key=key).update(
        rotated_at=Now() - timedelta(hours=24, seconds=1)
    )
    row = emitted(make_generation(api_key=key), url=receiver.url)
    services.delivery_attempt(delivery_id=row.pk)
    after = receiver.wait_for(2)[1]
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    assert verifies(new, after)
    assert not verifies(old, after)


def test_a_second_rotation_retires_the_first_secret_at_once(key, receiver):
    first = services.webhook_secret_get(api_key=key).current
    second = services.webhook_secret_rotate(api_key=key).current
    third = services.webhook_secret_rotate(api_key=key).current
    row = emitted(make_generation(api_key=key), url=receiver.url)
    services.delivery_attempt(delivery_id=row.pk)
    (got,) = receiver.wait_for(1)
    assert verifies(third, got) and verifies(second, got)
    assert not verifies(first, got)


@pytest.mark.parametrize(
    ("statuses", "states", "next_attempt"),
    [
        ([500, 500, 200], ["pending", "pending", "delivered"], [True, True, False]),
        ([410], ["gone"], [False]),
        ([302, 200], ["pending", "delivered"], [True, False]),
        ([503, 503, 503], ["pending", "pending", "failed"], [True, True, False]),
    ],
    ids=["500-500-200", "410-gone", "redirect-not-followed", "exhausted"],
)
def test_each_attempt_is_recorded_on_the_row(
    key, settings, statuses, states, next_attempt
):
    settings.WEBHOOK_RETRY_SCHEDULE = [60.0, 60.0]  # three attempts
    receiver = Receiver(statuses).start()
    try:
        row = emitted(make_generation(api_key=key), url=receiver.url)
        for n, (state, scheduled) in enumerate(
            zip(states, next_attempt, strict=True), 1
        ):
            result = services.delivery_attempt(delivery_id=row.pk)
            row.refresh_from_db()
            assert (result.state, row.state, row.attempts) == (state, state, n)
            assert row.last_status == str(statuses[n - 1])
            assert (row.next_attempt_at is not None) == scheduled
            assert (result.retry_at is not None) == scheduled
        got = receiver.wait_for(len(states))
        assert len(got) == len(states)  # a redirect is not followed
        assert {r.headers["webhook-id"] for r in got} == {str(row.pk)}
        # Nothing more once the delivery is settled.
        assert services.delivery_attempt(delivery_id=row.pk) is None
    finally:
        receiver.stop()


def test_the_next_attempt_waits_the_scheduled_delay_with_jitter(key, settings):
    settings.WEBHOOK_RETRY_SCHEDULE = [100.0]
    receiver = Receiver([500]).start()
    try:
        row = emitted(make_generation(api_key=key), url=receiver.url)
        result = services.delivery_attempt(delivery_id=row.pk)
        row.refresh_from_db()
        delay = (row.next_attempt_at - row.last_attempt_at).total_seconds()
        assert 90 <= delay <= 110
        assert result.retry_at == row.next_attempt_at
    finally:
        receiver.stop()


def test_jitter_spreads_retries_within_ten_percent(settings):
    settings.WEBHOOK_RETRY_SCHEDULE = [100.0, 5.0]
    delays = [services.retry_delay(1) for _ in range(500)]
    assert 90 <= min(delays) < 95 and 105 < max(delays) <= 110
    assert 4.5 <= services.retry_delay(2) <= 5.5
    assert services.retry_delay(3) is None


def test_a_refused_connection_is_retried(key, settings):
    settings.WEBHOOK_RETRY_SCHEDULE = [60.0]
    receiver = Receiver()  # never started: nothing listens on its port
    row = emitted(make_generation(api_key=key), url=receiver.url)
    result = services.delivery_attempt(delivery_id=row.pk)
    row.refresh_from_db()
    assert result.state == "pending" and row.attempts == 1
    assert row.last_status.startswith("connection failed")


def test_redeliver_makes_one_more_attempt_with_the_same_id(key, settings):
    settings.WEBHOOK_RETRY_SCHEDULE = []
    receiver = Receiver([500, 200]).start()
    try:
        row = emitted(make_generation(api_key=key), url=receiver.url)
        assert services.delivery_attempt(delivery_id=row.pk).state == "failed"
        # A failed first attempt keeps the body it sent too.
        (first,) = receiver.wait_for(1)
        row.refresh_from_db()
        assert (row.payload, row.snapshot) == (first.body.decode(), None)
        jobs = queued_jobs()
        row = services.delivery_redeliver(delivery=row)
        assert row.state == "pending" and row.next_attempt_at is None
        assert queued_jobs() == jobs + 1
        result = services.delivery_attempt(delivery_id=row.pk, redelivery=True)
        assert result.state == "delivered"
        first, second = receiver.wait_for(2)
        assert first.headers["webhook-id"] == second.headers["webhook-id"]
        assert first.body == second.body
        row.refresh_from_db()
        assert row.attempts == 2
    finally:
        receiver.stop()


def test_a_failed_redelivery_of_a_finished_delivery_fails_again(key, settings):
    settings.WEBHOOK_RETRY_SCHEDULE = []
    receiver = Receiver([410, 500]).start()
    try:
        row = emitted(make_generation(api_key=key), url=receiver.url)
        assert services.delivery_attempt(delivery_id=row.pk).state == "gone"
        services.delivery_redeliver(delivery=row)
        result = services.delivery_attempt(delivery_id=row.pk, redelivery=True)
        assert result.state == "failed" and result.retry_at is None
    finally:
        receiver.stop()


def test_a_failed_attempt_never_unfinishes_a_delivery_finished_meanwhile(key, settings):
    settings.WEBHOOK_RETRY_SCHEDULE = [60.0]
    settings.WEBHOOK_ALLOW_PRIVATE = True
    receiver = Receiver([500]).start()
    try:
        url = f"http://hooks.example.test:{receiver.port}/hook"
        row = emitted(make_generation(api_key=key), url=url)

        def redelivered_meanwhile(host, port, *args, **kwargs):
            # While this attempt is on the wire, a redelivery delivers it.
            WebhookDelivery.objects.filter(pk=row.pk).update(
                state=DeliveryState.DELIVERED, delivered_at=Now(), next_attempt_at=None
            )
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

        result = services.delivery_attempt(
            delivery_id=row.pk, resolver=redelivered_meanwhile
        )
        row.refresh_from_db()
    finally:
        receiver.stop()
    assert (result.state, result.retry_at) == ("delivered", None)
    assert (row.state, row.attempts, row.next_attempt_at) == ("delivered", 1, None)
    # The redelivery in this test wrote no payload; this attempt keeps its own.
    (got,) = receiver.received
    assert (row.payload, row.snapshot) == (got.body.decode(), None)


# --- The guard at send time ---------------------------------------------------


def resolving_to(address: str):
    def resolve(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    return resolve


def test_a_host_that_now_resolves_to_a_private_address_is_not_contacted(
    key, receiver, settings
):
    # Accepted at create (a public address then); at send time the name
    # points at the receiver on loopback.
    settings.WEBHOOK_ALLOW_PRIVATE = False
    url = f"http://hooks.example.test:{receiver.port}/hooks/lockngen"
    row = emitted(make_generation(api_key=key), url=url)

    result = services.delivery_attempt(
        delivery_id=row.pk, resolver=resolving_to("127.0.0.1")
    )

    assert result.state == "pending"
    row.refresh_from_db()
    assert row.last_status == "refused by the address check"
    assert receiver.received == []


def test_the_connection_goes_to_the_checked_address_with_the_hosts_name(
    key, receiver, settings
):
    # Nothing else can resolve hooks.example.test: the request reaching the
    # receiver proves the checked address was used, not a second lookup.
    settings.WEBHOOK_ALLOW_PRIVATE = True
    url = f"http://hooks.example.test:{receiver.port}/hooks/lockngen?k=1"
    row = emitted(make_generation(api_key=key), url=url)

    result = services.delivery_attempt(
        delivery_id=row.pk, resolver=resolving_to("127.0.0.1")
    )

    assert result.state == "delivered"
    (got,) = receiver.wait_for(1)
    assert got.headers["host"] == f"hooks.example.test:{receiver.port}"
    assert got.path == "/hooks/lockngen?k=1"


def test_secrets_never_reach_the_logs(key, receiver, caplog):
    caplog.set_level(logging.DEBUG)
    first = services.webhook_secret_get(api_key=key)
    second = services.webhook_secret_rotate(api_key=key)
    row = emitted(make_generation(api_key=key), url=receiver.url)
    services.delivery_attempt(delivery_id=row.pk)
    receiver.wait_for(1)
    logging.getLogger("tests").info("%r %s", second, second)
    text = caplog.text + repr(second) + str(second)
    assert caplog.records  # the run did log
    for secret in (first.current, second.current):
        assert secret not in text
        assert secret.removeprefix("whsec_") not in text


# --- The README's receiver ------------------------------------------------------


def readme_receiver() -> str:
    text = (BASE_DIR / "README.md").read_text()
    section = text.split("### Receiving webhooks", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_receiver_verifies_a_delivery_and_refuses_a_forgery(
    key, settings, tmp_path
):
    settings.WEBHOOK_RETRY_SCHEDULE = [60.0]
    port = free_port()
    script = tmp_path / "receiver.py"
    script.write_text(readme_receiver().replace("9000", str(port)))
    secret = services.webhook_secret_get(api_key=key).current
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, str(script)],
        env={**os.environ, "LOCKNGEN_WEBHOOK_SECRET": secret, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the README receiver did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/hooks"
        generation = make_generation(api_key=key)
        row = emitted(generation, url=url)
        assert services.delivery_attempt(delivery_id=row.pk).state == "delivered"
        assert services.delivery_attempt(delivery_id=row.pk) is None

        services.webhook_secret_rotate(api_key=key)  # the receiver's secret ...
        WebhookSecret.objects.filter(api_key=key).update(previous="")  # ... retired
        forged = emitted(generation, url=url)
        result = services.delivery_attempt(delivery_id=forged.pk)
        forged.refresh_from_db()
        assert (result.state, forged.last_status) == ("pending", "401")
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    assert f"generation.completed {generation.pk} queued None" in output
