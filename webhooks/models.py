"""Webhook deliveries (the outbox's durable record) and each key's signing secrets.

A delivery row is written in the same transaction as the transition that
causes it (``webhooks.services.emit``), with the job as the transition left
it; the first attempt renders the payload from that and keeps it. Its id is
the Standard Webhooks ``webhook-id``, the same on every attempt. The secrets
live in a table of their own, one row per API key, so that no key JSON, key
admin page or key query ever carries them.
"""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now

EVENT_START = "generation.start"
EVENT_COMPLETED = "generation.completed"
# The names a job's ``webhook_events_filter`` uses (SPEC §3), and their events.
EVENT_BY_FILTER_NAME = {"start": EVENT_START, "completed": EVENT_COMPLETED}


class Event(models.TextChoices):
    START = EVENT_START, "generation.start"
    COMPLETED = EVENT_COMPLETED, "generation.completed"


class DeliveryState(models.TextChoices):
    PENDING = "pending", "pending"
    DELIVERED = "delivered", "delivered"
    FAILED = "failed", "failed"  # the retry schedule is exhausted
    GONE = "gone", "gone"  # the receiver answered 410


class WebhookDelivery(models.Model):
    id = models.UUIDField(
        primary_key=True,
        default=uuid.uuid4,
        editable=False,
        help_text="The webhook-id header: the receiver's idempotency key.",
    )
    # db_index off: the (generation, created_at) index below serves the FK too.
    generation = models.ForeignKey(
        "generations.Generation",
        on_delete=models.CASCADE,
        related_name="webhook_deliveries",
        db_index=False,
    )
    event = models.CharField(max_length=32, choices=Event.choices)
    url = models.CharField(max_length=2000)
    # The job as the event saw it (``to_jsonb`` of its row, written in the
    # statement that reads the transition back: ``services.emit``), until
    # the first attempt renders the payload from it.
    snapshot = models.JSONField(null=True, blank=True, editable=False)
    # The exact body sent (text, not jsonb: jsonb would reorder its keys),
    # rendered once, at the first attempt; every later one sends it again.
    # NULL until then: "not made yet", which no body (JSON) can be mistaken for.
    payload = models.TextField(null=True, blank=True)  # noqa: DJ001
    created_at = models.DateTimeField(db_default=Now(), editable=False)
    state = models.CharField(
        max_length=16,
        choices=DeliveryState.choices,
        default=DeliveryState.PENDING,
        db_default=DeliveryState.PENDING,
    )
    attempts = models.IntegerField(default=0, db_default=0)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    # An HTTP status code, or a short error ("timeout", "connection refused").
    last_status = models.CharField(max_length=100, blank=True, default="")
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "webhook_deliveries"
        verbose_name_plural = "webhook deliveries"
        ordering = ["-created_at"]
        indexes = [
            # GET /generations/{id}/deliveries, in order.
            models.Index(
                fields=["generation", "created_at", "id"],
                name="webhook_deliv_generation",
            ),
            # The pending gauges: count and oldest age.
            models.Index(
                fields=["created_at"],
                name="webhook_deliv_pending",
                condition=Q(state=DeliveryState.PENDING),
            ),
            # The "failed in the last hour" gauge.
            models.Index(
                fields=["last_attempt_at"],
                name="webhook_deliv_failed",
                condition=Q(state=DeliveryState.FAILED),
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(attempts__gte=0), name="webhook_deliv_attempts_gte_0"
            ),
            models.CheckConstraint(
                condition=Q(state__in=DeliveryState.values),
                name="webhook_deliv_state_valid",
            ),
            models.CheckConstraint(
                condition=Q(event__in=Event.values), name="webhook_deliv_event_valid"
            ),
            # Something to send: the job's snapshot, or the payload made from it.
            models.CheckConstraint(
                condition=Q(payload__isnull=False) | Q(snapshot__isnull=False),
                name="webhook_deliv_has_body",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event} {self.id} ({self.state})"


class WebhookSecret(models.Model):
    """An API key's signing secret, and the one it replaced while both verify."""

    api_key = models.OneToOneField(
        "apikeys.ApiKey",
        on_delete=models.CASCADE,
        primary_key=True,
        related_name="webhook_secret",
    )
    current = models.CharField(max_length=100, editable=False)
    previous = models.CharField(max_length=100, blank=True, default="", editable=False)
    created_at = models.DateTimeField(db_default=Now(), editable=False)
    # When ``current`` replaced ``previous``; deliveries carry both signatures
    # for ROTATION_OVERLAP after it.
    rotated_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        db_table = "webhook_secrets"
        constraints = [
            models.CheckConstraint(
                condition=Q(current__startswith="whsec_"),
                name="webhook_secrets_current_format",
            ),
        ]

    # Never the secrets themselves: these reach logs, shells and error pages.
    def __str__(self) -> str:
        return f"webhook secret of key {self.api_key_id}"

    def __repr__(self) -> str:
        return f"<WebhookSecret: {self}>"
