"""The generation job: columns, limits, status machine and database invariants.

Each limit is defined once (``LIMITS``) and used both as a field validator
(for DRF and forms, which do not call ``full_clean``) and as a database CHECK
constraint (so raw SQL cannot write a bad row either); the decimal places a
client may send are checked by the API's input fields.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any, ClassVar, NamedTuple

from django.contrib.postgres.functions import RandomUUID as PostgresRandomUUID
from django.core.exceptions import ValidationError
from django.core.validators import (
    DecimalValidator,
    MaxValueValidator,
    MinLengthValidator,
    MinValueValidator,
)
from django.db import models, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Case, F, Q, Value, When
from django.db.models.functions import Coalesce, Mod, Now
from django.db.models.lookups import Exact

from apikeys.models import HashField
from lockngen.softdelete import SoftDeleteManager, SoftDeleteModel, SoftDeleteQuerySet

SEED_MAX = 2**63 - 1
# The queue lane of jobs created without a key (shell, admin): the nil uuid.
NO_KEY = uuid.UUID(int=0)
DIMENSION_MULTIPLE = 8


class Limit(NamedTuple):
    low: int | float
    high: int | float
    decimals: int | None = None  # the most decimal places a value may have


# The one definition of every numeric limit.
LIMITS: dict[str, Limit] = {
    "width": Limit(64, 4096),
    "height": Limit(64, 4096),
    "steps": Limit(1, 150),
    # Stored as real (7.55 reads back as 7.550000190734863): the API also
    # rounds it to these places on the way out.
    "guidance": Limit(0, 30, decimals=2),
    "seed": Limit(0, SEED_MAX),
}


def range_validators(field: str) -> list[Any]:
    limit = LIMITS[field]
    return [MinValueValidator(limit.low), MaxValueValidator(limit.high)]


def decimals_validator(field: str) -> Callable[[float], None]:
    """Refuse a float with more decimal places than ``LIMITS[field]`` allows."""
    validator = DecimalValidator(max_digits=None, decimal_places=LIMITS[field].decimals)

    def validate(value: float) -> None:
        # repr: the shortest text that reads back as this float (7.55, not
        # 7.54999…), i.e. what the client wrote.
        validator(Decimal(repr(value)))

    return validate


def validate_multiple_of_8(value: int) -> None:
    if value % DIMENSION_MULTIPLE:
        raise ValidationError(
            f"Must be a multiple of {DIMENSION_MULTIPLE}.", code="multiple_of_8"
        )


class RealField(models.FloatField):
    """Single-precision ``real`` in PostgreSQL, as the seed schema has it."""

    def db_type(self, connection: BaseDatabaseWrapper) -> str:
        if connection.vendor == "postgresql":
            return "real"
        return super().db_type(connection)


class RandomUUID(PostgresRandomUUID):
    """A fresh random uuid made by the database, one per row of an UPDATE."""

    def as_sqlite(
        self, compiler: Any, connection: BaseDatabaseWrapper, **extra_context: Any
    ) -> tuple[str, list[Any]]:
        # Django stores a UUIDField as 32 hex digits on SQLite.
        return "lower(hex(randomblob(16)))", []


class Status(models.IntegerChoices):
    QUEUED = 0, "queued"
    RUNNING = 1, "running"
    COMPLETED = 2, "completed"
    FAILED = 3, "failed"
    CANCELLED = 4, "cancelled"

    @classmethod
    def terminal(cls) -> frozenset[Status]:
        """The states with no way out (derived from ``TRANSITIONS``)."""
        return frozenset(state for state, targets in TRANSITIONS.items() if not targets)


# The status machine (SPEC §3): the only transitions that may ever happen.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.QUEUED: frozenset({Status.RUNNING, Status.CANCELLED}),
    Status.RUNNING: frozenset(
        {Status.QUEUED, Status.COMPLETED, Status.FAILED, Status.CANCELLED}
    ),
    Status.COMPLETED: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELLED: frozenset(),
}


# The events a job's webhook may get (SPEC §10), in their stored order:
# ``webhook_events_filter`` keeps a subset as one comma-separated string.
WEBHOOK_EVENTS = ("start", "completed")
WEBHOOK_EVENT_SUBSETS = [
    ",".join(name for n, name in enumerate(WEBHOOK_EVENTS) if mask & (1 << n))
    for mask in range(1 << len(WEBHOOK_EVENTS))
]


def events_filter_text(names: Any) -> str:
    """The stored form of a subset of ``WEBHOOK_EVENTS``."""
    return ",".join(name for name in WEBHOOK_EVENTS if name in names)


def events_filter_names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


# What a client sends to create a job (the create request's fields; its
# Idempotency-Key fingerprint covers exactly these).
REQUEST_FIELDS = (
    "name",
    "prompt",
    "negative_prompt",
    "model",
    "width",
    "height",
    "steps",
    "guidance",
    "seed",
    "webhook",
    "webhook_events_filter",
)


class InvalidTransition(Exception):
    def __init__(self, current: Status, target: Status) -> None:
        self.current, self.target = Status(current), Status(target)
        super().__init__(
            f"cannot move a {self.current.label} generation to {self.target.label}"
        )


def expired_lease() -> Q:
    """The one definition of an expired lease: running, and its lease ended
    before the database's now (SPEC §11 one clock)."""
    return Q(status=Status.RUNNING, lease_expires_at__lt=Now())


class GenerationQuerySet(SoftDeleteQuerySet):
    def expired_leases(self) -> GenerationQuerySet:
        return self.filter(expired_lease()).order_by("lease_expires_at", "id")

    def transition(self, target: Status, *, lease_seconds: int = 0) -> int:
        """Move every row that may reach ``target`` there, in one UPDATE."""
        return self.filter(status__in=sources_of(target)).update(
            **transition_values(target, lease_seconds=lease_seconds)
        )

    transition.alters_data = True

    def delete(self) -> tuple[int, dict[str, int]]:
        """Soft-delete (``soft_delete_values``: live jobs are cancelled), and
        announce the cancelled jobs' ``generation.completed`` (SPEC §11) in
        the same transaction.

        The rows are locked first and the one UPDATE is of exactly those, so
        the jobs announced are the ones it cancelled (a job created or
        claimed between two statements cannot slip through unannounced).
        """
        from generations.events import FINISHED, announce_ids

        live = set(sources_of(Status.CANCELLED))
        with transaction.atomic(using=self.db):
            rows = list(
                self.filter(is_deleted=False)
                .select_for_update()
                .values_list("pk", "status", "webhook")
            )
            locked = type(self)(self.model, using=self.db).filter(
                pk__in=[pk for pk, _, _ in rows]
            )
            result = super(GenerationQuerySet, locked).delete()
            announced = [pk for pk, status, hook in rows if status in live and hook]
            announce_ids(announced, FINISHED)
        return result

    delete.alters_data = True

    def soft_delete_values(self) -> dict[str, Any]:
        """Soft-deleting a queued or running job cancels it in the same UPDATE.

        Every path that deletes (API, admin action and page, queryset,
        instance) ends here, so none can leave a deleted job running for ever
        (claims and gauges skip deleted rows while its worker kept rendering).
        One statement with ``CASE`` rather than cancel-then-delete: a
        queryset filtered on ``status`` would match nothing after the cancel.
        """
        live = Q(status__in=sources_of(Status.CANCELLED))
        cancel = {
            name: Case(When(live, then=value), default=F(name))
            for name, value in transition_values(Status.CANCELLED).items()
        }
        return super().soft_delete_values() | cancel


class GenerationManager(SoftDeleteManager.from_queryset(GenerationQuerySet)):
    pass


class Generation(SoftDeleteModel):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=255, blank=True, default="", db_default="")
    prompt = models.CharField(max_length=4000, validators=[MinLengthValidator(1)])
    negative_prompt = models.CharField(max_length=4000, null=True, blank=True)
    model = models.CharField(max_length=100, default="sdxl", db_default="sdxl")
    width = models.IntegerField(
        default=1024,
        db_default=1024,
        validators=[*range_validators("width"), validate_multiple_of_8],
    )
    height = models.IntegerField(
        default=1024,
        db_default=1024,
        validators=[*range_validators("height"), validate_multiple_of_8],
    )
    steps = models.IntegerField(
        default=20, db_default=20, validators=range_validators("steps")
    )
    guidance = RealField(
        default=7.5, db_default=7.5, validators=range_validators("guidance")
    )
    seed = models.BigIntegerField(
        null=True, blank=True, validators=range_validators("seed")
    )
    status = models.IntegerField(
        choices=Status.choices,
        default=Status.QUEUED,
        db_default=Status.QUEUED,
        db_index=True,
    )
    prompt_id = models.CharField(max_length=100, null=True, blank=True)
    output_path = models.CharField(max_length=500, null=True, blank=True)
    thumbnail_path = models.CharField(max_length=500, null=True, blank=True)
    error_message = models.CharField(max_length=2000, null=True, blank=True)
    created_at = models.DateTimeField(db_default=Now(), db_index=True, editable=False)
    updated_at = models.DateTimeField(null=True, blank=True, editable=False)
    started_at = models.DateTimeField(null=True, blank=True, editable=False)
    completed_at = models.DateTimeField(null=True, blank=True, editable=False)
    duration_ms = models.IntegerField(
        null=True, blank=True, validators=[MinValueValidator(0)], editable=False
    )
    lease_expires_at = models.DateTimeField(null=True, blank=True, editable=False)
    attempts = models.IntegerField(default=0, db_default=0, editable=False)
    idempotency_key = models.CharField(
        max_length=100, null=True, blank=True, editable=False
    )
    request_fingerprint = HashField(
        max_length=64, null=True, blank=True, editable=False
    )
    lease_token = models.UUIDField(null=True, blank=True, editable=False)
    webhook = models.CharField(
        max_length=2000,
        null=True,
        blank=True,
        help_text="Where this job's events are POSTed (SPEC §10).",
    )
    webhook_events_filter = models.CharField(
        max_length=32,
        default=",".join(WEBHOOK_EVENTS),
        db_default=",".join(WEBHOOK_EVENTS),
        help_text="The events the webhook gets: a subset of start, completed.",
    )
    claimed_by = models.CharField(
        max_length=100,
        null=True,
        blank=True,
        editable=False,
        help_text="The worker holding the lease, as it named itself in the claim.",
    )
    api_key = models.ForeignKey(
        "apikeys.ApiKey",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="generations",
        db_index=False,  # covered by generations_key_list_idx
    )

    objects: ClassVar[GenerationManager] = GenerationManager()
    all_objects: ClassVar[Any] = models.Manager.from_queryset(GenerationQuerySet)()

    class Meta(SoftDeleteModel.Meta):
        db_table = "generations"
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(
                F("api_key"),
                F("created_at").desc(),
                F("id").desc(),
                name="generations_key_list_idx",
                condition=Q(is_deleted=False),
            ),
            # The claim's two walks of one key's queue (generations.claims):
            # its oldest jobs, and its oldest jobs of one model.
            models.Index(
                Coalesce(F("api_key"), Value(NO_KEY)),
                F("created_at"),
                F("id"),
                name="generations_lane_head_idx",
                condition=Q(is_deleted=False, status=Status.QUEUED),
            ),
            models.Index(
                Coalesce(F("api_key"), Value(NO_KEY)),
                F("model"),
                F("created_at"),
                F("id"),
                name="generations_lane_model_idx",
                condition=Q(is_deleted=False, status=Status.QUEUED),
            ),
            models.Index(
                fields=["lease_expires_at", "id"],
                name="generations_lease_idx",
                condition=Q(is_deleted=False, status=Status.RUNNING),
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["api_key", "idempotency_key"],
                name="generations_idempotency_key_uniq",
                condition=Q(idempotency_key__isnull=False),
            ),
            *[
                models.CheckConstraint(
                    condition=Q(
                        **{f"{field}__gte": limit.low, f"{field}__lte": limit.high}
                    ),
                    name=f"generations_{field}_range",
                )
                for field, limit in LIMITS.items()
            ],
            *[
                models.CheckConstraint(
                    condition=Exact(Mod(field, DIMENSION_MULTIPLE), 0),
                    name=f"generations_{field}_multiple_of_8",
                )
                for field in ("width", "height")
            ],
            models.CheckConstraint(
                condition=Q(status__gte=Status.QUEUED, status__lte=Status.CANCELLED),
                name="generations_status_range",
            ),
            models.CheckConstraint(
                condition=~Q(prompt=""), name="generations_prompt_not_blank"
            ),
            models.CheckConstraint(
                condition=Q(webhook_events_filter__in=WEBHOOK_EVENT_SUBSETS),
                name="generations_webhook_events_filter_subset",
            ),
            models.CheckConstraint(
                condition=Q(duration_ms__gte=0), name="generations_duration_ms_gte_0"
            ),
            models.CheckConstraint(
                condition=Q(attempts__gte=0), name="generations_attempts_gte_0"
            ),
            models.CheckConstraint(
                condition=Q(completed_at__gte=F("created_at")),
                name="generations_completed_after_created",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name or self.prompt[:40]} [{self.get_status_display()}]"

    @property
    def is_terminal(self) -> bool:
        return self.status in Status.terminal()

    def can_transition_to(self, target: Status) -> bool:
        return target in TRANSITIONS[Status(self.status)]

    def transition_to(self, target: Status, *, lease_seconds: int = 0) -> list[str]:
        """Apply ``target`` in memory; return the fields the caller must save.

        The one place the status machine is checked for a single row. Values
        are database expressions (refresh the row after saving).
        """
        if not self.can_transition_to(target):
            raise InvalidTransition(Status(self.status), target)
        values = transition_values(target, lease_seconds=lease_seconds)
        for field, value in values.items():
            setattr(self, field, value)
        return list(values)


def sources_of(target: Status) -> list[Status]:
    """The statuses from which ``target`` may be reached."""
    return [source for source, targets in TRANSITIONS.items() if target in targets]


def lease_expiry(lease_seconds: int) -> Any:
    """When a lease taken or renewed now ends, on the database clock."""
    return Now() + timedelta(seconds=lease_seconds)


def transition_values(target: Status, *, lease_seconds: int = 0) -> dict[str, Any]:
    """What moving to ``target`` writes, as database expressions.

    Timestamps come from the database clock (``Now()``), so clock skew between
    app servers can never break ``completed_at >= created_at``.
    """
    now = Now()
    values: dict[str, Any] = {"status": target, "updated_at": now}
    if target == Status.RUNNING:
        values |= {
            "started_at": now,
            "lease_expires_at": lease_expiry(lease_seconds),
            "attempts": F("attempts") + 1,
            # The fencing token (SPEC §5): a stalled holder's token stops
            # matching the moment the job is claimed again.
            "lease_token": RandomUUID(),
        }
    elif target == Status.QUEUED:
        values |= {"lease_expires_at": None, "lease_token": None, "claimed_by": None}
    else:
        values |= {
            "lease_expires_at": None,
            "claimed_by": None,
            "completed_at": now,
            "duration_ms": DurationMs("started_at"),
        }
        # A job cancelled while running keeps its holder's token: the
        # holder's heartbeat is told the job was cancelled, and nobody else's
        # (SPEC §5: a worker key sees only the jobs it holds).
        if target != Status.CANCELLED:
            values["lease_token"] = None
    return values


class DurationMs(models.Func):
    """Whole milliseconds from a timestamp column to the database's now().

    NULL when the job never started (queued → cancelled); never negative;
    capped at the ``integer`` maximum (~24.8 days) instead of failing the
    transition with "integer out of range".
    """

    output_field = models.IntegerField()
    template = (
        "(CASE WHEN %(expressions)s IS NULL THEN NULL ELSE GREATEST(0, LEAST("
        "2147483647, EXTRACT(EPOCH FROM (STATEMENT_TIMESTAMP() - %(expressions)s))"
        " * 1000))::integer END)"
    )

    def as_sqlite(
        self, compiler: Any, connection: BaseDatabaseWrapper, **extra_context: Any
    ) -> tuple[str, list[Any]]:
        return super().as_sql(
            compiler,
            connection,
            template=(
                "(CASE WHEN %(expressions)s IS NULL THEN NULL ELSE MAX(0, CAST("
                "(julianday('now') - julianday(%(expressions)s)) * 86400000 "
                "AS INTEGER)) END)"
            ),
            **extra_context,
        )


class KeyQueue(models.Model):
    """One key's place in the queue: what the claim reads to be fair and capped.

    A row per API key that ever queued a job (``NO_KEY`` for jobs created
    without one), kept by database triggers on ``generations`` and
    ``api_keys`` (migration 0003) in the same transaction as every change of
    a job's status, whichever path makes it: ``queued`` and ``running``
    count the key's jobs, ``last_served_at`` is when one of them was last
    claimed, ``queued_since`` when its current backlog began, and
    ``max_running`` mirrors the key's cap. The claim locks a capped key's
    row while it takes jobs, so no two claims fill the same free slot.
    Never written by Python.

    Its index — the claim's walk over keys, least recently served first
    (``last_served_at NULLS FIRST``, which SQLite cannot index), of the keys
    with something queued and a free slot, so a key at its cap is not even
    visited — is made with the triggers (PostgreSQL).
    """

    api_key_id = models.UUIDField(primary_key=True, editable=False)
    queued = models.IntegerField(default=0, db_default=0, editable=False)
    running = models.IntegerField(default=0, db_default=0, editable=False)
    queued_since = models.DateTimeField(null=True, editable=False)
    last_served_at = models.DateTimeField(null=True, editable=False)
    max_running = models.IntegerField(null=True, editable=False)

    class Meta:
        db_table = "generation_key_queues"
        constraints = [
            models.CheckConstraint(
                condition=Q(queued__gte=0), name="key_queues_queued_gte_0"
            ),
            models.CheckConstraint(
                condition=Q(running__gte=0), name="key_queues_running_gte_0"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.api_key_id}: {self.queued} queued, {self.running} running"
