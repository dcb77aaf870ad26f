"""API keys in the admin: list, search, filters, revoke, soft delete, restore.

A key added here is created by ``api_key_create``; its raw value is shown once
as a warning message and never again (only its prefix and hash are stored).
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest

from apikeys.models import ApiKey
from apikeys.services import (
    api_key_create,
    api_key_delete_many,
    api_key_restore_many,
    api_key_revoke,
)
from lockngen.admin import SoftDeleteAdmin

ADD_FIELDS = (
    "name",
    "is_admin",
    "is_worker",
    "rate_limit",
    "max_running",
    "expires_at",
)
READONLY_FIELDS = (
    "key_prefix",
    "key_hash",
    "active",
    "created_at",
    "last_used_at",
    "revoked_at",
    "is_deleted",
    "deleted_at",
)


class ActiveFilter(admin.SimpleListFilter):
    title = "active"
    parameter_name = "active"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "yes":
            return queryset.filter(ApiKey.active_condition())
        if self.value() == "no":
            return queryset.exclude(ApiKey.active_condition())
        return queryset


@admin.register(ApiKey)
class ApiKeyAdmin(SoftDeleteAdmin):
    list_display = (
        "name",
        "key_prefix",
        "is_admin",
        "is_worker",
        "rate_limit",
        "max_running",
        "last_used_at",
        "active",
        "created_at",
    )
    list_filter = (
        ActiveFilter,
        "is_admin",
        "is_worker",
        "is_deleted",
        "created_at",
    )
    search_fields = ("name", "^key_prefix")
    date_hierarchy = "created_at"
    actions = ["revoke", *SoftDeleteAdmin.soft_delete_actions]
    soft_delete_rows = staticmethod(api_key_delete_many)
    restore_rows = staticmethod(api_key_restore_many)

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        # ``is_active`` for every listed key from the list's own query.
        return super().get_queryset(request).with_is_active()

    @admin.display(boolean=True, description="active")
    def active(self, obj: ApiKey) -> bool:
        return obj.is_active

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        if obj is None:
            return ADD_FIELDS
        return (*ADD_FIELDS, *READONLY_FIELDS)

    def get_readonly_fields(
        self, request: HttpRequest, obj: ApiKey | None = None
    ) -> Any:
        return () if obj is None else READONLY_FIELDS

    def save_model(
        self, request: HttpRequest, obj: ApiKey, form: ModelForm, change: bool
    ) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        data = form.cleaned_data
        api_key, raw_key = api_key_create(
            name=data["name"],
            is_admin=data["is_admin"],
            is_worker=data["is_worker"],
            rate_limit=data["rate_limit"],
            max_running=data["max_running"],
            expires_at=data["expires_at"],
        )
        # The admin goes on with ``obj`` (log entry, redirect): make it the row,
        # database defaults (created_at) included.
        obj.pk = api_key.pk
        obj.refresh_from_db()
        self.message_user(
            request,
            f"The new API key is {raw_key} — copy it now: it is shown only "
            "this once and cannot be recovered.",
            messages.WARNING,
        )

    @admin.action(permissions=["change"], description="Revoke selected API keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = 0
        for api_key in queryset.filter(revoked_at__isnull=True):
            api_key_revoke(api_key=api_key)
            count += 1
        self.message_user(request, f"Revoked {count} API key(s).")
