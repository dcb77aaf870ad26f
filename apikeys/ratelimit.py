"""Rate limits: requests per key and failed authentications per address.

Both are fixed one-minute windows counted by ``lockngen.counters`` (one atomic
script in Redis, one round trip; per process while Redis is sick). Every
function takes ``now`` (epoch seconds) so callers and tests can pass a clock;
the default is the wall clock, the same on every process counting into Redis.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from rest_framework import exceptions
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from apikeys.models import ApiKey
from lockngen.client_address import client_address
from lockngen.counters import counters

RATE_LIMIT_WINDOW_SECONDS = 60
# The wall clock the windows are cut from: the same on every process counting
# into Redis. A seam, so tests stop it rather than sleep past a window's end.
clock: Callable[[], float] = time.time


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


class ApiKeyRateThrottle(BaseThrottle):
    """``rate_limit_hit`` as a DRF throttle (``REST_FRAMEWORK`` names it);
    keeps the state the ``X-RateLimit-*`` headers report. No key, no count."""

    def __init__(self) -> None:
        self.state: RateLimitState | None = None

    def allow_request(self, request: Request, view: Any) -> bool:
        if request.auth is None:
            return True
        try:
            self.state = rate_limit_hit(request.auth)
        except RateLimited as exc:
            self.state = exc.state
            return False
        return True

    def wait(self) -> float | None:
        return None if self.state is None else self.state.reset_seconds

    def headers(self) -> dict[str, str]:
        """``X-RateLimit-*`` for the response (none for unlimited keys)."""
        return {} if self.state is None else self.state.headers()


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
