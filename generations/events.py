"""The webhook events of a job's transitions (SPEC §10).

Called by the transitions inside their own transaction: ``webhooks``' outbox
writes the delivery in that transaction, so a transition that rolls back
announces nothing and one that commits is delivered at least once. Which
jobs get an event (their webhook and its ``webhook_events_filter``) is
decided in the outbox's statement (``webhooks.services.emit``).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable

from django.db import connection

from generations.models import Generation
from webhooks.services import emit, emit_reading

STARTED = "generation.start"  # a job's first claim
FINISHED = "generation.completed"  # completed, failed or cancelled


def announce(generations: Iterable[Generation], event: str) -> None:
    """Queue ``event`` for each of these jobs whose webhook wants it."""
    announce_ids(
        [generation.pk for generation in generations if generation.webhook], event
    )


def announce_ids(pks: Collection[uuid.UUID], event: str) -> None:
    """``announce`` by id, for jobs known to have a webhook (a job without one
    gets nothing; leaving it out saves the statement)."""
    if pks:
        emit(pks, event)


def read_announcing(pk: uuid.UUID, event: str) -> Generation:
    """The job ``pk`` as its transition just wrote it, with ``event``
    announced: on PostgreSQL one statement reads it and writes the outbox
    (``webhooks.services.emit_reading``), whether it has a webhook or not."""
    if connection.vendor != "postgresql":
        generation = Generation.objects.get(pk=pk)
        announce([generation], event)
        return generation
    return emit_reading(pk, event)
