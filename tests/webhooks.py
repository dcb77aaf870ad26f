"""Helpers of the webhook tests: verifying deliveries three ways, making jobs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import standardwebhooks
import svix

from tests.receiver import Received


def spec_signatures(secret: str, received: Received) -> set[str]:
    """The ``v1,`` signature of one secret, computed from the Standard Webhooks
    text itself: base64 HMAC-SHA256 of ``id.timestamp.body`` under the base64
    secret after ``whsec_``. (svix's Python verifier now wraps the
    standardwebhooks package, so this is the check no library shares.)"""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = b".".join(
        [
            received.headers["webhook-id"].encode(),
            received.headers["webhook-timestamp"].encode(),
            received.body,
        ]
    )
    return {
        "v1,"
        + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    }


def verifies(secret: str, received: Received) -> bool:
    """Whether ``received`` carries a valid signature under ``secret``, by
    svix's verifier, standardwebhooks' and the spec's formula — all three
    must agree."""
    verdicts = []
    for verifier in (svix.Webhook(secret), standardwebhooks.Webhook(secret)):
        try:
            verifier.verify(received.body, dict(received.headers))
            verdicts.append(True)
        except (
            svix.WebhookVerificationError,
            standardwebhooks.WebhookVerificationError,
        ):
            verdicts.append(False)
    offered = set(received.headers["webhook-signature"].split(" "))
    verdicts.append(bool(spec_signatures(secret, received) & offered))
    assert len(set(verdicts)) == 1, f"verifiers disagree: {verdicts}"
    return verdicts[0]


def payload(received: Received) -> dict[str, Any]:
    return json.loads(received.body)


def job_of(delivery: Any) -> int:
    """The id of the procrastinate job that delivers ``delivery`` (its first)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT min(id) FROM procrastinate_jobs WHERE args ->> 'delivery_id' = %s",
            [str(delivery.pk)],
        )
        return cursor.fetchone()[0]


def emit(
    generation: Any,
    event: str = "generation.completed",
    *,
    url: str | None,
    events_filter: Any = None,
) -> Any:
    """The delivery a transition's outbox writes of ``event`` for
    ``generation`` once its webhook is ``url`` (and its filter
    ``events_filter``, None: both), or None when it writes none.

    In an atomic block of its own (a savepoint inside the caller's), as a
    transition would be; the job's webhook is set on the row and on
    ``generation``, so its JSON is still the row's.
    """
    from django.db import transaction

    from generations.models import WEBHOOK_EVENTS, Generation, events_filter_text
    from webhooks import services
    from webhooks.models import WebhookDelivery

    generation.webhook = url
    generation.webhook_events_filter = events_filter_text(
        WEBHOOK_EVENTS if events_filter is None else events_filter
    )
    with transaction.atomic():
        Generation.all_objects.filter(pk=generation.pk).update(
            webhook=generation.webhook,
            webhook_events_filter=generation.webhook_events_filter,
        )
        ids = services.emit([generation.pk], event)
    return WebhookDelivery.objects.get(pk=ids[0]) if ids else None
