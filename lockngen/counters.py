"""Rate-limit counters: shared in Redis, per process while Redis is sick.

Every process counts into Redis (``REDIS_URL``) so a limit holds across
workers and containers. Redis is reached through one client per process,
built here from ``REDIS_URL`` (not Django's cache, whose client cannot be
reached without private attributes and which builds a ``redis.Redis`` per
call): socket and connect timeouts of ``REDIS_TIMEOUT_SECONDS`` (≤ 100 ms),
no retries, and a circuit breaker that stops trying for
``REDIS_BREAKER_RESET_SECONDS`` after ``REDIS_BREAKER_FAILURES`` failures in a
row. While Redis is unset, down, hung or the breaker is open, counts go to
this process's memory (the ``default`` local-memory cache): a limit is then
enforced per process, never switched off, and ``/health/`` says *degraded*.

Counting is one round trip: a Lua script (``INCR``, plus ``EXPIRE`` on a
window's first count) is atomic, so no counter ever lives without a TTL.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TypeVar

import redis
from circuitbreaker import CircuitBreaker, CircuitBreakerError
from django.conf import settings
from django.core.cache import caches
from django.core.signals import setting_changed
from django.dispatch import receiver
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

T = TypeVar("T")

LOCAL_CACHE_ALIAS = "default"

# INCR, and give the counter its lifetime when this call created it.
INCR_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
"""


class Counters:
    """Counters of one process: Redis while it answers, else local memory."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        breaker_failures: int,
        breaker_reset_seconds: float,
    ) -> None:
        self.url = url
        self.breaker_reset_seconds = breaker_reset_seconds
        self.client: redis.Redis | None = None
        if url:
            self.client = redis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                # redis-py ≥ 6 retries 3 times with up to 10 s of backoff by
                # default: one sick Redis would cost each request seconds.
                retry=Retry(NoBackoff(), 0),
            )
            self._script = self.client.register_script(INCR_SCRIPT)
        # circuitbreaker rather than pybreaker: pybreaker holds one lock for
        # the whole guarded call, which would serialise every Redis round trip
        # of a process's threads (and queue them behind a hung one).
        self.breaker = CircuitBreaker(
            failure_threshold=breaker_failures,
            recovery_timeout=breaker_reset_seconds,
            expected_exception=redis.RedisError,
            name="redis-rate-limits",
        )
        self._guarded: Callable[..., object] = self.breaker.decorate(_call)

    @property
    def shared(self) -> bool:
        """Counts reach Redis (no I/O: configuration and breaker state only)."""
        return self.client is not None and self.breaker.closed

    def _redis(self, func: Callable[..., T], *args: object) -> T | None:
        """``func(*args)`` through the breaker, or None when Redis is unusable."""
        if self.client is None:
            return None
        was_closed = self.breaker.closed
        try:
            result = self._guarded(func, *args)
        except CircuitBreakerError:
            return None
        except redis.RedisError as exc:
            if was_closed and not self.breaker.closed:
                logger.warning(
                    "Redis unavailable (%s): rate limits are counted per process "
                    "for the next %g s",
                    type(exc).__name__,
                    self.breaker_reset_seconds,
                )
            return None
        if not was_closed:
            logger.warning("Redis answers again: rate limits are shared again")
        return result

    def hit(self, key: str, *, ttl: int) -> int:
        """Count one event under ``key`` (expiring after ``ttl`` s); the new count."""
        count = self._redis(self._incr, key, ttl)
        if count is not None:
            return count
        local = caches[LOCAL_CACHE_ALIAS]
        # incr first: in the common case the window's counter exists already.
        try:
            return local.incr(key)
        except ValueError:
            pass
        if local.add(key, 1, timeout=ttl):
            return 1
        return local.incr(key)  # another thread created it first

    def peek(self, key: str) -> int:
        """The count under ``key`` without counting."""
        count = self._redis(self._get, key)
        if count is None:
            count = caches[LOCAL_CACHE_ALIAS].get(key, 0)
        return int(count)

    def ping(self) -> None:
        """Raise ``redis.RedisError`` / ``CircuitBreakerError`` unless Redis answers."""
        if self.client is None:
            raise redis.ConnectionError("REDIS_URL is not set")
        self._guarded(self.client.ping)

    def _incr(self, key: str, ttl: int) -> int:
        return int(self._script(keys=[key], args=[ttl]))

    def _get(self, key: str) -> int:
        # Only called through _redis(), which checked the client.
        return int(self.client.get(key) or 0)


def _call(func: Callable[..., T], *args: object) -> T:
    return func(*args)


@functools.cache
def _counters_for(
    url: str, timeout: float, failures: int, reset_seconds: float
) -> Counters:
    return Counters(
        url,
        timeout=timeout,
        breaker_failures=failures,
        breaker_reset_seconds=reset_seconds,
    )


def counters() -> Counters:
    """This process's counters (one Redis connection pool, one breaker)."""
    return _counters_for(
        settings.REDIS_URL,
        settings.REDIS_TIMEOUT_SECONDS,
        settings.REDIS_BREAKER_FAILURES,
        settings.REDIS_BREAKER_RESET_SECONDS,
    )


@receiver(setting_changed)
def _forget_counters(*, setting: str, **kwargs: object) -> None:
    # Tests point REDIS_URL elsewhere; a fresh client and breaker go with it.
    if setting.startswith("REDIS_"):
        _counters_for.cache_clear()
