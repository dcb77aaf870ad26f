from __future__ import annotations

import uuid

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q
from django.db.models.functions import Now
from django.utils import timezone

from lockngen.softdelete import SoftDeleteModel


class HashField(models.CharField):
    """SHA-256 hex digest: ``char(64)`` in PostgreSQL, not ``varchar``."""

    def db_type(self, connection) -> str:  # type: ignore[no-untyped-def]
        if connection.vendor == "postgresql":
            return f"char({self.max_length})"
        return super().db_type(connection)


class ApiKey(SoftDeleteModel):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=255)
    key_hash = HashField(max_length=64, unique=True, editable=False)
    key_prefix = models.CharField(max_length=16, unique=True, editable=False)
    is_admin = models.BooleanField(default=False, db_default=False)
    rate_limit = models.IntegerField(
        default=100,
        db_default=100,
        validators=[MinValueValidator(0)],
        help_text="Requests per minute; 0 = unlimited (workers).",
    )
    created_at = models.DateTimeField(
        default=timezone.now, db_default=Now(), editable=False
    )
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta(SoftDeleteModel.Meta):
        db_table = "api_keys"
        verbose_name = "API key"
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(rate_limit__gte=0), name="api_keys_rate_limit_gte_0"
            ),
            models.CheckConstraint(
                condition=Q(key_prefix__startswith="lk_"),
                name="api_keys_key_prefix_format",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.key_prefix}…)"

    @property
    def prefix(self) -> str:
        return self.key_prefix

    @staticmethod
    def active_condition() -> Q:
        """``is_active`` as a query: not revoked, not expired, not deleted."""
        return Q(is_deleted=False, revoked_at__isnull=True) & (
            Q(expires_at__isnull=True) | Q(expires_at__gt=Now())
        )

    @property
    def is_active(self) -> bool:
        return (
            not self.is_deleted
            and self.revoked_at is None
            and (self.expires_at is None or self.expires_at > timezone.now())
        )

    def clean(self) -> None:
        # Revocation is one-way: a revoked key can never be brought back.
        if not self._state.adding and self.revoked_at is None:
            stored = (
                type(self)
                .all_objects.filter(pk=self.pk)
                .values_list("revoked_at", flat=True)
                .first()
            )
            if stored is not None:
                raise ValidationError("A revoked API key cannot be un-revoked.")

    def save(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.clean()
        super().save(*args, **kwargs)
