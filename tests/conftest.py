"""Shared fixtures. The suite runs against PostgreSQL (``make test``)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

BASE_DIR = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix):
    """Let concurrent runs on one server use distinct test databases.

    ``TEST_DB_SUFFIX=foo`` makes the test database ``test_<name>_foo``.
    """
    suffix = os.environ.get("TEST_DB_SUFFIX", "").strip()
    if suffix:
        from django.conf import settings

        db = settings.DATABASES["default"]
        if db["ENGINE"] == "django.db.backends.sqlite3":
            return  # an in-memory test database: private to this run already
        test = db.setdefault("TEST", {})
        base = test.get("NAME") or f"test_{db['NAME']}"
        test["NAME"] = f"{base}_{suffix}"


@pytest.fixture(autouse=True)
def fresh_local_counters():
    """Process-memory counters start empty in every test.

    The test client is always 127.0.0.1: without this, failed authentications
    of earlier tests would count against the next one's per-address limit.
    """
    from django.core.cache import caches

    caches["default"].clear()


@pytest.fixture(autouse=True)
def no_waker_left():
    """A test that committed a webhook event leaves no waker thread behind
    (``webhooks.wake``), nor its connection, which would keep the test
    database from being dropped at the end of the run."""
    yield
    wake = sys.modules.get("webhooks.wake")
    if wake is not None:
        assert wake.waker.stop(), "the webhook waker thread did not stop"


# Half a second into a one-minute window: what the stopped clock reads.
STOPPED_CLOCK = 1_000_000 * 60 + 0.5


@pytest.fixture
def stopped_clock(monkeypatch) -> float:
    """The rate limiter's clock stands still half a second into one window.

    A test that counts up to a limit (rate limits, auth failures) can then
    never see its counters roll over half-way, with no sleep and with a
    known ``Retry-After``. Returns the clock's reading.
    """
    from apikeys.ratelimit import current_window

    limiter = sys.modules[current_window.__module__]  # wherever the limiter lives
    monkeypatch.setattr(limiter, "clock", lambda: STOPPED_CLOCK)
    return STOPPED_CLOCK


@pytest.fixture
def inside_one_minute_window():
    """Start well inside a fixed one-minute window of the real clock.

    Only for counts made inside a server subprocess (tests/test_redis_faults.py),
    whose clock the test cannot stop: they must not see the real clock roll
    their counters over half-way. In-process tests use ``stopped_clock``.
    """
    import time

    margin = 10  # no such test takes this long
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)


@pytest.fixture(scope="session")
def pg_cluster_session():
    """One throwaway PostgreSQL cluster for the whole run (see tests/pgcluster.py)."""
    from tests.pgcluster import PgCluster

    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def pg_cluster(pg_cluster_session):
    """The throwaway cluster, running when the test starts.

    Tests may stop, restart or crash it; the next test gets it running again.
    Mark such tests ``@pytest.mark.postgres_cluster``.
    """
    pg_cluster_session.start()
    return pg_cluster_session


@pytest.fixture
def test_database_url(django_db_setup, django_db_blocker):
    """A URL for this run's test database, with database access unblocked.

    For tests that open connections of their own (fresh backends, pools,
    subprocesses) next to Django's ``default`` one.
    """
    from django.db import connections

    settings_dict = connections["default"].settings_dict
    if settings_dict["ENGINE"] != "lockngen.db":
        pytest.fail("this test needs DATABASE_URL to point at PostgreSQL")
    with django_db_blocker.unblock():
        yield database_url(settings_dict)


def database_url(settings_dict: dict) -> str:
    """``postgres://`` URL of a Django PostgreSQL settings dict (password kept)."""
    user = quote(settings_dict["USER"] or "", safe="")
    if settings_dict["PASSWORD"]:
        user += ":" + quote(settings_dict["PASSWORD"], safe="")
    host = quote(settings_dict["HOST"] or "localhost", safe="")  # may be a socket dir
    port = settings_dict["PORT"] or 5432
    return f"postgres://{user}@{host}:{port}/{settings_dict['NAME']}"


@pytest.fixture
def make_backend(django_db_blocker):
    """Build fresh ``lockngen.db`` connections from environment variables.

    ``make_backend(url, DB_POOL="1")`` returns an unconnected DatabaseWrapper
    configured exactly as settings would configure it. Database access is
    unblocked for the test; every wrapper (and its pool) is closed afterwards.
    """
    from django.db.utils import ConnectionHandler, load_backend

    from lockngen.database import database_config

    made = []

    def make(url: str, *, alias: str = "lockngen_test", **env: str):
        config = database_config(
            {"DATABASE_URL": url, **env}, production=False, base_dir=BASE_DIR
        )
        settings_dict = ConnectionHandler({"default": config}).settings["default"]
        backend = load_backend(settings_dict["ENGINE"]).DatabaseWrapper(
            settings_dict, alias
        )
        made.append(backend)
        return backend

    with django_db_blocker.unblock():
        yield make
        for backend in made:
            with contextlib.suppress(Exception):  # a test may have broken it
                backend.close()
            with contextlib.suppress(Exception):
                backend.close_pool()


# --- REST API clients (tests/test_api*.py, test_auth*.py, test_ratelimit.py) ---


class ApiClient:
    """Django's test client speaking JSON to ``/api/v1`` with one API key."""

    def __init__(self, client, raw_key: str | None) -> None:
        self.client = client
        self.raw_key = raw_key

    def request(self, method: str, path: str, body=None, *, headers=None, **extra):
        import json

        all_headers = {}
        if self.raw_key is not None:
            all_headers["Authorization"] = f"Bearer {self.raw_key}"
        all_headers.update(headers or {})
        if body is not None and not isinstance(body, bytes | str):
            body = json.dumps(body)
        url = path if path.startswith(("/", "http")) else f"/api/v1/{path}"
        return self.client.generic(
            method,
            url,
            body if body is not None else b"",
            content_type=extra.pop("content_type", "application/json"),
            headers=all_headers,
            **extra,
        )

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body=None, **kwargs):
        return self.request("POST", path, body, **kwargs)

    def claim_one(self, **body) -> dict:
        """``POST generations/claim`` for one job: that job's JSON (asserts 200)."""
        response = self.post("generations/claim", body or None)
        assert response.status_code == 200, response.content
        (job,) = response.json()["jobs"]
        return job

    def patch(self, path: str, body=None, **kwargs):
        return self.request("PATCH", path, body, **kwargs)

    def delete(self, path: str, **kwargs):
        return self.request("DELETE", path, **kwargs)


@pytest.fixture
def api_as(db):
    """``api_as(raw_key)`` → an ``ApiClient`` (``None``: no credentials)."""
    from django.test import Client

    return lambda raw_key: ApiClient(Client(), raw_key)


@pytest.fixture
def admin_key(db):
    """``(ApiKey, raw)``: an unlimited admin key (it may do what a worker does)."""
    from tests.factories import make_api_key

    return make_api_key(name="worker", is_admin=True, rate_limit=0)


@pytest.fixture
def worker_key(db):
    """``(ApiKey, raw)``: an unlimited worker key."""
    from tests.factories import make_api_key

    return make_api_key(name="gpu box", is_worker=True, rate_limit=0)


@pytest.fixture
def owner_key(db):
    """``(ApiKey, raw)``: an unlimited client key."""
    from tests.factories import make_api_key

    return make_api_key(name="owner", rate_limit=0)


@pytest.fixture
def other_key(db):
    """``(ApiKey, raw)``: another unlimited client key."""
    from tests.factories import make_api_key

    return make_api_key(name="other", rate_limit=0)


@pytest.fixture
def admin_api(api_as, admin_key):
    return api_as(admin_key[1])


@pytest.fixture
def worker_api(api_as, worker_key):
    return api_as(worker_key[1])


@pytest.fixture
def owner_api(api_as, owner_key):
    return api_as(owner_key[1])


@pytest.fixture
def other_api(api_as, other_key):
    return api_as(other_key[1])
