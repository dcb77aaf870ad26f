"""Generation workflows: create, claim, heartbeat, complete, fail, cancel.

Views, admin and commands call these; the status machine itself lives in
``Generation.transition_to`` / ``transition_values``.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models.functions import Now

from apikeys.models import ApiKey
from generations.models import Generation, InvalidTransition, Status, lease_expiry
from lockngen.prepared import PreparedInsert

logger = logging.getLogger(__name__)

EXPIRED_SWEEP_BATCH = 100


# ``generation.save(force_insert=True)`` with the INSERT compiled once: the
# create endpoint's biggest single cost after the database round trip.
_INSERT = PreparedInsert(Generation)


class IdempotencyConflict(Exception):
    """The key was used for a generation that has since been deleted."""


def generation_create(
    *,
    api_key: ApiKey | None,
    idempotency_key: str | None = None,
    **fields: Any,
) -> tuple[Generation, bool]:
    """Queue a new generation; returns ``(generation, created)``.

    With an ``idempotency_key`` a repeat from the same API key returns the
    original. The partial unique index decides races: the loser's INSERT
    fails inside a savepoint and it reads the winner's row.
    """
    generation = Generation(api_key=api_key, idempotency_key=idempotency_key, **fields)
    if idempotency_key is None:
        _INSERT.insert(generation)
        return generation, True
    try:
        with transaction.atomic():
            _INSERT.insert(generation)
        return generation, True
    except IntegrityError:
        # Whichever constraint refused the row, a row holding this key is the
        # answer (the error text names the constraint only on PostgreSQL).
        original = Generation.all_objects.filter(
            api_key=api_key, idempotency_key=idempotency_key
        ).first()
        if original is None:
            raise
    if original.is_deleted:
        raise IdempotencyConflict(idempotency_key)
    return original, False


def _save_transition(
    generation: Generation, target: Status, *, extra: dict[str, Any] | None = None
) -> Generation:
    fields = generation.transition_to(target, lease_seconds=settings.LEASE_SECONDS)
    for field, value in (extra or {}).items():
        setattr(generation, field, value)
        fields.append(field)
    generation.save(update_fields=fields)
    generation.refresh_from_db()
    return generation


def _locked(generation: Generation) -> Generation:
    """Re-read the row under a lock so concurrent transitions serialise."""
    return Generation.objects.select_for_update().get(pk=generation.pk)


@transaction.atomic
def generation_cancel(*, generation: Generation) -> Generation:
    """Cancel a queued or running job; raises InvalidTransition if terminal."""
    return _save_transition(_locked(generation), Status.CANCELLED)


@transaction.atomic
def generation_delete(*, generation: Generation) -> None:
    """Soft-delete a generation; a queued or running one is cancelled first.

    Otherwise a deleted running job would stay ``running`` for ever (claims and
    gauges skip deleted rows) while its worker kept rendering it.
    """
    generation = _locked(generation)
    if not generation.is_terminal:
        generation = _save_transition(generation, Status.CANCELLED)
    generation.delete()


@transaction.atomic
def generation_complete(
    *,
    generation: Generation,
    output_path: str,
    thumbnail_path: str | None = None,
    prompt_id: str | None = None,
) -> Generation:
    extra: dict[str, Any] = {"output_path": output_path}
    if thumbnail_path is not None:
        extra["thumbnail_path"] = thumbnail_path
    if prompt_id is not None:
        extra["prompt_id"] = prompt_id
    return _save_transition(_locked(generation), Status.COMPLETED, extra=extra)


@transaction.atomic
def generation_fail(
    *, generation: Generation, error_message: str | None = None
) -> Generation:
    return _save_transition(
        _locked(generation), Status.FAILED, extra={"error_message": error_message}
    )


@transaction.atomic
def generation_heartbeat(*, generation: Generation) -> Generation:
    """Extend a running job's lease.

    A cancelled job is returned unchanged so its worker learns to stop; any
    other non-running state raises InvalidTransition.
    """
    generation = _locked(generation)
    if generation.status == Status.CANCELLED:
        return generation
    if generation.status != Status.RUNNING:
        raise InvalidTransition(Status(generation.status), Status.RUNNING)
    generation.lease_expires_at = lease_expiry(settings.LEASE_SECONDS)
    generation.updated_at = Now()
    generation.save(update_fields=["lease_expires_at", "updated_at"])
    generation.refresh_from_db(fields=["lease_expires_at", "updated_at"])
    return generation


def generation_update(*, generation: Generation, **fields: Any) -> Generation:
    """Rename, or (admin) record the render backend's ``prompt_id``."""
    for field, value in fields.items():
        setattr(generation, field, value)
    generation.updated_at = Now()
    generation.save(update_fields=[*fields, "updated_at"])
    generation.refresh_from_db(fields=["updated_at"])
    return generation


@transaction.atomic
def generation_claim_next(*, max_attempts: int | None = None) -> Generation | None:
    """Hand the next job to a worker, or None when there is nothing to do.

    Expired leases come first: with attempts left the job is claimed again,
    without it fails. Otherwise the oldest queued job is taken. Rows are
    locked with ``FOR UPDATE SKIP LOCKED`` so concurrent workers never receive
    the same job and never wait on each other.
    """
    max_attempts = max_attempts or settings.MAX_ATTEMPTS
    for _ in range(EXPIRED_SWEEP_BATCH):
        expired = (
            Generation.objects.expired_leases()
            .select_for_update(skip_locked=True)
            .first()
        )
        if expired is None:
            break
        if expired.attempts >= max_attempts:
            _save_transition(
                expired,
                Status.FAILED,
                extra={
                    "error_message": (
                        f"lease expired after {expired.attempts} attempt(s); "
                        "no attempts left"
                    )
                },
            )
            logger.warning("generation %s failed: lease expired", expired.pk)
            continue
        expired.transition_to(Status.QUEUED)
        logger.info("generation %s lease expired; claiming again", expired.pk)
        return _save_transition(expired, Status.RUNNING)

    head = Generation.objects.queue_head().select_for_update(skip_locked=True).first()
    if head is None:
        return None
    return _save_transition(head, Status.RUNNING)
