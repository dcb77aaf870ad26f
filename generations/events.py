"""The webhook events of a job's transitions (SPEC §10).

Called by the transitions inside their own transaction: ``webhooks``' outbox
writes the delivery in that transaction, so a transition that rolls back
announces nothing and one that commits is delivered at least once.
"""

from __future__ import annotations

from collections.abc import Iterable

from generations.models import Generation, events_filter_names

STARTED = "generation.start"  # a job's first claim
FINISHED = "generation.completed"  # completed, failed or cancelled


def announce(generations: Iterable[Generation], event: str) -> None:
    """Queue ``event`` for each job that has a webhook wanting it."""
    # Imported here: webhooks' payload is generations.api's JSON, whose
    # module imports the services that call this.
    from webhooks.services import emit

    for generation in generations:
        if generation.webhook:
            emit(
                generation,
                event,
                url=generation.webhook,
                events_filter=events_filter_names(generation.webhook_events_filter),
            )
