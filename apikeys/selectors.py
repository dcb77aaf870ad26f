"""API key reads."""

from __future__ import annotations

from django.db import connection

from apikeys.models import ApiKey
from lockngen.rows import fetch_one

# ``ApiKey.active_condition()`` spelled in SQL for the lookup every API
# request makes (lockngen.rows says why); tests/test_selectors.py holds the
# two spellings to the same answers, boundaries included.
ACTIVE_BY_HASH = (
    "key_hash = %s AND NOT is_deleted AND revoked_at IS NULL"
    " AND (expires_at IS NULL OR expires_at > STATEMENT_TIMESTAMP())"
)


def api_key_active_by_hash(*, key_hash: str) -> ApiKey | None:
    """The active key with this hash, judged at the database's now; else None."""
    if connection.vendor != "postgresql":
        return (
            ApiKey.objects.filter(key_hash=key_hash)
            .filter(ApiKey.active_condition())
            .first()
        )
    return fetch_one(ApiKey, ACTIVE_BY_HASH, [key_hash])
