"""Webhook rules: emitting events (the outbox), secrets, attempts, redelivery.

``emit`` is called by a generation's transition inside the transition's
transaction: the delivery row and procrastinate's job are written on the
same connection, so they commit or roll back with the transition (the
transactional outbox). The delivery workers are woken once the transaction
has committed (``webhooks.wake``), not by a NOTIFY inside it. The
delivery task (``webhooks.tasks``) calls ``delivery_attempt`` once per
attempt.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, F, Q, Value, When
from django.db.models.functions import Coalesce, Now
from procrastinate.jobs import Job
from psycopg.types.json import Jsonb

from apikeys.models import ApiKey
from generations.models import Generation
from lockngen.rows import columns, fetch_all_prepared, from_row
from webhooks import delivery, guard
from webhooks.models import (
    EVENT_BY_FILTER_NAME,
    DeliveryState,
    Event,
    WebhookDelivery,
    WebhookSecret,
)
from webhooks.wake import QUEUE, wake_after_commit

logger = logging.getLogger(__name__)

# Both secrets sign for this long after a rotation (SPEC §5, §10).
ROTATION_OVERLAP = timedelta(hours=24)
JITTER = 0.10  # ±10 % on every retry delay
FILTER_NAME_OF_EVENT = {event: name for name, event in EVENT_BY_FILTER_NAME.items()}
UNAVAILABLE = (
    "Webhooks need PostgreSQL: set DATABASE_URL (the SQLite development "
    "fallback has no delivery queue)."
)


class WebhooksUnavailable(Exception):
    """The SQLite fallback: no delivery engine to write the outbox into."""

    def __init__(self) -> None:
        super().__init__(UNAVAILABLE)


def webhooks_available() -> bool:
    return not settings.DATABASE_FALLBACK


# --- Create-time validation (the SSRF guard) ----------------------------------


def webhook_url_check(url: str) -> str:
    """The webhook URL a job may be created with, or ``guard.UnsafeURL``.

    Raises ``WebhooksUnavailable`` on the SQLite fallback.
    """
    if not webhooks_available():
        raise WebhooksUnavailable
    guard.resolve(
        url,
        require_https=settings.PRODUCTION,
        allow_private=settings.WEBHOOK_ALLOW_PRIVATE,
    )
    return url


# --- Secrets ------------------------------------------------------------------


def webhook_secret_get(*, api_key: ApiKey) -> WebhookSecret:
    """The key's signing secret, created on first use."""
    secret = WebhookSecret.objects.filter(api_key=api_key).first()
    if secret is not None:
        return secret
    with transaction.atomic():
        secret, _ = WebhookSecret.objects.get_or_create(
            api_key=api_key, defaults={"current": delivery.new_secret()}
        )
    return secret


@transaction.atomic
def webhook_secret_rotate(*, api_key: ApiKey) -> WebhookSecret:
    """A new current secret; the old one keeps signing for ``ROTATION_OVERLAP``."""
    webhook_secret_get(api_key=api_key)
    secret = WebhookSecret.objects.select_for_update().get(api_key=api_key)
    secret.previous, secret.current = secret.current, delivery.new_secret()
    secret.rotated_at = Now()
    secret.save(update_fields=["previous", "current", "rotated_at"])
    secret.refresh_from_db(fields=["rotated_at"])
    logger.info("webhook secret of key %s rotated", api_key.key_prefix)
    return secret


def _signing(current: str, previous: str | None, overlapping: bool | None) -> list[str]:
    """The secrets a delivery is signed with now: current, and previous while
    the rotation's overlap lasts (``overlapping``, which ``ATTEMPT_SQL``
    computes on the database clock)."""
    return [current, previous] if previous and overlapping else [current]


# --- Emit (the outbox) ------------------------------------------------------

# The outbox as SQL over ``g``, the jobs a transition just wrote (the
# statement that reads them back defines ``g``): for each job whose webhook
# wants ``event`` — the one place that rule is written (SPEC §10: the
# job's ``webhook_events_filter``; jobs without a key have none; callers
# may leave out jobs without a webhook, to save the statement) — a
# delivery row with the job's row as its snapshot (but for the columns its
# owner never sees, ``_unseen_columns``), and its procrastinate
# job through procrastinate's own SQL function,
# ``procrastinate_defer_jobs_v1`` (what ``deliver.defer()`` runs, so its
# triggers fire as they would), with the values of the job procrastinate's
# ``configure()`` builds. ``j`` is empty when no job wants the event. The
# payload is rendered from the snapshot at the first attempt
# (``delivery_payload``): one statement on the transition's hot path instead
# of a read-back, a payload built in Python and an INSERT.
# tests/test_webhook_delivery.py checks the rows against the ORM's, the job
# against ``deliver.defer()``'s and the payload against ``generation_json``.
_OUTBOX = """
d AS (
    INSERT INTO webhook_deliveries
        (id, generation_id, event, url, snapshot, state, attempts, last_status,
         next_attempt_at)
    SELECT gen_random_uuid(), g.id, %(event)s, g.webhook,
           to_jsonb(g) - %(unseen)s::text[],
           %(pending)s, 0, '', STATEMENT_TIMESTAMP()
    FROM g
    WHERE g.webhook <> '' AND g.api_key_id IS NOT NULL
      AND %(filter_name)s = ANY(string_to_array(g.webhook_events_filter, ','))
    RETURNING id
),
j AS (
    SELECT array_agg(d.id) AS deliveries,
           procrastinate_defer_jobs_v1(array_agg(ROW(
               %(queue)s::varchar, %(task)s::varchar, %(priority)s::integer,
               %(lock)s::text, %(queueing_lock)s::text,
               %(kwargs)s::jsonb || jsonb_build_object('delivery_id', d.id::text),
               %(scheduled_at)s::timestamptz)::procrastinate_job_to_defer_v1
           )) AS jobs
    FROM d
    HAVING count(*) > 0
)"""


@functools.cache
def _unseen_columns() -> list[str]:
    """The job's columns that are not in its owner's view (the lease token,
    the worker's name, the idempotency key…): the snapshot leaves them out."""
    # Imported here: generations.api imports the services that call emit.
    from generations.api import OUTPUT

    return [
        field.column
        for field in Generation._meta.concrete_fields
        if field.name not in OUTPUT
    ]


def _outbox_sql(where: str, select: str) -> str:
    """The jobs ``where`` matches as ``g``, the outbox over them, then
    ``select`` (constants of this module's; values are parameters)."""
    read = columns(Generation)
    sql = f"WITH g AS (SELECT {read} FROM generations WHERE {where}),{_OUTBOX}"  # noqa: S608
    return f"{sql} {select.format(columns=read)}"


@functools.cache
def _emit_sql() -> str:
    return _outbox_sql("id = ANY(%(ids)s::uuid[])", "SELECT deliveries, jobs FROM j")


@functools.cache
def _read_sql() -> str:
    return _outbox_sql("id = %(id)s", "SELECT {columns}, (SELECT jobs FROM j) FROM g")


def delivery_job(delivery_id: uuid.UUID, *, redelivery: bool = False) -> Job:
    """The delivery task's job for one delivery, as ``deliver.defer()`` builds it."""
    from webhooks.tasks import deliver

    return deliver.configure().make_new_job(
        delivery_id=str(delivery_id), redelivery=redelivery
    )


@functools.cache
def _first_attempt_job() -> Job:
    """What every first delivery's job has in common (all but the delivery
    id): the task's configuration does not change while the process runs."""
    return delivery_job(uuid.UUID(int=0))


def _outbox_params(event: str) -> dict[str, Any]:
    if event not in Event.values:
        raise ValueError(f"unknown webhook event {event!r}")
    if not webhooks_available():
        raise WebhooksUnavailable
    if not connection.in_atomic_block:
        raise RuntimeError("emit() must run inside the transition's transaction")
    return _outbox_constants(event)


@functools.cache
def _outbox_constants(event: str) -> dict[str, Any]:
    """The outbox statement's parameters but the jobs': the same for every
    transition of one event while the process runs (callers copy it)."""
    job = _first_attempt_job()
    return {
        "event": event,
        "filter_name": FILTER_NAME_OF_EVENT[event],
        "unseen": _unseen_columns(),
        "pending": DeliveryState.PENDING,
        "queue": job.queue,
        "task": job.task_name,
        "priority": job.priority,
        "lock": job.lock,
        "queueing_lock": job.queueing_lock,
        "kwargs": Jsonb(job.task_kwargs),
        "scheduled_at": job.scheduled_at,
    }


def emit(generation_ids: Collection[uuid.UUID], event: str) -> list[uuid.UUID]:
    """Write ``event``'s deliveries for those of these jobs whose webhook
    wants it, and queue their jobs, in the caller's transaction.

    Must run inside the transition's ``transaction.atomic()`` (after its
    UPDATE): that is what makes a rolled-back transition send nothing. The
    job is read as the transition left it. Returns the deliveries' ids.
    Raises ``WebhooksUnavailable`` on the SQLite fallback.
    """
    params = _outbox_params(event) | {"ids": list(generation_ids)}
    rows = fetch_all_prepared(_emit_sql(), params)  # prepared: claims run it
    if not rows:
        return []
    ((deliveries, jobs),) = rows
    wake_after_commit(jobs[0])
    logger.debug("webhooks queued: %s, deliveries %s", event, deliveries)
    return deliveries


def emit_reading(pk: uuid.UUID, event: str) -> Generation:
    """The job ``pk`` read back after its transition, in the statement that
    emits ``event`` for it (``emit``): one round trip for a transition with
    or without a webhook. Same rules as ``emit``."""
    params = _outbox_params(event) | {"id": pk}
    ((*values, jobs),) = fetch_all_prepared(_read_sql(), params)
    if jobs:
        wake_after_commit(jobs[0])
    return from_row(Generation, values)


# --- The payload --------------------------------------------------------------


def _job_at_event(snapshot: dict[str, Any]) -> Generation:
    """The job as its snapshot (``to_jsonb`` of its row) holds it, each value
    through its field's ``to_python``; datetimes in the connection's time
    zone (UTC), as the ORM reads them. A column the snapshot lacks (one
    added later) takes the field's default."""
    values = {}
    for field in Generation._meta.concrete_fields:
        if field.column in snapshot:
            value = field.to_python(snapshot[field.column])
            if isinstance(value, datetime):
                value = value.astimezone(connection.timezone)
            values[field.attname] = value
    return Generation(**values)


def render_payload(generation: Generation, event: str) -> str:
    """The body of ``event`` for the job (SPEC §10): its owner's view."""
    # Imported here: generations.api imports the services that call emit.
    from generations.api import generation_json

    moment = (
        generation.started_at if event == Event.START else generation.completed_at
    ) or (generation.updated_at or generation.created_at)
    body = {
        "type": event,
        "timestamp": None if moment is None else moment.isoformat(),
        "data": generation_json(generation),
    }
    return json.dumps(body, separators=(",", ":"))


def delivery_payload(delivery: WebhookDelivery) -> str:
    """What the delivery sends: the payload kept by its first attempt, or
    rendered from the job's snapshot before that."""
    return _body(delivery.event, delivery.payload, delivery.snapshot)


def _body(event: str, payload: str | None, snapshot: Any) -> str:
    if payload is not None:
        return payload
    if isinstance(snapshot, str):  # jsonb read on a cursor comes as text
        snapshot = json.loads(snapshot)
    return render_payload(_job_at_event(snapshot), event)


def _queue(delivery_id: uuid.UUID, *, redelivery: bool = False) -> None:
    from webhooks.tasks import deliver

    # procrastinate's Django connector: the INSERT into procrastinate_jobs runs
    # on this (Django's) connection, in the open transaction.
    job_id = deliver.defer(delivery_id=str(delivery_id), redelivery=redelivery)
    wake_after_commit(job_id)


# --- Attempts -----------------------------------------------------------------


@dataclass(frozen=True)
class AttemptResult:
    state: str
    retry_at: datetime | None  # when the next scheduled attempt is due


def retry_delay(attempts_made: int) -> float | None:
    """Seconds before the next attempt after ``attempts_made`` attempts, with
    ±10 % jitter; None once the schedule is exhausted."""
    schedule = settings.WEBHOOK_RETRY_SCHEDULE
    if attempts_made > len(schedule):
        return None
    base = schedule[attempts_made - 1]
    return base * random.uniform(1 - JITTER, 1 + JITTER)  # noqa: S311 - jitter


# What an attempt needs, in one statement: the delivery (its payload, or the
# job's snapshot to render it from), its owner (the job's key) and the
# owner's secrets with the rotation's overlap on the database clock (no
# secret yet: the key's first delivery, NULLs). The join to generations is
# the ORM's for ``generation__api_key`` (no soft-delete filter:
# a deleted job's events are still delivered).
ATTEMPT_SQL = """
SELECT d.id, d.url, d.event, d.payload, d.snapshot, d.state, g.api_key_id,
       s.current, s.previous, s.rotated_at > STATEMENT_TIMESTAMP() - %s
FROM webhook_deliveries d
JOIN generations g ON g.id = d.generation_id
LEFT JOIN webhook_secrets s ON s.api_key_id = g.api_key_id
WHERE d.id = %s
"""
# A delivered or gone attempt does not depend on what the row held: one
# UPDATE (its row lock orders it after a concurrent attempt's), no read. The
# payload rendered for a first attempt is kept (a concurrent attempt's, the
# same bytes, if it came first).
FINISHED_SQL = """
UPDATE webhook_deliveries
SET payload = COALESCE(payload, %s),
    snapshot = NULL,
    attempts = attempts + 1,
    last_attempt_at = STATEMENT_TIMESTAMP(),
    last_status = %s,
    state = %s,
    next_attempt_at = NULL,
    delivered_at = CASE WHEN %s THEN STATEMENT_TIMESTAMP() ELSE delivered_at END
WHERE id = %s
RETURNING attempts
"""


def delivery_attempt(
    *, delivery_id: uuid.UUID | str, redelivery: bool = False, resolver: Any = None
) -> AttemptResult | None:
    """One attempt of a delivery; records it on the row and says what comes next.

    A scheduled attempt (``redelivery=False``) of a delivery that is no longer
    pending does nothing (a duplicate job, or a redelivery already made it).
    Returns None when nothing was attempted.
    """
    with connection.cursor() as cursor:
        cursor.execute(ATTEMPT_SQL, [ROTATION_OVERLAP, delivery_id])
        row = cursor.fetchone()
    if row is None:
        return None
    (
        pk,
        url,
        event,
        body,
        snapshot,
        state,
        api_key_id,
        current,
        previous,
        overlapping,
    ) = row
    if not redelivery and state != DeliveryState.PENDING:
        return None
    body = _body(event, body, snapshot)  # the first attempt makes it, and keeps it
    if current is None:  # the key's first delivery: its secret is made now
        current = webhook_secret_get(api_key=ApiKey.objects.get(pk=api_key_id)).current
    outcome = delivery.attempt(
        delivery_id=str(pk),
        url=url,
        body=body,
        secrets_=_signing(current, previous, overlapping),
        timeout=settings.WEBHOOK_TIMEOUT,
        require_https=settings.PRODUCTION,
        allow_private=settings.WEBHOOK_ALLOW_PRIVATE,
        resolver=resolver,
    )
    if outcome.delivered or outcome.gone:
        return _record_finished(pk, body, outcome)
    return _record_failure(pk, body, outcome, redelivery=redelivery)


def _record_finished(
    delivery_id: uuid.UUID, body: str, outcome: delivery.Outcome
) -> AttemptResult:
    state = DeliveryState.DELIVERED if outcome.delivered else DeliveryState.GONE
    with (
        transaction.mark_for_rollback_on_error(),
        connection.cursor() as cursor,
    ):
        cursor.execute(
            FINISHED_SQL,
            [body, outcome.status[:100], state, outcome.delivered, delivery_id],
        )
        row = cursor.fetchone()
    if row is None:  # deleted since it was read
        raise WebhookDelivery.DoesNotExist(delivery_id)
    _log_attempt(delivery_id, row[0], outcome, state)
    return AttemptResult(state=state, retry_at=None)


def _payload_kept(body: str) -> dict[str, Any]:
    """The attempt's body kept as the delivery's payload, unless an attempt
    kept one first (the same bytes: one snapshot); the snapshot is done with.
    ``FINISHED_SQL`` says the same in SQL."""
    return {"payload": Coalesce("payload", Value(body)), "snapshot": None}


@transaction.atomic
def _record_failure(
    delivery_id: uuid.UUID, body: str, outcome: delivery.Outcome, *, redelivery: bool
) -> AttemptResult:
    """An attempt that did not reach a 2xx or 410: what comes next depends on
    the attempts made and the schedule, read under the row's lock."""
    row = (
        WebhookDelivery.objects.select_for_update()
        .values("attempts", "state", "next_attempt_at")
        .get(pk=delivery_id)
    )
    attempts = row["attempts"] + 1
    retry_at: datetime | None = None
    if row["state"] in (DeliveryState.DELIVERED, DeliveryState.GONE):
        # Another attempt (a redelivery) finished it while this one was on
        # the wire: counted, but neither un-finished nor scheduled again.
        WebhookDelivery.objects.filter(pk=delivery_id).update(
            **_payload_kept(body), attempts=F("attempts") + 1, last_attempt_at=Now()
        )
        _log_attempt(delivery_id, attempts, outcome, row["state"])
        return AttemptResult(state=row["state"], retry_at=None)
    if redelivery:
        # One extra attempt: the schedule (if any is still running) goes on.
        scheduled = row["state"] == DeliveryState.PENDING and row["next_attempt_at"]
        state = DeliveryState.PENDING if scheduled else DeliveryState.FAILED
        next_at = row["next_attempt_at"] if scheduled else None
    else:
        delay = retry_delay(attempts)
        if delay is None:
            state, next_at = DeliveryState.FAILED, None
        else:
            state, next_at = DeliveryState.PENDING, Now() + timedelta(seconds=delay)
    WebhookDelivery.objects.filter(pk=delivery_id).update(
        **_payload_kept(body),
        attempts=F("attempts") + 1,
        last_attempt_at=Now(),
        last_status=outcome.status[:100],
        state=state,
        next_attempt_at=next_at,
    )
    if state == DeliveryState.PENDING and not redelivery:
        retry_at = (
            WebhookDelivery.objects.filter(pk=delivery_id)
            .values_list("next_attempt_at", flat=True)
            .get()
        )
    _log_attempt(delivery_id, attempts, outcome, state)
    return AttemptResult(state=state, retry_at=retry_at)


def _log_attempt(
    delivery_id: uuid.UUID, attempts: int, outcome: delivery.Outcome, state: str
) -> None:
    logger.info(
        "webhook %s attempt %d: %s → %s", delivery_id, attempts, outcome.status, state
    )


@transaction.atomic
def delivery_redeliver(*, delivery: WebhookDelivery) -> WebhookDelivery:
    """One more attempt now, same ``webhook-id``; failed or gone become pending."""
    if not webhooks_available():
        raise WebhooksUnavailable
    WebhookDelivery.objects.filter(pk=delivery.pk).update(
        state=DeliveryState.PENDING,
        # A running schedule keeps its next attempt; otherwise the extra
        # attempt is the only one.
        next_attempt_at=Case(
            When(Q(state=DeliveryState.PENDING), then=F("next_attempt_at")),
            default=Value(None),
        ),
    )
    _queue(delivery.pk, redelivery=True)
    delivery.refresh_from_db()
    return delivery


# --- Retention (manage.py purge_deleted) ---------------------------------------


def deliveries_prune(*, older_than: timedelta, batch_size: int) -> int:
    """Delete finished deliveries (delivered, failed, gone) created more than
    ``older_than`` ago, batch by batch; pending ones stay. Returns the count."""
    finished = WebhookDelivery.objects.exclude(state=DeliveryState.PENDING).filter(
        created_at__lt=Now() - older_than
    )
    pruned = 0
    while True:
        batch = list(finished.order_by("pk").values_list("pk", flat=True)[:batch_size])
        if not batch:
            return pruned
        count, _ = WebhookDelivery.objects.filter(pk__in=batch).delete()
        pruned += count


def finished_jobs_prune(*, older_than: timedelta) -> None:
    """Delete procrastinate's finished delivery jobs (succeeded, failed,
    cancelled, aborted) whose last event is older than ``older_than``."""
    if not webhooks_available():
        return
    from asgiref.sync import async_to_sync
    from procrastinate.contrib.django import app

    async_to_sync(app.job_manager.delete_old_jobs)(
        nb_hours=max(int(older_than.total_seconds() // 3600), 0),
        queue=QUEUE,
        include_failed=True,
        include_cancelled=True,
        include_aborted=True,
    )
