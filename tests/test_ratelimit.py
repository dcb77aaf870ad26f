"""Per-key rate limit: a fixed one-minute window counted atomically in the cache.

Counters are named after the API key's id (new in every test), so tests never
see each other's counts and nothing needs flushing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from http import HTTPStatus
from pathlib import Path

import pytest

from apikeys.ratelimit import RATE_LIMIT_WINDOW_SECONDS, RateLimited, rate_limit_hit
from tests.factories import make_api_key
from tests.serving import closed_port

BASE_DIR = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/0"
# Every count here happens in one window of a clock that stands still.
pytestmark = pytest.mark.usefixtures("stopped_clock")


def test_sixth_request_of_a_five_per_minute_key_is_429(api_as):
    _, raw = make_api_key(rate_limit=5)
    api = api_as(raw)

    responses = [api.get("generations") for _ in range(6)]

    assert [r.status_code for r in responses] == [200] * 5 + [429]
    assert [r["X-RateLimit-Remaining"] for r in responses] == [
        "4",
        "3",
        "2",
        "1",
        "0",
        "0",
    ]
    assert all(r["X-RateLimit-Limit"] == "5" for r in responses)
    limited = responses[-1]
    assert limited["Content-Type"] == "application/json"
    assert "throttled" in limited.json()["detail"]
    assert limited["Retry-After"] == str(RATE_LIMIT_WINDOW_SECONDS)  # 59.5 s left


def test_limits_are_per_key(api_as):
    _, busy = make_api_key(rate_limit=1)
    _, quiet = make_api_key(rate_limit=1)
    api_as(busy).get("keys/me")

    assert api_as(busy).get("keys/me").status_code == HTTPStatus.TOO_MANY_REQUESTS
    assert api_as(quiet).get("keys/me").status_code == HTTPStatus.OK


def test_refused_requests_count_too(api_as):
    _, raw = make_api_key(rate_limit=2)
    api = api_as(raw)
    assert api.get("keys").status_code == HTTPStatus.FORBIDDEN
    assert api.get("generations/nope").status_code == HTTPStatus.BAD_REQUEST

    assert api.get("keys/me").status_code == HTTPStatus.TOO_MANY_REQUESTS


def test_rate_limit_zero_is_never_limited_and_has_no_headers(api_as, owner_key):
    api = api_as(owner_key[1])
    responses = [api.get("keys/me") for _ in range(150)]

    assert {r.status_code for r in responses} == {HTTPStatus.OK}
    assert "X-RateLimit-Limit" not in responses[-1]


def test_a_new_window_starts_a_new_count(db):
    api_key, _ = make_api_key(rate_limit=2)
    start = 1_000_000 * RATE_LIMIT_WINDOW_SECONDS + 0.5

    assert rate_limit_hit(api_key, now=start).remaining == 1
    assert rate_limit_hit(api_key, now=start + 1).remaining == 0
    with pytest.raises(RateLimited) as limited:
        rate_limit_hit(api_key, now=start + 59)
    assert limited.value.wait == 1

    fresh = rate_limit_hit(api_key, now=start + RATE_LIMIT_WINDOW_SECONDS)
    assert (fresh.limit, fresh.remaining, fresh.reset_seconds) == (2, 1, 60)


def test_an_unreachable_redis_still_limits_each_process(api_as, settings):
    """Was: an unreachable cache let every request through (fail open)."""
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"  # nothing listens
    _, raw = make_api_key(rate_limit=1)
    api = api_as(raw)

    assert [api.get("keys/me").status_code for _ in range(3)] == [200, 429, 429]


CHILD = textwrap.dedent(
    """
    import json, os, sys
    import django
    django.setup()
    from apikeys.ratelimit import current_window
    # The parent's stopped clock, so both processes count in one window.
    limiter = sys.modules[current_window.__module__]
    limiter.clock = lambda: float(os.environ["CLOCK"])
    from django.test import Client
    from django.test.utils import setup_test_environment
    setup_test_environment()
    client = Client()
    statuses = [
        client.get("/api/v1/keys/me", headers={"X-API-Key": os.environ["RAW_KEY"]})
        .status_code
        for _ in range(int(sys.argv[1]))
    ]
    print(json.dumps(statuses))
    """
)


@pytest.mark.django_db(transaction=True)
def test_the_limit_is_shared_by_processes_through_redis(
    api_as, settings, test_database_url, stopped_clock
):
    """The test process and a separate process count into one Redis counter.

    Both count in the Redis at REDIS_URL; counters are named
    after the API key's id, new in every run, so runs cannot collide.
    """
    settings.REDIS_URL = REDIS_URL
    _, raw = make_api_key(rate_limit=5)
    api = api_as(raw)
    assert [api.get("keys/me").status_code for _ in range(3)] == [200] * 3

    result = subprocess.run(
        [sys.executable, "-c", CHILD, "3"],
        cwd=BASE_DIR,
        env={
            "PATH": os.environ.get("PATH", ""),
            "DJANGO_SETTINGS_MODULE": "lockngen.settings",
            "DATABASE_URL": test_database_url,
            "REDIS_URL": REDIS_URL,
            "RAW_KEY": raw,
            "CLOCK": repr(stopped_clock),
            "LOG_LEVEL": "ERROR",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [200, 200, 429]
    assert api.get("keys/me").status_code == HTTPStatus.TOO_MANY_REQUESTS


def test_a_redis_counter_gets_a_lifetime_on_its_first_request(db, settings):
    import redis

    settings.REDIS_URL = REDIS_URL
    api_key, _ = make_api_key(rate_limit=10)
    now = 1_000_000 * RATE_LIMIT_WINDOW_SECONDS + 1.0

    assert rate_limit_hit(api_key, now=now).remaining == 9
    assert rate_limit_hit(api_key, now=now + 1).remaining == 8

    window = int(now // RATE_LIMIT_WINDOW_SECONDS)
    key = f"lockngen:ratelimit:{api_key.pk.hex}:{window}"
    ttl = redis.Redis.from_url(REDIS_URL).ttl(key)
    assert 0 < ttl <= 2 * RATE_LIMIT_WINDOW_SECONDS
