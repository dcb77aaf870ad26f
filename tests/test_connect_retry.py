"""Opening a connection: bounded retries of refused or starting-up servers only.

Every connection here is real: attempts are counted by wrapping
``psycopg.connect`` on one backend instance, not by faking the server.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from django.db import OperationalError

from lockngen.database import connect_retry_delays
from lockngen.db.base import is_transient_connect_error
from tests.serving import free_port

BASE_DIR = Path(__file__).resolve().parent.parent
PASSWORD = "n0t-in-any-0utput"
# Enough retries (~9 s of backoff) for a cluster started late to come up.
PATIENT = {"DB_CONNECT_RETRIES": "8", "DB_CONNECT_TIMEOUT": "2"}
PATIENT_GUNICORN = {"GUNICORN_TIMEOUT": "120"}


class CountingPsycopg:
    """Stands in for the ``psycopg`` module on one backend; connects for real."""

    def __init__(self, on_attempt: Callable[[int], None] | None = None) -> None:
        self.attempts: list[float] = []
        self.on_attempt = on_attempt

    def connect(self, *args, **kwargs):
        self.attempts.append(time.monotonic())
        if self.on_attempt:
            self.on_attempt(len(self.attempts))
        return psycopg.connect(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(psycopg, name)


def counted(backend, **kwargs) -> CountingPsycopg:
    backend.Database = counter = CountingPsycopg(**kwargs)
    return counter


def closed_port_url() -> str:
    return f"postgres://lockn:{PASSWORD}@127.0.0.1:{free_port()}/lockngen"


def retry_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "lockngen.db.base"]


@pytest.mark.parametrize("retries", [0, 1, 3], ids=lambda n: f"{n}-retries")
def test_refused_connection_is_tried_once_plus_retries_with_growing_delays(
    make_backend, caplog, retries
):
    backend = make_backend(closed_port_url(), DB_CONNECT_RETRIES=str(retries))
    counter = counted(backend)

    with pytest.raises(OperationalError, match="refused"):
        backend.ensure_connection()

    assert len(counter.attempts) == 1 + retries
    gaps = [b - a for a, b in zip(counter.attempts, counter.attempts[1:], strict=False)]
    delays = connect_retry_delays(retries)
    assert delays == sorted(delays)
    # Sleeps never end early: each gap is at least its (growing) backoff delay.
    assert all(gap >= delay for gap, delay in zip(gaps, delays, strict=True)), gaps
    assert [r.getMessage().rsplit(" ", 1)[-1] for r in retry_warnings(caplog)] == [
        f"{delay:.2f}s" for delay in delays
    ]


@pytest.mark.postgres_cluster
def test_database_that_comes_up_during_the_retries_is_reached(make_backend, pg_cluster):
    pg_cluster.stop()
    backend = make_backend(pg_cluster.url(), **PATIENT, **PATIENT_GUNICORN)
    starter = threading.Thread(target=pg_cluster.start, kwargs={"wait": False})

    def start_after_first_attempt(attempt: int) -> None:
        if attempt == 1:
            starter.start()

    counter = counted(backend, on_attempt=start_after_first_attempt)
    try:
        with backend.cursor() as cursor:
            cursor.execute("SELECT inet_server_port()")
            (port,) = cursor.fetchone()
    finally:
        starter.join(timeout=60)

    assert port == pg_cluster.port
    assert 2 <= len(counter.attempts) <= 9


@pytest.mark.parametrize(
    "mistake",
    [
        pytest.param({"dbname": "lockngen_no_such_database"}, id="unknown-database"),
        pytest.param({"user": "lockngen_no_such_role"}, id="unknown-role"),
    ],
)
def test_a_server_that_answers_with_an_error_is_not_retried(
    make_backend, test_database_url, caplog, mistake
):
    base = psycopg.conninfo.conninfo_to_dict(test_database_url)
    parts = {**base, **mistake}
    url = (
        f"postgres://{parts['user']}@{parts['host']}:{parts['port']}/{parts['dbname']}"
    )
    backend = make_backend(url, **PATIENT, **PATIENT_GUNICORN)
    counter = counted(backend)

    with pytest.raises(OperationalError, match="does not exist"):
        backend.ensure_connection()

    assert len(counter.attempts) == 1
    assert retry_warnings(caplog) == []


@pytest.mark.sqlite_smoke
@pytest.mark.parametrize(
    ("error", "transient"),
    [
        pytest.param(
            psycopg.OperationalError(
                'connection failed: connection to server at "127.0.0.1", port 1 '
                "failed: Connection refused"
            ),
            True,
            id="refused",
        ),
        pytest.param(
            psycopg.errors.CannotConnectNow("the database system is starting up"),
            True,
            id="starting-up-57P03",
        ),
        pytest.param(
            psycopg.OperationalError("FATAL:  the database system is shutting down"),
            True,
            id="shutting-down",
        ),
        pytest.param(
            psycopg.OperationalError('FATAL:  database "x" does not exist'),
            False,
            id="unknown-database",
        ),
        pytest.param(
            psycopg.errors.InvalidPassword("password authentication failed"),
            False,
            id="bad-password",
        ),
        pytest.param(ValueError("connection refused"), False, id="not-a-db-error"),
    ],
)
def test_only_refused_or_starting_up_connections_count_as_transient(error, transient):
    assert is_transient_connect_error(error) is transient


# --- manage.py wait_for_db ------------------------------------------------------


def wait_for_db(
    database_url: str, *args: str, background: bool = False
) -> subprocess.Popen[str] | subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"LOCKNGEN_ENV", "DB_CONNECT_RETRIES", "DB_POOL"}
    }
    env["DATABASE_URL"] = database_url
    command = [sys.executable, "manage.py", "wait_for_db", *args]
    if background:
        return subprocess.Popen(
            command,
            cwd=BASE_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    return subprocess.run(
        command, cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )


def test_wait_for_db_exits_0_when_the_database_answers(test_database_url):
    result = wait_for_db(test_database_url, "--timeout", "10")
    assert result.returncode == 0, result.stderr
    assert "is up" in result.stdout


def test_wait_for_db_gives_up_with_one_line_naming_host_and_port():
    url = closed_port_url()
    port = url.rsplit(":", 1)[1].split("/")[0]

    result = wait_for_db(url, "--timeout", "2")

    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{port}" in lines[0]
    assert PASSWORD not in result.stderr + result.stdout


@pytest.mark.postgres_cluster
def test_wait_for_db_waits_for_a_database_that_starts_late(pg_cluster):
    pg_cluster.stop()
    waiting = wait_for_db(pg_cluster.url(), "--timeout", "60", background=True)
    try:
        time.sleep(1)
        assert waiting.poll() is None, "wait_for_db gave up on a stopped database"
        pg_cluster.start()
        stdout, stderr = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert waiting.returncode == 0, stderr
    assert f"127.0.0.1:{pg_cluster.port} is up" in stdout
