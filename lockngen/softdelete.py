"""Soft delete shared by both apps: deleted rows stay, hidden by default.

``Model.objects`` is the default manager and hides deleted rows, so reverse
relations (``api_key.generations``) hide them too; ``Model.all_objects`` shows
everything. ``delete()`` on an instance or a queryset is one UPDATE; the
instance's goes through the queryset's, and a model whose soft delete must do
more (a generation is cancelled when deleted live) extends
``soft_delete_values``, so no caller can skip its rule.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.db import models
from django.db.models.functions import Now


class SoftDeleteQuerySet(models.QuerySet):
    def soft_delete_values(self) -> dict[str, Any]:
        """What soft-deleting a row writes; a model with more rules extends it."""
        return {"is_deleted": True, "deleted_at": Now()}

    def delete(self) -> tuple[int, dict[str, int]]:
        """Soft-delete every row in one UPDATE; returns Django's delete shape."""
        count = self.filter(is_deleted=False).update(**self.soft_delete_values())
        return count, {self.model._meta.label: count}

    delete.alters_data = True

    def hard_delete(self) -> tuple[int, dict[str, int]]:
        return super().delete()

    hard_delete.alters_data = True

    def restore(self) -> int:
        return self.filter(is_deleted=True).update(is_deleted=False, deleted_at=None)

    restore.alters_data = True


class SoftDeleteManager(models.Manager.from_queryset(SoftDeleteQuerySet)):
    """Hides deleted rows; used for ``objects`` and for related managers."""

    def get_queryset(self) -> SoftDeleteQuerySet:
        return super().get_queryset().filter(is_deleted=False)


AllObjectsManager = models.Manager.from_queryset(SoftDeleteQuerySet)


class SoftDeleteModel(models.Model):
    is_deleted = models.BooleanField(default=False, db_default=False)
    deleted_at = models.DateTimeField(null=True, blank=True)

    objects: ClassVar[SoftDeleteManager] = SoftDeleteManager()
    all_objects: ClassVar[Any] = AllObjectsManager()

    class Meta:
        abstract = True
        base_manager_name = "all_objects"
        default_manager_name = "objects"

    def delete(
        self, using: str | None = None, keep_parents: bool = False
    ) -> tuple[int, dict[str, int]]:
        # Through the queryset, so the model's own delete rules apply here too.
        rows = type(self).all_objects.filter(pk=self.pk)
        count, detail = rows.delete()
        self.refresh_from_db(fields=list(rows.soft_delete_values()))
        return count, detail

    delete.alters_data = True

    def hard_delete(self) -> tuple[int, dict[str, int]]:
        return super().delete()

    hard_delete.alters_data = True

    def restore(self) -> None:
        type(self).all_objects.filter(pk=self.pk).update(
            is_deleted=False, deleted_at=None
        )
        self.is_deleted, self.deleted_at = False, None

    restore.alters_data = True
