from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, ClassVar

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import BooleanField, ExpressionWrapper, Q
from django.db.models.functions import Now

from lockngen.softdelete import SoftDeleteManager, SoftDeleteModel, SoftDeleteQuerySet

# Requests per minute of a key created without one (0 = unlimited).
DEFAULT_RATE_LIMIT = 100
# A worker key that is also an admin would be an admin (SPEC §5): refused, so
# a key's flags always say what it may do.
ONE_ROLE = "A key is an admin key or a worker key, not both."
# The annotation ``ApiKeyQuerySet.with_is_active`` adds.
IS_ACTIVE_NOW = "is_active_now"


class HashField(models.CharField):
    """SHA-256 hex digest: ``char(64)`` in PostgreSQL, not ``varchar``."""

    def db_type(self, connection: BaseDatabaseWrapper) -> str:
        if connection.vendor == "postgresql":
            return f"char({self.max_length})"
        return super().db_type(connection)


class ApiKeyQuerySet(SoftDeleteQuerySet):
    def with_is_active(self) -> ApiKeyQuerySet:
        """Each key's ``is_active`` as the database evaluates it, in the same query."""
        return self.annotate(
            **{
                IS_ACTIVE_NOW: ExpressionWrapper(
                    ApiKey.active_condition(), output_field=BooleanField()
                )
            }
        )


class ApiKeyManager(SoftDeleteManager.from_queryset(ApiKeyQuerySet)):
    pass


class ApiKey(SoftDeleteModel):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=255)
    key_hash = HashField(max_length=64, unique=True, editable=False)
    key_prefix = models.CharField(max_length=16, unique=True, editable=False)
    is_admin = models.BooleanField(default=False, db_default=False)
    rate_limit = models.IntegerField(
        default=DEFAULT_RATE_LIMIT,
        db_default=DEFAULT_RATE_LIMIT,
        validators=[MinValueValidator(0)],
        help_text="Requests per minute; 0 = unlimited (workers).",
    )
    is_worker = models.BooleanField(
        default=False,
        db_default=False,
        help_text="May only claim jobs and report on the jobs it holds.",
    )
    max_running = models.IntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="At most this many of the key's jobs run at once; empty = no cap.",
    )
    # The database's clock, like every timestamp the service writes (SPEC §11).
    created_at = models.DateTimeField(db_default=Now(), editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects: ClassVar[ApiKeyManager] = ApiKeyManager()
    all_objects: ClassVar[Any] = models.Manager.from_queryset(ApiKeyQuerySet)()
    # ``revoked_at`` as last read from the database (None: never revoked, or
    # not loaded): what the one-way revoke guard compares with, no query.
    loaded_revoked_at = None

    class Meta(SoftDeleteModel.Meta):
        db_table = "api_keys"
        verbose_name = "API key"
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(rate_limit__gte=0), name="api_keys_rate_limit_gte_0"
            ),
            models.CheckConstraint(
                condition=Q(max_running__gte=1), name="api_keys_max_running_gte_1"
            ),
            models.CheckConstraint(
                condition=Q(key_prefix__startswith="lk_"),
                name="api_keys_key_prefix_format",
            ),
            # One role per key; a client key has neither flag.
            models.CheckConstraint(
                condition=~Q(is_admin=True, is_worker=True),
                name="api_keys_one_role",
                violation_error_message=ONE_ROLE,
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.key_prefix}…)"

    @staticmethod
    def active_condition(now: Any = None) -> Q:
        """The one definition of an active key: not revoked, not expired, not
        deleted — expired meaning ``expires_at`` is not after the database's
        now (``now`` is for tests of the boundary)."""
        return Q(is_deleted=False, revoked_at__isnull=True) & (
            Q(expires_at__isnull=True) | Q(expires_at__gt=Now() if now is None else now)
        )

    @property
    def runs_jobs(self) -> bool:
        """Worker and admin keys: they claim jobs, report on them, and see
        which worker holds one (SPEC §5)."""
        return self.is_worker or self.is_admin

    @property
    def is_active(self) -> bool:
        """``active_condition()`` as the database evaluates it.

        Read from the ``with_is_active()`` annotation when the row was loaded
        with it (lists, the admin, the authenticated key: no extra query),
        else asked of the database. Never the app server's clock, so it
        cannot disagree with the SQL rule at the expiry boundary.
        """
        known = vars(self).get(IS_ACTIVE_NOW)
        if known is not None:
            return bool(known)
        rows = type(self).all_objects.filter(pk=self.pk)
        return rows.filter(self.active_condition()).exists()

    @classmethod
    def from_db(cls, db: str | None, field_names: Any, values: Any) -> ApiKey:
        instance = super().from_db(db, field_names, values)
        instance.loaded_revoked_at = dict(zip(field_names, values, strict=True)).get(
            "revoked_at"
        )
        return instance

    def refresh_from_db(self, *args: Any, **kwargs: Any) -> None:
        super().refresh_from_db(*args, **kwargs)
        if "revoked_at" not in self.get_deferred_fields():
            self.loaded_revoked_at = self.revoked_at
        # Fresh columns, so an ``is_active`` read with the old ones is stale.
        vars(self).pop(IS_ACTIVE_NOW, None)

    def clean(self) -> None:
        # Revocation is one-way: a key read as revoked can never be saved
        # un-revoked (compared with the loaded value, as
        # djangorestframework-api-key does, so save() costs no query).
        if self.loaded_revoked_at is not None and self.revoked_at is None:
            raise ValidationError("A revoked API key cannot be un-revoked.")

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.clean()
        # The CHECK ``api_keys_one_role``, asked before the round trip so every
        # path through ``save()`` (services, shell) gets a ValidationError
        # naming the field. Not in ``clean()``: a ModelForm validates the
        # constraint itself and would show the message twice.
        if self.is_admin and self.is_worker:
            raise ValidationError({"is_worker": ONE_ROLE})
        super().save(*args, **kwargs)
        if self.revoked_at is None or isinstance(self.revoked_at, datetime):
            self.loaded_revoked_at = self.revoked_at
