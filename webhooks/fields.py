"""DRF input fields for a job's webhook (create-time validation, SPEC §10).

Wiring them into the create serializer is one line each::

    webhook = WebhookURLField(required=False, allow_null=True)
    webhook_events_filter = WebhookEventsFilterField(required=False)
"""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from lockngen.http.fields import StrictCharField
from webhooks import guard
from webhooks.models import EVENT_BY_FILTER_NAME
from webhooks.services import WebhooksUnavailable, webhook_url_check


class WebhookURLField(StrictCharField):
    """An ``http(s)`` URL that passes the SSRF guard now (it is checked again
    at every delivery attempt)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", guard.MAX_URL_LENGTH)
        kwargs.setdefault(
            "help_text",
            "Where this job's events are POSTed (https; http in development). "
            "Its host must resolve to public addresses only.",
        )
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        url = super().to_internal_value(data)
        try:
            return webhook_url_check(url)
        except (guard.UnsafeURL, WebhooksUnavailable) as exc:
            raise serializers.ValidationError(str(exc), code="invalid") from None


class WebhookEventsFilterField(serializers.ListField):
    """The events a job's webhook gets: a subset of ``start``, ``completed``."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("child", serializers.ChoiceField(list(EVENT_BY_FILTER_NAME)))
        kwargs.setdefault("max_length", len(EVENT_BY_FILTER_NAME))
        kwargs.setdefault("help_text", "Default: both.")
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> list[str]:
        values = super().to_internal_value(data)
        # Stored in a fixed order without repeats: ["completed", "start"] and
        # ["start", "completed"] are one filter.
        return [name for name in EVENT_BY_FILTER_NAME if name in values]
