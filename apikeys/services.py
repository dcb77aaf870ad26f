"""API key rules: create, revoke, authenticate, seed the development key."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q, QuerySet
from django.db.models.functions import Now
from django.utils import timezone

from apikeys.keys import (
    DEFAULT_DEV_API_KEY,
    generate_key,
    hash_key,
    is_valid_format,
    key_prefix,
)
from apikeys.models import DEFAULT_RATE_LIMIT, IS_ACTIVE_NOW, ApiKey
from apikeys.selectors import api_key_active_by_hash

logger = logging.getLogger(__name__)

LAST_USED_RESOLUTION = timedelta(minutes=1)
DEV_KEY_NAME = "development admin key"


def default_rate_limit(*, is_worker: bool) -> int:
    """A new key's rate limit when none is given: unlimited for a worker key
    (it polls for work and heartbeats every job; SPEC §3 "0 = unlimited, for
    workers"), ``DEFAULT_RATE_LIMIT`` per minute for the others."""
    return 0 if is_worker else DEFAULT_RATE_LIMIT


def api_key_create(
    *,
    name: str,
    is_admin: bool = False,
    is_worker: bool = False,
    rate_limit: int | None = None,
    max_running: int | None = None,
    expires_at: datetime | None = None,
    expires_in: timedelta | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; the raw key is returned here once and never stored.

    A key has one role: ``is_admin`` and ``is_worker`` together raise
    ``ValidationError`` (the model's guard) and nothing is written.
    ``rate_limit`` None is ``default_rate_limit``; ``max_running`` None is no
    cap. ``expires_in`` counts from the database's now (``expires_at`` is a
    moment the caller chose).
    """
    if rate_limit is None:
        rate_limit = default_rate_limit(is_worker=is_worker)
    if expires_in is not None:
        if expires_at is not None:
            raise ValueError("give expires_at or expires_in, not both")
        expires_at = Now() + expires_in
    raw_key = generate_key()
    api_key = ApiKey.objects.create(
        name=name,
        is_admin=is_admin,
        is_worker=is_worker,
        rate_limit=rate_limit,
        max_running=max_running,
        expires_at=expires_at,
        key_hash=hash_key(raw_key),
        key_prefix=key_prefix(raw_key),
    )
    if expires_in is not None:
        api_key.refresh_from_db(fields=["expires_at"])
    logger.info("created API key %s (%s)", api_key.key_prefix, api_key.name)
    return api_key, raw_key


def is_in_the_future(moment: datetime) -> bool:
    """``moment`` is after the database's now (the clock expiry is judged by)."""
    if connection.vendor != "postgresql":
        # The SQLite fallback is embedded: its clock is this process's clock.
        return moment > timezone.now()
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s > statement_timestamp()", [moment])
        return bool(cursor.fetchone()[0])


def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    """Revoke for good (idempotent: a second revoke keeps the first time)."""
    ApiKey.all_objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(
        revoked_at=Now()
    )
    api_key.refresh_from_db(fields=["revoked_at"])
    logger.info("revoked API key %s", api_key.key_prefix)
    return api_key


def api_key_delete_many(*, queryset: QuerySet[ApiKey]) -> int:
    """Soft-delete keys (they fail auth from their next request); the count."""
    deleted, _ = queryset.delete()
    return deleted


def api_key_restore_many(*, queryset: QuerySet[ApiKey]) -> int:
    """Bring deleted keys back; a revoked key stays revoked."""
    return queryset.restore()


def api_key_authenticate(raw_key: str) -> ApiKey | None:
    """The active key for ``raw_key``, or None. One indexed lookup by hash.

    No cache on purpose: a revoked key fails on its very next request.
    """
    if not raw_key or not is_valid_format(raw_key):
        return None
    if raw_key == DEFAULT_DEV_API_KEY and settings.PRODUCTION:
        return None
    api_key = api_key_active_by_hash(key_hash=hash_key(raw_key))
    if api_key is None:
        return None
    _touch_last_used(api_key)
    setattr(api_key, IS_ACTIVE_NOW, True)  # the lookup's own condition said so
    return api_key


def _touch_last_used(api_key: ApiKey) -> None:
    """Write ``last_used_at`` at most once a minute per key (not per request).

    The rule is the UPDATE's condition, on the database clock, which also
    makes concurrent requests (other processes) write once. The check before
    it only saves the round trip on most requests: it reads the app server's
    clock, so skew can shift *when* the write happens by that skew, never
    what is written.
    """
    if (
        api_key.last_used_at
        and timezone.now() - api_key.last_used_at < LAST_USED_RESOLUTION
    ):
        return
    written = (
        ApiKey.objects.filter(pk=api_key.pk)
        .filter(
            Q(last_used_at__isnull=True)
            | Q(last_used_at__lt=Now() - LAST_USED_RESOLUTION)
        )
        .update(last_used_at=Now())
    )
    if written:
        api_key.refresh_from_db(fields=["last_used_at"])


def dev_api_key() -> str:
    """The raw development key: ``LOCKNGEN_DEV_API_KEY``, else the documented one."""
    return settings.LOCKNGEN_DEV_API_KEY or DEFAULT_DEV_API_KEY


def api_key_seed_dev(*, raw_key: str | None = None) -> ApiKey | None:
    """Ensure the development admin key exists; idempotent.

    Called by ``manage.py seed_dev_key`` (the seed data migration carries its
    own frozen copy). Returns the key row, or None in production.
    """
    if settings.PRODUCTION:
        return None
    raw_key = raw_key or dev_api_key()
    manager = ApiKey.all_objects
    with transaction.atomic():
        existing = manager.filter(key_hash=hash_key(raw_key)).first()
        if existing is not None:
            return existing
        if manager.filter(key_prefix=key_prefix(raw_key)).exists():
            raise ValueError(
                f"another key already uses the prefix {key_prefix(raw_key)}; "
                "choose a LOCKNGEN_DEV_API_KEY with different first 11 characters"
            )
        return manager.create(
            name=DEV_KEY_NAME,
            is_admin=True,
            rate_limit=0,
            key_hash=hash_key(raw_key),
            key_prefix=key_prefix(raw_key),
        )
