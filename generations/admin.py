"""Generations in the admin: list, search, filters (incl. deleted), cancel.

Jobs are created through the API, so there is no add form; status changes go
through the services (the "cancel" action, and deleting, which cancels a
queued or running job), never through the form.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest

from generations.models import Generation, InvalidTransition
from generations.services import (
    editable_fields,
    generation_cancel,
    generation_delete_many,
    generation_restore_many,
    generation_update,
)
from lockngen.admin import SoftDeleteAdmin


@admin.register(Generation)
class GenerationAdmin(SoftDeleteAdmin):
    list_display = (
        "title",
        "status",
        "model",
        "size",
        "created_at",
        "duration",
        "attempts",
        "claimed_by",
        "is_deleted",
    )
    list_filter = ("status", "model", "is_deleted", "created_at")
    search_fields = ("prompt", "name", "claimed_by")
    date_hierarchy = "created_at"
    actions = ["cancel", *SoftDeleteAdmin.soft_delete_actions]
    soft_delete_rows = staticmethod(generation_delete_many)
    restore_rows = staticmethod(generation_restore_many)
    fields = (
        "id",
        "name",
        "status",
        "prompt",
        "negative_prompt",
        "model",
        ("width", "height"),
        ("steps", "guidance", "seed"),
        "api_key",
        "idempotency_key",
        "prompt_id",
        "output_path",
        "thumbnail_path",
        "error_message",
        ("created_at", "updated_at"),
        ("started_at", "lease_expires_at", "attempts"),
        "claimed_by",
        ("completed_at", "duration_ms"),
        ("is_deleted", "deleted_at"),
    )

    def get_readonly_fields(
        self, request: HttpRequest, obj: Generation | None = None
    ) -> Any:
        return [
            name
            for group in self.fields
            for name in (group if isinstance(group, tuple) else (group,))
            if name not in editable_fields(by_admin=True)
        ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="generation", ordering="name")
    def title(self, obj: Generation) -> str:
        return obj.name or obj.prompt[:60]

    @admin.display(description="size", ordering="width")
    def size(self, obj: Generation) -> str:
        return f"{obj.width}×{obj.height}"

    @admin.display(description="duration", ordering="duration_ms")
    def duration(self, obj: Generation) -> str | None:
        return None if obj.duration_ms is None else f"{obj.duration_ms / 1000:.1f} s"

    def save_model(
        self, request: HttpRequest, obj: Generation, form: ModelForm, change: bool
    ) -> None:
        changed = {name: form.cleaned_data[name] for name in form.changed_data}
        if changed:
            generation_update(generation=obj, by_admin=True, **changed)

    @admin.action(permissions=["change"], description="Cancel selected generations")
    def cancel(self, request: HttpRequest, queryset: QuerySet) -> None:
        cancelled = refused = 0
        for generation in queryset:
            try:
                generation_cancel(generation=generation)
            except (InvalidTransition, Generation.DoesNotExist):
                refused += 1  # terminal (or deleted) jobs keep their status
                continue
            cancelled += 1
        self.message_user(request, f"Cancelled {cancelled} generation(s).")
        if refused:
            self.message_user(
                request,
                f"{refused} generation(s) were already finished or deleted and "
                "kept their status.",
                messages.WARNING,
            )
