"""Webhook deliveries in the admin: read-only, filters, a redeliver action.

The signing secrets are deliberately not in the admin (SPEC §3: never in the
admin list); an owner reads theirs with ``GET /api/v1/webhooks/secret``.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from webhooks.models import WebhookDelivery
from webhooks.services import (
    WebhooksUnavailable,
    delivery_payload,
    delivery_redeliver,
)


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "event",
        "state",
        "attempts",
        "last_status",
        "generation",
        "created_at",
        "last_attempt_at",
        "next_attempt_at",
    )
    list_filter = ("state", "event", "created_at")
    search_fields = ("=id", "=generation__id", "url")
    date_hierarchy = "created_at"
    list_select_related = ("generation",)
    show_full_result_count = False
    actions = ["redeliver"]
    fields = (
        "id",
        "generation",
        "event",
        "url",
        "state",
        ("attempts", "last_status"),
        ("created_at", "last_attempt_at"),
        ("next_attempt_at", "delivered_at"),
        "body",
    )

    def get_readonly_fields(
        self, request: HttpRequest, obj: WebhookDelivery | None = None
    ) -> Any:
        return [
            name
            for group in self.fields
            for name in (group if isinstance(group, tuple) else (group,))
        ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # deliveries come from transitions only

    @admin.display(description="payload")
    def body(self, obj: WebhookDelivery) -> str:
        """What it sends: as sent, or (before the first attempt) as it will be."""
        return delivery_payload(obj)

    def has_delete_permission(
        self, request: HttpRequest, obj: WebhookDelivery | None = None
    ) -> bool:
        return False  # purge_deleted's retention removes old ones

    @admin.action(
        description="Redeliver: one more attempt now, same webhook-id",
        permissions=["change"],
    )
    def redeliver(self, request: HttpRequest, queryset: QuerySet) -> None:
        try:
            for row in queryset:
                delivery_redeliver(delivery=row)
        except WebhooksUnavailable as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        self.message_user(
            request, f"{queryset.count()} delivery(ies) queued for one more attempt."
        )
