"""Small helpers that build rows through the services (never around them)."""

from __future__ import annotations

from typing import Any

from apikeys.models import ApiKey
from apikeys.services import api_key_create
from generations.claims import generation_claim
from generations.models import Generation
from generations.services import generation_create


def make_api_key(
    *, name: str = "k", is_admin: bool = False, rate_limit: int = 100, **kw: Any
) -> tuple[ApiKey, str]:
    """A new key via ``api_key_create``; returns ``(api_key, raw_key)``."""
    return api_key_create(name=name, is_admin=is_admin, rate_limit=rate_limit, **kw)


def make_generation(*, api_key: ApiKey | None = None, **fields: Any) -> Generation:
    """A queued generation via ``generation_create`` (default prompt supplied)."""
    fields.setdefault("prompt", "a lighthouse at dusk")
    generation, _ = generation_create(api_key=api_key, **fields)
    return generation


def claim_one(**options: Any) -> Generation | None:
    """The one job ``generation_claim`` hands out (``max_jobs=1``), or None."""
    jobs = generation_claim(**options)
    assert len(jobs) <= 1
    return jobs[0] if jobs else None
