"""The claim (SPEC §5): expired leases first, then fair, capped, routed batches.

One statement per claim on PostgreSQL, a fixed SQL string (the hot path of
every worker; ``lockngen.rows`` says why not the ORM), prepared once per
connection and batch size (``claim_sql``, ``fetch_all_prepared``):

1. expired leases with no attempts left fail;
2. expired leases with attempts left, of the wanted models, are taken first;
3. then keys take turns, least recently served first (``KeyQueue``: keys
   never served first of all, the oldest backlog first among those), each
   giving its oldest jobs: at most its free slots under ``max_running``, and
   at most an even share of the batch, so one key's backlog never starves
   another;
4. every job taken becomes running with a fresh lease token, in the same
   statement (``UPDATE … RETURNING``).

Rows are taken with ``FOR UPDATE SKIP LOCKED``: concurrent claimers never
receive the same job and never wait for each other's jobs. The walk over
keys is an index scan of ``generation_key_queues`` and each key's jobs an
index scan of its lane (``generations_lane_*_idx``), so the cost does not
grow with the backlog. A capped key is taken by one claim at a time
(``pg_advisory_xact_lock``: claims of that one key wait for each other's
commit, so every free slot is used) and its ``running`` counter moves in the
same transaction (the triggers of migration 0003); a claim whose snapshot
missed another's commit is refused by the trigger's cap guard and tried
again, so two claims can never fill one free slot. Claims of one uncapped key do wait
for each other's commit on that key's counter row (the commit's WAL flush,
plus the webhook deliveries written in the claim's transaction), never for
a job.

The SQL restates ``transition_values`` for the two transitions it makes;
tests/test_status_machine.py and tests/test_claims_engine.py check the rows
it writes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from django.conf import settings
from django.db import IntegrityError, OperationalError, connection, transaction
from django.db.models import CharField, Value
from django.db.models.functions import Cast, Concat
from psycopg.errors import CheckViolation, DeadlockDetected

from apikeys.models import ApiKey
from generations.events import FINISHED, STARTED, announce
from generations.models import (
    NO_KEY,
    DurationMs,
    Generation,
    Status,
    transition_values,
)
from lockngen.rows import fetch_all_prepared, from_row

logger = logging.getLogger(__name__)

MAX_BATCH = 50
# The first key of the claim's advisory locks (``pg_advisory_xact_lock``
# with two int4 keys: a space of its own, apart from one-bigint locks).
ADVISORY_CLASS = 0x6C6B6E67  # "lkng"
EXPIRED_SWEEP_BATCH = 100
# The error of a job whose lease expired with no attempts left, around its
# attempt count (both paths write it).
EXHAUSTED = ("lease expired after ", " attempt(s); no attempts left")
# A claim that lost a race for a capped key's last slot (the trigger refused
# it) is tried again; the next try sees the key at its cap and skips it.
# So is one the database cancelled to break a deadlock.
CAP_RACE_RETRIES = 5

_LANE = f"COALESCE(g.api_key_id, '{NO_KEY}'::uuid)"
_EXPIRED = (
    "g.status = 1 AND NOT g.is_deleted AND g.lease_expires_at < statement_timestamp()"
)
_DURATION = DurationMs.template % {"expressions": "g.started_at"}

# Each key's jobs, oldest first, at most ``take`` of them; ``{models}`` is
# empty (any model) or walks one model's lane at a time, so a key's backlog
# of other models is never read.
_ANY_MODEL = f"""
        SELECT g.id FROM generations g
        WHERE {_LANE} = lanes.api_key_id AND g.status = 0 AND NOT g.is_deleted
        ORDER BY g.created_at, g.id
        LIMIT LEAST(slot.free, (SELECT per_key FROM share))
        FOR UPDATE OF g SKIP LOCKED"""  # noqa: S608 (constants; values are parameters)

_SOME_MODELS = f"""
        SELECT picked.id FROM unnest(%(models)s::varchar[]) AS wanted(model),
        LATERAL (
            SELECT g.id, g.created_at FROM generations g
            WHERE {_LANE} = lanes.api_key_id AND g.model = wanted.model
              AND g.status = 0 AND NOT g.is_deleted
            ORDER BY g.created_at, g.id
            LIMIT LEAST(slot.free, (SELECT per_key FROM share))
            FOR UPDATE OF g SKIP LOCKED
        ) picked
        ORDER BY picked.created_at, picked.id
        LIMIT LEAST(slot.free, (SELECT per_key FROM share))"""  # noqa: S608

_TURN_OF_LANES = (
    "lanes.last_served_at ASC NULLS FIRST, lanes.queued_since, lanes.api_key_id"
)

_CLAIM = f"""
WITH exhausted AS (
    UPDATE generations AS g SET
        status = {Status.FAILED.value},
        updated_at = statement_timestamp(),
        completed_at = statement_timestamp(),
        duration_ms = {_DURATION},
        lease_expires_at = NULL,
        lease_token = NULL,
        claimed_by = NULL,
        error_message = %(exhausted_before)s || g.attempts || %(exhausted_after)s
    WHERE g.id IN (
        SELECT g.id FROM generations g
        WHERE {_EXPIRED} AND g.attempts >= %(max_attempts)s
        ORDER BY g.lease_expires_at, g.id
        LIMIT {EXPIRED_SWEEP_BATCH}
        FOR UPDATE OF g SKIP LOCKED
    )
    RETURNING {{returning}}
),
reclaimed AS (
    SELECT g.id FROM generations g
    WHERE {_EXPIRED} AND g.attempts < %(max_attempts)s {{expired_models}}
    ORDER BY g.lease_expires_at, g.id
    LIMIT {{n}}
    FOR UPDATE OF g SKIP LOCKED
),
share AS (
    -- An even share of the batch per key: the keys with work (of the wanted
    -- models), counted up to the batch size, in turn order.
    SELECT CASE WHEN {{n}} = 1 THEN 1 ELSE ceil({{n}}::numeric / GREATEST(1,
        (SELECT count(*) FROM (
            SELECT 1 FROM generation_key_queues AS lanes
            WHERE lanes.queued > 0
              AND (lanes.max_running IS NULL OR lanes.running < lanes.max_running)
              {{lane_has_models}}
            LIMIT {{n}}) AS with_work)
    ))::integer END AS per_key
),
fair AS (
    SELECT job.id
    FROM generation_key_queues AS lanes
    -- A capped key is taken by one claim at a time: a transaction-scoped
    -- advisory lock (a second claim of that key waits for the first to
    -- commit: both then start a job when two slots are free), never a row
    -- lock, which would be taken out of the order in which the triggers
    -- lock counter rows (deadlocks). The slots are read from this
    -- statement's snapshot; the trigger refuses a claim that missed a
    -- commit meanwhile and the claim is tried again.
    CROSS JOIN LATERAL (
        SELECT CASE
            WHEN lanes.max_running IS NULL THEN {{n}}
            WHEN EXISTS (
                SELECT pg_advisory_xact_lock(
                    {ADVISORY_CLASS}, hashtext(lanes.api_key_id::text))
            ) THEN lanes.max_running - lanes.running
            ELSE 0
        END AS free
    ) AS slot
    CROSS JOIN LATERAL ({{lane_jobs}}
    ) AS job
    WHERE lanes.queued > 0
      AND (lanes.max_running IS NULL OR lanes.running < lanes.max_running)
    ORDER BY {_TURN_OF_LANES}
    -- A constant, so the keys are walked in index order and only as far as
    -- needed (a limit the planner cannot see makes it sort every key).
    LIMIT {{n}}
),
picked AS (
    SELECT id FROM reclaimed
    UNION ALL
    (SELECT id FROM fair LIMIT {{n}} - (SELECT count(*) FROM reclaimed))
),
claimed AS (
    UPDATE generations AS g SET
        status = {Status.RUNNING.value},
        updated_at = statement_timestamp(),
        started_at = statement_timestamp(),
        lease_expires_at = statement_timestamp() + make_interval(secs => %(lease)s),
        attempts = g.attempts + 1,
        lease_token = gen_random_uuid(),
        claimed_by = %(worker)s
    WHERE g.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING {{returning}}
)
SELECT true, {{columns}} FROM claimed
UNION ALL
SELECT false, {{columns}} FROM exhausted
"""  # noqa: S608


_LANE_HAS_MODELS = f"""AND EXISTS (
                SELECT 1 FROM generations g
                WHERE {_LANE} = lanes.api_key_id
                  AND g.model = ANY(%(models)s::varchar[])
                  AND g.status = 0 AND NOT g.is_deleted)"""  # noqa: S608


@functools.cache
def claim_sql(*, routed: bool, max_jobs: int) -> str:
    """The claim's statement for a batch size, with the size written in it.

    The claim runs as a prepared statement (``fetch_all_prepared``), planned
    once per connection for all parameter values: a ``LIMIT`` the planner
    cannot see would make it plan for a tenth of the keys and sort them
    (docs/PERFORMANCE.md, "Claims"), so the batch size, 1..50, is a constant
    of the statement, one prepared statement per size a worker uses.
    """
    if not 1 <= max_jobs <= MAX_BATCH:
        raise ValueError(f"max_jobs must be 1..{MAX_BATCH}")
    fields = Generation._meta.concrete_fields
    return _CLAIM.format(
        expired_models="AND g.model = ANY(%(models)s::varchar[])" if routed else "",
        lane_has_models=_LANE_HAS_MODELS if routed else "",
        lane_jobs=_SOME_MODELS if routed else _ANY_MODEL,
        returning=", ".join(f"g.{field.column}" for field in fields),
        columns=", ".join(field.column for field in fields),
        n=int(max_jobs),
    )


def generation_claim(
    *,
    max_jobs: int = 1,
    models: Sequence[str] | None = None,
    worker: str | None = None,
    max_attempts: int | None = None,
) -> list[Generation]:
    """Hand up to ``max_jobs`` jobs to a worker (SPEC §5); [] when none.

    ``models`` limits the claim to jobs of those models; ``worker`` is kept
    in ``claimed_by``. Jobs come oldest first within a key.
    """
    if not 1 <= max_jobs <= MAX_BATCH:
        raise ValueError(f"max_jobs must be 1..{MAX_BATCH}")
    max_attempts = max_attempts or settings.MAX_ATTEMPTS
    if connection.vendor != "postgresql":
        return _claim_with_the_orm(max_jobs, models, worker, max_attempts)
    sql, params = claim_statement(
        max_jobs=max_jobs, models=models, worker=worker, max_attempts=max_attempts
    )
    for attempt in range(1, CAP_RACE_RETRIES + 1):
        try:
            with transaction.atomic():
                jobs, failed = _run_claim(sql, params)
                announce([job for job in jobs if job.attempts == 1], STARTED)
                announce(failed, FINISHED)
            break
        except (IntegrityError, OperationalError) as exc:
            if attempt == CAP_RACE_RETRIES or not _lost_a_race(exc):
                raise
            logger.info("claim lost a race (%s); trying again", type(exc.__cause__))
    for job in failed:
        logger.warning("generation %s failed: lease expired", job.pk)
    return sorted(jobs, key=lambda job: (job.created_at, job.id))


def claim_statement(
    *,
    max_jobs: int,
    models: Sequence[str] | None,
    worker: str | None,
    max_attempts: int,
) -> tuple[str, dict[str, object]]:
    """The claim's SQL and its parameters (also what bench and the plan test
    EXPLAIN)."""
    params = {
        "models": list(models) if models else None,
        "worker": worker,
        "lease": settings.LEASE_SECONDS,
        "max_attempts": max_attempts,
        "exhausted_before": EXHAUSTED[0],
        "exhausted_after": EXHAUSTED[1],
    }
    return claim_sql(routed=bool(models), max_jobs=max_jobs), params


def _lost_a_race(exc: Exception) -> bool:
    """The claim met another transaction, not a fault: try it again.

    The trigger's cap guard (a capped key's slot taken by a claim that
    committed after this statement's snapshot) or a deadlock the database
    broke by cancelling this claim.
    """
    return isinstance(exc.__cause__, CheckViolation | DeadlockDetected)


def _run_claim(
    sql: str, params: dict[str, object]
) -> tuple[list[Generation], list[Generation]]:
    """The jobs claimed, and those failed for running out of attempts."""
    claimed: list[Generation] = []
    failed: list[Generation] = []
    for is_claimed, *values in fetch_all_prepared(sql, params):
        job = from_row(Generation, values)
        (claimed if is_claimed else failed).append(job)
    return claimed, failed


def _claim_with_the_orm(
    max_jobs: int, models: Sequence[str] | None, worker: str | None, max_attempts: int
) -> list[Generation]:
    """The SQLite development fallback: expired leases first, then the oldest
    jobs, never past a key's cap; no turns between keys.

    SQLite lets one writer in at a time, which is what makes the Python cap
    check safe there; PostgreSQL never takes this path.
    """
    claimed: list[Generation] = []
    with transaction.atomic():
        expired = Generation.objects.expired_leases()
        expired.filter(attempts__gte=max_attempts).update(
            **transition_values(Status.FAILED),
            error_message=Concat(
                Value(EXHAUSTED[0]),
                Cast("attempts", output_field=CharField()),
                Value(EXHAUSTED[1]),
            ),
        )
        claimable = Generation.objects.select_related("api_key")
        if models:
            claimable = claimable.filter(model__in=models)
        candidates = [
            *claimable.filter(pk__in=expired.values("pk")),
            *claimable.filter(status=Status.QUEUED).order_by("created_at", "id"),
        ]
        for job in candidates:
            if len(claimed) == max_jobs:
                break
            if job.status == Status.QUEUED and _at_cap(job.api_key):
                continue
            values = transition_values(
                Status.RUNNING, lease_seconds=settings.LEASE_SECONDS
            )
            Generation.objects.filter(pk=job.pk).update(**values, claimed_by=worker)
            claimed.append(Generation.objects.get(pk=job.pk))
    return claimed


def _at_cap(api_key: ApiKey | None) -> bool:
    if api_key is None or api_key.max_running is None:
        return False
    running = Generation.objects.filter(api_key=api_key, status=Status.RUNNING)
    return running.count() >= api_key.max_running
