"""The connection settings really reach a live PostgreSQL server.

Each test opens its own backend from ``lockngen.database.database_config`` (the
code path settings use), so pools and killed connections never touch Django's
``default`` connection.
"""

from __future__ import annotations

import logging
import traceback
from http import HTTPStatus

import psycopg
import pytest
from django.db import OperationalError, connection
from django.http import HttpResponse
from django.test import RequestFactory

from lockngen.database import APPLICATION_NAME
from lockngen.middleware import DatabaseUnavailableMiddleware
from tests.serving import free_port

PASSWORD = "Pa55-never-logged"
POOL = {"DB_POOL": "1", "DB_POOL_MIN_SIZE": "1", "DB_POOL_MAX_SIZE": "1"}


def backend_pid(backend) -> int:
    with backend.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def terminate(database_url: str, pid: int) -> None:
    """Kill one server backend, as a restart or an idle-timeout would."""
    with psycopg.connect(database_url, autocommit=True) as admin:
        # The timeout makes the call wait until the backend is really gone.
        killed = admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
        assert killed.fetchone() == (True,)


def new_request(backend) -> None:
    """What Django does for every connection when a request starts or ends."""
    backend.close_if_unusable_or_obsolete()


@pytest.mark.django_db
def test_django_connection_carries_statement_timeout_and_application_name():
    with connection.cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        (statement_timeout,) = cursor.fetchone()
        cursor.execute(
            "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
        (application_name,) = cursor.fetchone()
    assert statement_timeout not in {"0", ""}
    assert application_name == APPLICATION_NAME


def test_statement_timeout_from_the_environment_cancels_long_statements(
    make_backend, test_database_url
):
    backend = make_backend(test_database_url, DB_STATEMENT_TIMEOUT_MS="250")
    with backend.cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        assert cursor.fetchone() == ("250ms",)
        with pytest.raises(OperationalError, match="statement timeout"):
            cursor.execute("SELECT pg_sleep(5)")


@pytest.mark.parametrize(
    ("env", "startup_option"),
    [
        pytest.param({}, True, id="direct"),
        pytest.param(POOL, True, id="pool"),
        pytest.param({"DB_PGBOUNCER": "1"}, False, id="pgbouncer-refuses-options"),
    ],
)
def test_new_connections_start_in_utc_without_a_set_round_trip(
    make_backend, test_database_url, env, startup_option
):
    backend = make_backend(test_database_url, alias="lockngen_tz", **env)
    with backend.cursor() as cursor:
        cursor.execute(
            "SELECT setting, source FROM pg_settings WHERE name = 'TimeZone'"
        )
        setting, source = cursor.fetchone()
    assert setting == "UTC"
    # "client": it came in the startup packet; otherwise Django SET it.
    assert (source == "client") is startup_option


def test_pool_hands_the_same_server_connection_to_the_next_checkout(
    make_backend, test_database_url
):
    backend = make_backend(test_database_url, alias="lockngen_pool_reuse", **POOL)
    first = backend_pid(backend)
    backend.close()  # back to the pool, not to the server
    second = backend_pid(backend)
    backend.close()

    assert second == first
    assert backend.pool.get_stats()["connections_num"] == 1


@pytest.mark.parametrize(
    "mode",
    [pytest.param({}, id="direct"), pytest.param(POOL, id="pool")],
)
def test_health_checks_replace_a_killed_connection_without_failing_the_next_query(
    make_backend, test_database_url, mode
):
    backend = make_backend(test_database_url, alias="lockngen_health", **mode)
    killed = backend_pid(backend)
    new_request(backend)  # pool mode (CONN_MAX_AGE=0): back to the pool

    terminate(test_database_url, killed)
    new_request(backend)

    replacement = backend_pid(backend)
    assert replacement != killed


def test_without_health_checks_the_killed_connection_would_fail_the_request(
    make_backend, test_database_url
):
    """Control for the test above: the kill really breaks the old connection."""
    backend = make_backend(test_database_url)
    backend.settings_dict["CONN_HEALTH_CHECKS"] = False
    killed = backend_pid(backend)
    new_request(backend)

    terminate(test_database_url, killed)
    new_request(backend)

    with pytest.raises(OperationalError):
        backend_pid(backend)


@pytest.mark.parametrize(
    "server",
    [
        pytest.param("closed-port", id="closed-port"),
        pytest.param("live-server-unknown-user", id="live-server-unknown-user"),
    ],
)
def test_password_never_appears_in_errors_or_log_records(
    make_backend, test_database_url, caplog, server
):
    caplog.set_level(logging.DEBUG)
    if server == "closed-port":
        url = f"postgres://lockn:{PASSWORD}@127.0.0.1:{free_port()}/lockngen"
    else:
        live = psycopg.conninfo.conninfo_to_dict(test_database_url)
        url = (
            f"postgres://lockngen_nobody:{PASSWORD}@{live['host']}:{live['port']}/"
            f"{live['dbname']}"
        )
    backend = make_backend(url, DB_CONNECT_RETRIES="2")

    with pytest.raises(OperationalError) as excinfo:
        backend.ensure_connection()

    # What a request meeting this error would log and answer.
    middleware = DatabaseUnavailableMiddleware(lambda request: HttpResponse())
    response = middleware.process_exception(
        RequestFactory().get("/api/v1/generations"), excinfo.value
    )

    assert backend.settings_dict["PASSWORD"] == PASSWORD  # it was really sent
    assert response.status_code == HTTPStatus.SERVICE_UNAVAILABLE
    assert PASSWORD not in response.content.decode()
    assert PASSWORD not in "".join(traceback.format_exception(excinfo.value))
    assert any(r.name == "lockngen.middleware" for r in caplog.records)
    for record in caplog.records:
        assert PASSWORD not in record.getMessage()
        assert PASSWORD not in str(record.args)
        if record.exc_info:
            assert PASSWORD not in "".join(traceback.format_exception(*record.exc_info))
