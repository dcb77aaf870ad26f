"""HTTP side of API keys: authentication, the per-key rate limit, permissions.

Authentication is one indexed lookup per request (``api_key_authenticate``),
with no cache, so a revoked key fails on its very next request. The rate limit
is a fixed one-minute window per key: one atomic script (``INCR``, plus
``EXPIRE`` on a window's first request) in Redis, one round trip;
``cache.incr`` / ``cache.add`` on other cache backends (local memory). O(1)
either way.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.core.cache import cache, caches
from django.core.cache.backends.redis import RedisCache
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from apikeys.models import ApiKey
from apikeys.services import api_key_authenticate

logger = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
BEARER = "bearer"
REALM = "lockngen"
RATE_LIMIT_WINDOW_SECONDS = 60


class ApiKeyAuthentication(BaseAuthentication):
    """``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

    Returns ``(None, api_key)``: there is no Django user behind a key, so
    ``request.auth`` is the key and ``request.user`` stays None.
    """

    def authenticate(self, request: Request) -> tuple[None, ApiKey] | None:
        raw_key = credentials(request.META)
        if raw_key is None:
            return None  # → 401 "not provided" once a permission asks for a key
        api_key = api_key_authenticate(raw_key)
        if api_key is None:
            raise exceptions.AuthenticationFailed(
                "Invalid API key: unknown, revoked, expired or deleted."
            )
        return None, api_key

    def authenticate_header(self, request: Request) -> str:
        return f'Bearer realm="{REALM}"'


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """Documents both headers as alternatives (either one authenticates)."""

    target_class = ApiKeyAuthentication
    name = ["BearerAuth", "ApiKeyAuth"]

    def get_security_requirement(self, auto_schema: Any) -> list[dict[str, list]]:
        return [{"BearerAuth": []}, {"ApiKeyAuth": []}]

    def get_security_definition(self, auto_schema: Any) -> list[dict[str, str]]:
        return [
            {
                "type": "http",
                "scheme": "bearer",
                "description": "Authorization: Bearer lk_…",
            },
            {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
        ]


def credentials(meta: dict[str, Any]) -> str | None:
    """The raw key from the request headers; Bearer wins over X-API-Key."""
    authorization = meta.get("HTTP_AUTHORIZATION", "")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == BEARER:
            return value.strip()
    api_key = meta.get("HTTP_X_API_KEY")
    if api_key is not None:
        return api_key.strip()
    if authorization:
        return ""  # some other scheme (Basic …): a credential we do not accept
    return None


# Without a key DRF answers 401 (no successful authenticator), otherwise 403.
class HasApiKey(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        return request.auth is not None


class IsAdminKey(BasePermission):
    message = "This endpoint needs an admin API key."

    def has_permission(self, request: Request, view: Any) -> bool:
        return request.auth is not None and request.auth.is_admin


@dataclass(frozen=True)
class RateLimitState:
    limit: int
    remaining: int
    reset_seconds: int

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_seconds),
        }


def rate_limit_hit(
    api_key: ApiKey, *, now: float | None = None
) -> RateLimitState | None:
    """Count one request against the key's per-minute limit.

    Returns the state for the ``X-RateLimit-*`` headers; raises ``Throttled``
    (429, ``Retry-After``) past the limit. Keys with ``rate_limit = 0`` are
    unlimited, cost nothing and get None (no headers). If the cache is down
    the request is let through (and logged): an outage of the counter must not
    become an API outage.
    """
    limit = api_key.rate_limit
    if limit == 0:
        return None
    now = time.time() if now is None else now
    window = int(now // RATE_LIMIT_WINDOW_SECONDS)
    reset_seconds = max(1, math.ceil((window + 1) * RATE_LIMIT_WINDOW_SECONDS - now))
    counter = f"ratelimit:{api_key.pk.hex}:{window}"
    try:
        count = _increment(counter)
    except Exception as exc:  # any cache failure: fail open
        logger.warning(
            "rate-limit cache unavailable (%s); not limiting", type(exc).__name__
        )
        return RateLimitState(limit=limit, remaining=limit, reset_seconds=reset_seconds)
    state = RateLimitState(
        limit=limit, remaining=max(0, limit - count), reset_seconds=reset_seconds
    )
    if count > limit:
        raise RateLimited(state)
    return state


# Twice the window, so a counter never expires while its window is open even
# on a server whose clock lags a little.
COUNTER_TTL_SECONDS = 2 * RATE_LIMIT_WINDOW_SECONDS


# INCR, and give the counter its lifetime when this request created it. A Lua
# script is atomic: there is no moment when a counter exists without a TTL.
_INCR_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
"""


def _increment(counter: str) -> int:
    backend = caches["default"]
    if isinstance(backend, RedisCache):
        return _redis_incr(backend)(backend.make_and_validate_key(counter))
    # incr first: in the common case the window's counter exists already.
    try:
        return cache.incr(counter)
    except ValueError:
        pass
    if cache.add(counter, 1, timeout=COUNTER_TTL_SECONDS):
        return 1
    return cache.incr(counter)  # another request created it first


def _redis_incr(backend: RedisCache) -> Callable[[str], int]:
    """The counter script, bound to a client of this cache's connection pool.

    One round trip (EVALSHA) per request, where Django's RedisCache.incr needs
    two (EXISTS, INCRBY) plus an add() on a window's first request. The client
    is kept on the backend (one per thread, as Django keeps caches): RedisCache
    builds a new ``redis.Redis`` for every call, which costs more than the
    round trip itself (docs/PERFORMANCE.md, "Read path").
    """
    incr = getattr(backend, "_lockngen_rate_limit_incr", None)
    if incr is None:
        script = backend._cache.get_client(write=True).register_script(_INCR_SCRIPT)

        def incr(key: str) -> int:
            return int(script(keys=[key], args=[COUNTER_TTL_SECONDS]))

        backend._lockngen_rate_limit_incr = incr  # type: ignore[attr-defined]
    return incr


class RateLimited(exceptions.Throttled):
    def __init__(self, state: RateLimitState) -> None:
        super().__init__(wait=state.reset_seconds)
        self.state = state
