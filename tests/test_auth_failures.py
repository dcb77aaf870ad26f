"""Failed authentications per client address (SPEC §12): 429 before any query.

Counted in process memory here (no ``REDIS_URL``), so counts start empty in
every test (``fresh_local_counters``); tests/test_redis_faults.py counts them
in a Redis of its own.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from http import HTTPStatus

import pytest
import redis
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apikeys.keys import generate_key
from apikeys.ratelimit import (
    RATE_LIMIT_WINDOW_SECONDS,
    auth_failure_key,
    current_window,
)
from apikeys.services import api_key_revoke
from lockngen.client_address import address_from_meta, parse_networks
from lockngen.env import ConfigError
from tests.factories import make_api_key
from tests.redisproc import redis_process

LIMIT = 5
PROXY = "127.0.0.1"  # trusted by default
STRANGER = "198.51.100.7"  # TEST-NET-2: never contacted, only written in META


pytestmark = pytest.mark.usefixtures("stopped_clock")


@pytest.fixture(autouse=True)
def small_limit(settings):
    settings.AUTH_FAILURES_PER_MINUTE = LIMIT


def get_me(client, raw_key: str, **meta: str):
    return client.get(
        "/api/v1/keys/me", headers={"Authorization": f"Bearer {raw_key}"}, **meta
    )


def test_past_the_limit_a_guess_is_429_before_any_query(client, db):
    statuses = [get_me(client, generate_key()).status_code for _ in range(LIMIT)]

    with CaptureQueriesContext(connection) as queries:
        limited = get_me(client, generate_key())

    assert statuses == [HTTPStatus.UNAUTHORIZED] * LIMIT
    assert limited.status_code == HTTPStatus.TOO_MANY_REQUESTS
    assert len(queries) == 0
    assert limited["Content-Type"] == "application/json"
    assert "failed authentications" in limited.json()["detail"]
    assert 1 <= int(limited["Retry-After"]) <= RATE_LIMIT_WINDOW_SECONDS


@pytest.mark.parametrize(
    "bad",
    ["unknown", "revoked", "expired", "malformed", "other-scheme"],
)
def test_every_kind_of_bad_key_counts(client, db, bad):
    if bad == "revoked":
        api_key, raw = make_api_key()
        api_key_revoke(api_key=api_key)
    elif bad == "expired":
        _, raw = make_api_key(expires_at=timezone.now() - timedelta(seconds=1))
    elif bad == "malformed":
        raw = "not-a-key"
    else:
        raw = generate_key()
    headers = (
        {"Authorization": "Basic dXNlcjpwYXNz"}
        if bad == "other-scheme"
        else {"Authorization": f"Bearer {raw}"}
    )
    for _ in range(LIMIT):
        assert (
            client.get("/api/v1/keys/me", headers=headers).status_code
            == HTTPStatus.UNAUTHORIZED
        )

    limited = client.get("/api/v1/keys/me", headers=headers)
    assert limited.status_code == HTTPStatus.TOO_MANY_REQUESTS


def test_requests_without_a_key_are_not_failures(client, db):
    for _ in range(LIMIT + 2):
        assert client.get("/api/v1/keys/me").status_code == HTTPStatus.UNAUTHORIZED


def test_a_good_key_from_a_fresh_address_is_not_limited(client, db):
    _, raw = make_api_key(rate_limit=0)
    for _ in range(LIMIT):
        get_me(client, generate_key(), REMOTE_ADDR=STRANGER)
    assert get_me(client, generate_key(), REMOTE_ADDR=STRANGER).status_code == 429

    assert get_me(client, raw).status_code == HTTPStatus.OK  # from 127.0.0.1


def test_a_key_that_worked_keeps_working_from_a_limited_address(client, db):
    """Membership in the process's recently-authenticated set skips the
    counter read; the key is still looked up, so a revoked one fails."""
    api_key, raw = make_api_key(rate_limit=0)
    assert get_me(client, raw).status_code == HTTPStatus.OK
    for _ in range(LIMIT):
        get_me(client, generate_key())
    assert get_me(client, generate_key()).status_code == 429

    assert get_me(client, raw).status_code == HTTPStatus.OK
    api_key_revoke(api_key=api_key)
    assert get_me(client, raw).status_code == HTTPStatus.UNAUTHORIZED
    assert get_me(client, raw).status_code == HTTPStatus.TOO_MANY_REQUESTS


def test_a_forged_forwarded_for_from_an_untrusted_peer_changes_nothing(client, db):
    for hop in range(LIMIT):
        get_me(
            client,
            generate_key(),
            REMOTE_ADDR=STRANGER,
            HTTP_X_FORWARDED_FOR=f"203.0.113.{hop}",
        )
    limited = get_me(
        client,
        generate_key(),
        REMOTE_ADDR=STRANGER,
        HTTP_X_FORWARDED_FOR="203.0.113.99",
    )
    assert limited.status_code == HTTPStatus.TOO_MANY_REQUESTS


def test_behind_a_trusted_proxy_each_client_has_its_own_count(client, db):
    for _ in range(LIMIT):
        get_me(client, generate_key(), REMOTE_ADDR=PROXY, HTTP_X_FORWARDED_FOR=STRANGER)
    limited = get_me(
        client, generate_key(), REMOTE_ADDR=PROXY, HTTP_X_FORWARDED_FOR=STRANGER
    )
    other = get_me(
        client, generate_key(), REMOTE_ADDR=PROXY, HTTP_X_FORWARDED_FOR="203.0.113.5"
    )
    assert limited.status_code == HTTPStatus.TOO_MANY_REQUESTS
    assert other.status_code == HTTPStatus.UNAUTHORIZED


def test_zero_turns_the_limit_off(client, db, settings):
    settings.AUTH_FAILURES_PER_MINUTE = 0
    statuses = {get_me(client, generate_key()).status_code for _ in range(LIMIT * 2)}
    assert statuses == {HTTPStatus.UNAUTHORIZED}


# --- the client-address rule ----------------------------------------------------

PROXIES = parse_networks(["127.0.0.1/32", "::1/128", "10.0.0.0/8"], name="TEST")


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("198.51.100.7", None, "198.51.100.7"),
        ("198.51.100.7", "203.0.113.1", "198.51.100.7"),  # untrusted peer: ignored
        ("127.0.0.1", None, "127.0.0.1"),
        ("127.0.0.1", "203.0.113.1", "203.0.113.1"),
        ("127.0.0.1", "1.1.1.1, 203.0.113.1", "203.0.113.1"),  # right-most hop
        ("127.0.0.1", "203.0.113.1, 10.1.2.3", "203.0.113.1"),  # skips our proxies
        ("127.0.0.1", "10.9.9.9, 10.1.2.3", "10.9.9.9"),  # all trusted: left-most
        ("127.0.0.1", "garbage, 203.0.113.1", "203.0.113.1"),
        ("127.0.0.1", "203.0.113.1, garbage", "127.0.0.1"),
        ("::1", "2001:db8::1", "2001:db8::1"),
        ("::ffff:127.0.0.1", "203.0.113.1", "203.0.113.1"),  # dual-stack socket
        ("", "203.0.113.1", None),
    ],
)
def test_client_address_believes_forwarded_for_only_from_trusted_peers(
    peer, forwarded, expected
):
    meta = {"REMOTE_ADDR": peer}
    if forwarded is not None:
        meta["HTTP_X_FORWARDED_FOR"] = forwarded
    assert address_from_meta(meta, PROXIES) == expected


def test_trusted_proxies_must_be_addresses_or_networks():
    assert parse_networks(["10.0.0.1"], name="X") == (
        ipaddress.ip_network("10.0.0.1/32"),
    )
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES"):
        parse_networks(["proxy.internal"], name="TRUSTED_PROXIES")


# --- in Redis: shared, and no extra round trip for a working key ----------------


@pytest.fixture
def own_redis(tmp_path, settings):
    with redis_process(tmp_path) as server:
        settings.REDIS_URL = server.url
        yield server


def command_calls(url: str) -> dict[str, int]:
    stats = redis.Redis.from_url(url).info("commandstats")
    return {name.removeprefix("cmdstat_"): row["calls"] for name, row in stats.items()}


def delta(before: dict[str, int], after: dict[str, int], command: str) -> int:
    return after.get(command, 0) - before.get(command, 0)


def test_failures_are_counted_in_the_shared_redis(client, db, own_redis):
    for _ in range(LIMIT):
        get_me(client, generate_key())
    window, _ = current_window()

    stored = redis.Redis.from_url(own_redis.url).get(
        auth_failure_key("127.0.0.1", window)
    )
    assert int(stored) == LIMIT
    assert get_me(client, generate_key()).status_code == 429


def test_a_working_key_pays_no_failure_counter_read(client, db, own_redis):
    _, raw = make_api_key(rate_limit=100)
    assert get_me(client, raw).status_code == HTTPStatus.OK  # first: one read
    before = command_calls(own_redis.url)

    for _ in range(10):
        assert get_me(client, raw).status_code == HTTPStatus.OK
    after_good = command_calls(own_redis.url)
    for _ in range(3):
        get_me(client, generate_key())
    after_bad = command_calls(own_redis.url)

    assert delta(before, after_good, "get") == 0
    assert delta(before, after_good, "evalsha") == 10  # the key's own limit
    assert delta(after_good, after_bad, "get") == 3  # guesses: read, then count
    assert delta(after_good, after_bad, "evalsha") == 3


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TRUSTED_PROXIES", "proxy.internal"),
        ("TRUSTED_PROXIES", "10.0.0.0/33"),
        ("AUTH_FAILURES_PER_MINUTE", "-1"),
        ("AUTH_FAILURES_PER_MINUTE", "many"),
        ("ADMIN_LOGIN_FAILURES", "0"),
    ],
)
def test_bad_edge_settings_stop_start_up_with_one_line(variable, value):
    from tests.serving import manage, process_env

    result = manage("check", env=process_env(**{variable: value}))

    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr
