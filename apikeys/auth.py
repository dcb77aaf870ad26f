"""HTTP side of API keys: authentication, the per-key rate limit, permissions.

Authentication is one indexed lookup per request (``api_key_authenticate``),
with no cache, so a revoked key fails on its very next request. The rate limit
is a fixed one-minute window per key, counted by ``lockngen.counters`` (one
atomic script in Redis, one round trip; per process while Redis is sick).

Failed authentications are counted per client address
(``lockngen.client_address``); past ``AUTH_FAILURES_PER_MINUTE`` a credential
gets 429 before it is looked up, so guessing keys costs no database query.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from apikeys.keys import hash_key
from apikeys.models import ApiKey
from apikeys.services import api_key_authenticate
from lockngen.client_address import client_address
from lockngen.counters import counters

logger = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
BEARER = "bearer"
REALM = "lockngen"
RATE_LIMIT_WINDOW_SECONDS = 60
# The wall clock the windows are cut from: the same on every process counting
# into Redis. A seam, so tests stop it rather than sleep past a window's end.
clock: Callable[[], float] = time.time


class ApiKeyAuthentication(BaseAuthentication):
    """``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

    Returns ``(None, api_key)``: there is no Django user behind a key, so
    ``request.auth`` is the key and ``request.user`` stays None.
    """

    def authenticate(self, request: Request) -> tuple[None, ApiKey] | None:
        raw_key = credentials(request.META)
        if raw_key is None:
            return None  # → 401 "not provided" once a permission asks for a key
        key_hash = hash_key(raw_key)
        if key_hash not in recently_authenticated:
            auth_failures_check(failure_address(request))  # 429 before the lookup
        api_key = api_key_authenticate(raw_key)
        if api_key is None:
            recently_authenticated.discard(key_hash)
            auth_failure_record(failure_address(request))
            raise exceptions.AuthenticationFailed(
                "Invalid API key: unknown, revoked, expired or deleted."
            )
        recently_authenticated.add(key_hash)
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
    unlimited, cost nothing and get None (no headers). While Redis is
    unavailable the count is this process's own (``lockngen.counters``): the
    limit then holds per process instead of being switched off.
    """
    limit = api_key.rate_limit
    if limit == 0:
        return None
    window, reset_seconds = current_window(now)
    count = counters().hit(
        f"lockngen:ratelimit:{api_key.pk.hex}:{window}", ttl=COUNTER_TTL_SECONDS
    )
    state = RateLimitState(
        limit=limit, remaining=max(0, limit - count), reset_seconds=reset_seconds
    )
    if count > limit:
        raise RateLimited(state)
    return state


def current_window(now: float | None = None) -> tuple[int, int]:
    """The fixed one-minute window of ``now`` and the seconds until it ends."""
    now = clock() if now is None else now
    window = int(now // RATE_LIMIT_WINDOW_SECONDS)
    reset_seconds = max(1, math.ceil((window + 1) * RATE_LIMIT_WINDOW_SECONDS - now))
    return window, reset_seconds


# Twice the window, so a counter never expires while its window is open even
# on a server whose clock lags a little.
COUNTER_TTL_SECONDS = 2 * RATE_LIMIT_WINDOW_SECONDS


class RateLimited(exceptions.Throttled):
    def __init__(self, state: RateLimitState) -> None:
        super().__init__(wait=state.reset_seconds)
        self.state = state


# --- Failed authentications per client address (SPEC §12) ---------------------


class AuthFailuresLimited(exceptions.Throttled):
    default_detail = "Too many failed authentications from this address."


def failure_address(request: Request) -> str:
    # Without a peer address (a unix socket) every client shares one count.
    return client_address(request) or "unknown"


def auth_failure_key(address: str, window: int) -> str:
    return f"lockngen:authfail:{address}:{window}"


def auth_failures_check(address: str, *, now: float | None = None) -> None:
    """Raise ``AuthFailuresLimited`` (429) once ``address`` has used up its
    ``AUTH_FAILURES_PER_MINUTE`` failures in this window. No database query.
    """
    limit = settings.AUTH_FAILURES_PER_MINUTE
    if limit == 0:
        return
    window, reset_seconds = current_window(now)
    if counters().peek(auth_failure_key(address, window)) >= limit:
        raise AuthFailuresLimited(wait=reset_seconds)


def auth_failure_record(address: str, *, now: float | None = None) -> None:
    if settings.AUTH_FAILURES_PER_MINUTE == 0:
        return
    window, _ = current_window(now)
    counters().hit(auth_failure_key(address, window), ttl=COUNTER_TTL_SECONDS)


class RecentlyAuthenticated:
    """Hashes of raw keys that authenticated in this process lately.

    Only credentials *not* in here pay the Redis read of the failure counter
    before their lookup, so a working key costs no extra round trip while a
    guessed one is refused before it reaches the database. Membership only
    skips that read: the key is still looked up, so a key revoked since fails
    (and leaves the set) on its very next request.

    A plain dict, cleared when full, rather than an LRU: losing the entries
    only costs each key one more counter read.
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._hashes: dict[str, None] = {}

    def __contains__(self, key_hash: str) -> bool:
        return key_hash in self._hashes

    def add(self, key_hash: str) -> None:
        if len(self._hashes) >= self.size:
            self._hashes.clear()
        self._hashes[key_hash] = None

    def discard(self, key_hash: str) -> None:
        self._hashes.pop(key_hash, None)


recently_authenticated = RecentlyAuthenticated()
