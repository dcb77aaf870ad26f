"""Generation workflows: create, heartbeat, complete, fail, cancel, delete.

Views, admin and commands call these; the status machine itself lives in
``Generation.transition_to`` / ``transition_values``; the claim in
``generations.claims``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import QuerySet
from django.db.models.functions import Now

from apikeys.models import ApiKey
from generations.events import FINISHED, announce, read_announcing
from generations.models import (
    REQUEST_FIELDS,
    Generation,
    InvalidTransition,
    Status,
    events_filter_text,
    lease_expiry,
    transition_values,
)
from lockngen.rows import insert_one


class IdempotencyConflict(Exception):
    """The key was used for a generation that has since been deleted."""


class IdempotencyKeyReused(Exception):
    """The key was used for a request with a different body."""


def request_fingerprint(generation: Generation) -> str:
    """SHA-256 of the create request as the service understood it (SPEC §11).

    Taken from the unsaved row, i.e. after validation and model defaults: a
    field left out and the same field sent with its default value make the
    same job, so they have the same fingerprint; so do ``7.5`` and ``7.50``,
    or a name with and without surrounding whitespace (the API trims it).
    """
    canonical = {name: getattr(generation, name) for name in REQUEST_FIELDS}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _insert(generation: Generation) -> Generation:
    # The create endpoint's INSERT as a fixed SQL string on PostgreSQL: the
    # ORM compiles it anew on every save (docs/PERFORMANCE.md, "Write path").
    if connection.vendor != "postgresql":
        generation.save(force_insert=True)
        return generation
    return insert_one(generation)


def generation_create(
    *,
    api_key: ApiKey | None,
    idempotency_key: str | None = None,
    **fields: Any,
) -> tuple[Generation, bool]:
    """Queue a new generation; returns ``(generation, created)``.

    With an ``idempotency_key`` a repeat from the same API key with the same
    request returns the original; with another request it raises
    IdempotencyKeyReused. The partial unique index decides races: the
    loser's INSERT fails inside a savepoint and it reads the winner's row.
    """
    events = fields.get("webhook_events_filter")
    if events is not None and not isinstance(events, str):
        fields["webhook_events_filter"] = events_filter_text(events)
    generation = Generation(api_key=api_key, idempotency_key=idempotency_key, **fields)
    if idempotency_key is None:
        return _insert(generation), True
    generation.request_fingerprint = request_fingerprint(generation)
    try:
        with transaction.atomic():
            return _insert(generation), True
    except IntegrityError:
        # Whichever constraint refused the row, a row holding this key is the
        # answer (the error text names the constraint only on PostgreSQL).
        original = Generation.all_objects.filter(
            api_key=api_key, idempotency_key=idempotency_key
        ).first()
        if original is None:
            raise
    # Rows made before fingerprints existed (NULL) cannot be compared: their
    # repeats are answered as before.
    stored = original.request_fingerprint
    if stored is not None and stored != generation.request_fingerprint:
        raise IdempotencyKeyReused(idempotency_key)
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
    generation = _save_transition(_locked(generation), Status.CANCELLED)
    announce([generation], FINISHED)
    return generation


def generation_delete(*, generation: Generation) -> None:
    """Soft-delete a generation; a queued or running one is cancelled first.

    The cancel is the model's own soft-delete rule
    (``GenerationQuerySet.soft_delete_values``), so the admin, querysets and
    instances get it too. Raises ``Generation.DoesNotExist`` when the row was
    deleted meanwhile.
    """
    deleted, _ = Generation.objects.filter(pk=generation.pk).delete()
    if not deleted:
        raise Generation.DoesNotExist(generation.pk)


def generation_delete_many(*, queryset: QuerySet[Generation]) -> int:
    """Soft-delete every row of ``queryset`` (live ones cancelled); the count."""
    deleted, _ = queryset.delete()
    return deleted


def generation_restore_many(*, queryset: QuerySet[Generation]) -> int:
    """Bring deleted rows back; a job deleted while live stays cancelled."""
    return queryset.restore()


class LeaseLost(Exception):
    """The lease token is not the job's current one (SPEC §5, "Fencing").

    The lease expired and the job went back to the queue or to another
    worker, or the token was never this job's.
    """


def _fenced(
    pk: uuid.UUID,
    lease_token: uuid.UUID,
    values: dict[str, Any],
    *,
    announcing: str | None = None,
) -> Generation | None:
    """Apply ``values`` only if ``lease_token`` holds the running job; the job
    as written, with the event ``announcing`` queued (``read_announcing``).

    The token is checked in the WHERE of the one UPDATE that changes the row,
    so no check-then-act can race with a re-claim. Inside the transaction the
    UPDATE's row lock keeps the read-back equal to what was written. Inside
    a caller's transaction (``_finish``) no savepoint is needed: nothing here
    is caught and retried.
    """
    with transaction.atomic(savepoint=False):
        changed = Generation.objects.filter(
            pk=pk, lease_token=lease_token, status=Status.RUNNING
        ).update(**values)
        if not changed:
            return None
        if announcing is None:
            return Generation.objects.get(pk=pk)
        return read_announcing(pk, announcing)


def _why_refused(pk: uuid.UUID, target: Status) -> Exception:
    """Why a fenced UPDATE matched nothing (read after it, only on refusal)."""
    status = Generation.objects.filter(pk=pk).values_list("status", flat=True).first()
    if status is None:
        return Generation.DoesNotExist(pk)
    if status in (Status.RUNNING, Status.QUEUED):
        return LeaseLost(pk)
    return InvalidTransition(Status(status), target)


def _finish(
    pk: uuid.UUID, lease_token: uuid.UUID, target: Status, extra: dict[str, Any]
) -> Generation:
    with transaction.atomic():
        values = transition_values(target) | extra
        generation = _fenced(pk, lease_token, values, announcing=FINISHED)
        if generation is None:
            raise _why_refused(pk, target)
    return generation


def generation_complete(
    *,
    pk: uuid.UUID,
    lease_token: uuid.UUID,
    output_path: str,
    thumbnail_path: str | None = None,
    prompt_id: str | None = None,
) -> Generation:
    """The lease holder's result; raises LeaseLost, InvalidTransition, DoesNotExist."""
    extra: dict[str, Any] = {"output_path": output_path}
    if thumbnail_path is not None:
        extra["thumbnail_path"] = thumbnail_path
    if prompt_id is not None:
        extra["prompt_id"] = prompt_id
    return _finish(pk, lease_token, Status.COMPLETED, extra)


def generation_fail(
    *, pk: uuid.UUID, lease_token: uuid.UUID, error_message: str | None = None
) -> Generation:
    """The lease holder gives up; raises LeaseLost, InvalidTransition, DoesNotExist."""
    return _finish(pk, lease_token, Status.FAILED, {"error_message": error_message})


def generation_heartbeat(*, pk: uuid.UUID, lease_token: uuid.UUID) -> Generation:
    """Extend the holder's lease.

    A job cancelled while this token held it is returned unchanged so its
    worker learns to stop (the cancel kept the token; it extends nothing).
    Raises LeaseLost for a token that is not the running job's, nor the
    cancelled job's last holder's; InvalidTransition for a finished job.
    """
    generation = _fenced(
        pk,
        lease_token,
        {"lease_expires_at": lease_expiry(settings.LEASE_SECONDS), "updated_at": Now()},
    )
    if generation is not None:
        return generation
    refusal = _why_refused(pk, Status.RUNNING)
    if isinstance(refusal, InvalidTransition) and refusal.current == Status.CANCELLED:
        cancelled = Generation.objects.filter(pk=pk, lease_token=lease_token).first()
        if cancelled is None:
            raise LeaseLost(pk)
        return cancelled
    raise refusal


# What may change once a job exists, and who may change it (field -> needs
# an admin: an admin API key, or a staff user in the admin). Every other
# field is the client's request or the worker's report.
EDITABLE_FIELDS: dict[str, bool] = {"name": False, "prompt_id": True}


class FieldNotEditable(Exception):
    """The caller may not change these fields (SPEC §5, PATCH)."""

    def __init__(self, fields: list[str]) -> None:
        super().__init__(f"may not change {', '.join(fields)}")
        self.fields = fields


def editable_fields(*, by_admin: bool) -> tuple[str, ...]:
    return tuple(
        name
        for name, admin_only in EDITABLE_FIELDS.items()
        if by_admin or not admin_only
    )


@transaction.atomic
def generation_update(
    *, generation: Generation, by_admin: bool, **fields: Any
) -> Generation:
    """Rename, or (admin) record the render backend's ``prompt_id``.

    Raises ``FieldNotEditable`` for any field the caller may not change,
    before anything is written. The row is re-read under a lock: one deleted
    meanwhile raises ``Generation.DoesNotExist`` instead of being written to.
    """
    allowed = editable_fields(by_admin=by_admin)
    refused = [name for name in fields if name not in allowed]
    if refused:
        raise FieldNotEditable(refused)
    generation = _locked(generation)
    for field, value in fields.items():
        setattr(generation, field, value)
    generation.updated_at = Now()
    generation.save(update_fields=[*fields, "updated_at"])
    generation.refresh_from_db(fields=["updated_at"])
    return generation
