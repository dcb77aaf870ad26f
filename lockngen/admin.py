"""Admin behaviour shared by both apps' soft-deleted models.

The changelist shows every row (``all_objects``) with an "is deleted" filter;
"delete" in the admin is the model's soft delete (so PROTECT does not block
it); restore; and a confirmed hard delete for superusers only, which skips
rows other rows still reference.

Soft delete and restore — the actions and the delete page alike — go through
the app's services (``soft_delete_rows`` / ``restore_rows``, which each app's
admin names), never straight to the model (SPEC §11).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db import transaction
from django.db.models import ProtectedError, QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse

HARD_DELETE_PREVIEW = 100


class SoftDeleteAdmin(admin.ModelAdmin):
    soft_delete_actions = ["soft_delete", "restore", "hard_delete"]
    show_full_result_count = False  # one COUNT per page is enough on big tables
    # The app's services: ``queryset`` → rows changed.
    soft_delete_rows: ClassVar[Callable[..., int]]
    restore_rows: ClassVar[Callable[..., int]]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        queryset = self.model.all_objects.get_queryset()
        ordering = self.get_ordering(request)
        return queryset.order_by(*ordering) if ordering else queryset

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        # Replaced by "soft delete", which needs no cascade preview.
        actions.pop("delete_selected", None)
        return actions

    def get_deleted_objects(
        self, objs: Any, request: HttpRequest
    ) -> tuple[list[Any], dict[str, int], set[str], list[Any]]:
        """The delete view soft-deletes: only the object itself is affected."""
        objs = list(objs)
        return objs, {self.opts.verbose_name_plural: len(objs)}, set(), []

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        """The delete page: the same service as the soft-delete action."""
        self.soft_delete_rows(queryset=self.model.all_objects.filter(pk=obj.pk))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        self.soft_delete_rows(queryset=queryset)

    def has_hard_delete_permission(self, request: HttpRequest) -> bool:
        return request.user.is_superuser

    @admin.action(
        permissions=["delete"],
        description="Soft delete selected %(verbose_name_plural)s",
    )
    def soft_delete(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = self.soft_delete_rows(queryset=queryset)
        self.message_user(request, f"Soft-deleted {count} {self._plural(count)}.")

    @admin.action(
        permissions=["change"], description="Restore selected %(verbose_name_plural)s"
    )
    def restore(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = self.restore_rows(queryset=queryset)
        self.message_user(request, f"Restored {count} {self._plural(count)}.")

    @admin.action(
        permissions=["hard_delete"],
        description="Delete selected %(verbose_name_plural)s permanently",
    )
    def hard_delete(
        self, request: HttpRequest, queryset: QuerySet
    ) -> TemplateResponse | None:
        if request.POST.get("confirm") != "yes":
            return self._confirm_hard_delete(request, queryset)
        deleted = protected = 0
        for obj in queryset:
            try:
                with transaction.atomic():
                    obj.hard_delete()
            except ProtectedError:
                protected += 1
                continue
            deleted += 1
        self.message_user(
            request, f"Permanently deleted {deleted} {self._plural(deleted)}."
        )
        if protected:
            self.message_user(
                request,
                f"Kept {protected} {self._plural(protected)} that other rows "
                "still reference.",
                messages.WARNING,
            )
        return None

    def _confirm_hard_delete(
        self, request: HttpRequest, queryset: QuerySet
    ) -> TemplateResponse:
        objects = list(queryset[: HARD_DELETE_PREVIEW + 1])
        count = queryset.count()
        context = {
            **self.admin_site.each_context(request),
            "title": "Delete permanently?",
            "opts": self.opts,
            "objects": objects[:HARD_DELETE_PREVIEW],
            "more": max(0, count - HARD_DELETE_PREVIEW),
            "count": count,
            "plural": self._plural(count),
            "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
            "select_across": request.POST.get("select_across", "0"),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "action": "hard_delete",
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(
            request, "admin/lockngen/hard_delete_confirmation.html", context
        )

    def _plural(self, count: int) -> str:
        return str(
            self.opts.verbose_name if count == 1 else self.opts.verbose_name_plural
        )
