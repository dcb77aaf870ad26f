"""The service behind a real PgBouncer in transaction mode (SPEC §7, scale profile).

Debian's ``pgbouncer`` (installed by ``.ci/run``) runs as the ``postgres``
user on a free port in front of the local PostgreSQL, for a scratch role and
database of our own. As in the compose file, the role's statement timeout
comes from ``docker/postgres/initdb`` (PgBouncer refuses startup options), the
schema is migrated over a direct connection, and the api runs with
``DB_PGBOUNCER=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from apikeys.keys import DEFAULT_DEV_API_KEY
from tests.serving import (
    BASE_DIR,
    free_port,
    manage,
    process_env,
    scratch_database,
    scratch_role,
    serving,
    url_for,
)

START_DEADLINE_S = 30
INIT_SCRIPT = BASE_DIR / "docker" / "postgres" / "initdb" / "10-statement-timeout.sql"
REDIS_URL = "redis://127.0.0.1:6379/15"
AUTH = {"Authorization": f"Bearer {DEFAULT_DEV_API_KEY}"}


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(found).is_file():
        pytest.fail("pgbouncer is not installed: apt-get install -y pgbouncer")
    return found


@dataclass
class PgBouncer:
    port: int
    log_path: Path


@contextlib.contextmanager
def running_pgbouncer(*, database: str, role: str) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode for one database, as the postgres user."""
    workdir = Path(tempfile.mkdtemp(prefix="ops_pgbouncer_"))
    workdir.chmod(0o755)  # readable by the postgres user
    port = free_port()
    server = url_for("postgres")
    host, server_port = server.split("@")[1].split("/")[0].split(":")
    (workdir / "userlist.txt").write_text(f'"{role}" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        f"""[databases]
{database} = host={host} port={server_port} dbname={database}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir}/userlist.txt
pool_mode = transaction
max_client_conn = 200
default_pool_size = 5
ignore_startup_parameters = extra_float_digits
log_connections = 1
"""
    )
    log_path = workdir / "pgbouncer.log"
    command = [pgbouncer_binary(), str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        command = ["runuser", "-u", "postgres", "--", *command]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"pgbouncer exited:\n{log_path.read_text()}")
            try:
                psycopg.connect(url_for(database, user=role, port=port)).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    pytest.fail(f"pgbouncer never answered:\n{log_path.read_text()}")
                time.sleep(0.1)
        yield PgBouncer(port=port, log_path=log_path)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Pooled:
    role: str
    database: str
    bouncer: PgBouncer

    def url(self, **query: str) -> str:
        return url_for(self.database, user=self.role, port=self.bouncer.port, **query)

    def env(self, **extra: str) -> dict[str, str]:
        settings = {"DATABASE_URL": self.url(), "DB_PGBOUNCER": "1"}
        return process_env(**(settings | {"REDIS_URL": REDIS_URL} | extra))


@pytest.fixture(scope="module")
def pooled() -> Iterator[Pooled]:
    with scratch_role() as role, scratch_database(owner=role) as database:
        direct = url_for(database, user=role)
        with psycopg.connect(direct, autocommit=True) as conn:
            conn.execute(INIT_SCRIPT.read_text())  # as the postgres image would
        migrated = manage("migrate", "--noinput", env=process_env(DATABASE_URL=direct))
        assert migrated.returncode == 0, migrated.stderr
        with running_pgbouncer(database=database, role=role) as bouncer:
            yield Pooled(role=role, database=database, bouncer=bouncer)


def test_the_role_statement_timeout_reaches_sessions_through_pgbouncer(pooled):
    with psycopg.connect(pooled.url()) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("30s",)


def test_the_role_time_zone_is_utc_so_django_never_sets_it_per_session(pooled):
    # A session-level SET TIME ZONE would leak between clients under
    # transaction pooling; with the role in UTC Django has nothing to set.
    with psycopg.connect(pooled.url()) as conn:
        assert conn.execute("SHOW timezone").fetchone() == ("UTC",)


def test_db_pgbouncer_is_what_lets_the_service_connect(pooled):
    """Without it our backend sends startup options, which PgBouncer refuses."""
    on = manage("wait_for_db", "--timeout", "1", env=pooled.env())
    off = manage(
        "wait_for_db",
        "--timeout",
        "1",
        env=pooled.env(DB_PGBOUNCER="0", DB_CONNECT_RETRIES="0"),
    )
    assert on.returncode == 0, on.stderr
    assert off.returncode == 1
    assert "unsupported startup parameter: options" in off.stderr


def test_health_is_ready_through_pgbouncer(pooled, tmp_path):
    with serving(pooled.env(), log_path=tmp_path / "server.log") as server:
        ready = server.get("/health/ready")
        report = server.get("/health/?format=json")
    assert ready.status == HTTPStatus.OK
    assert json.loads(report.body)["status"] == "healthy", report.body
    log = pooled.bouncer.log_path.read_text()
    assert f"login attempt: db={pooled.database} user={pooled.role}" in log


def test_api_smoke_path_through_pgbouncer(pooled, tmp_path):
    """Create, list two pages, claim, heartbeat, complete — all through PgBouncer."""
    with serving(pooled.env(), log_path=tmp_path / "server.log") as server:

        def call(method: str, path: str, payload: dict | None = None):
            response = server.request(
                method,
                path,
                headers=AUTH | {"Content-Type": "application/json"},
                body=None if payload is None else json.dumps(payload).encode(),
            )
            return response.status, json.loads(response.body or "null")

        created = [
            call("POST", "/api/v1/generations", {"prompt": f"lighthouse {n}"})
            for n in range(3)
        ]
        first_status, first = call("GET", "/api/v1/generations?page_size=2")
        following = urlsplit(first["next"])
        second_status, second = call("GET", f"{following.path}?{following.query}")
        claim_status, claim = call("POST", "/api/v1/generations/claim")
        (claimed,) = claim["jobs"]
        job = f"/api/v1/generations/{claimed['id']}"
        lease = {"lease_token": claimed["lease_token"]}
        beat_status, beat = call("POST", f"{job}/heartbeat", lease)
        done_status, done = call(
            "POST",
            f"{job}/complete",
            {**lease, "output_path": "/renders/lighthouse.png"},
        )
        read_status, read = call("GET", job)

    assert [status for status, _ in created] == [HTTPStatus.CREATED] * 3
    created_ids = {generation["id"] for _, generation in created}
    assert (first_status, second_status) == (HTTPStatus.OK, HTTPStatus.OK)
    pages = [first["results"], second["results"]]
    assert [len(page) for page in pages] == [2, 1]
    assert {generation["id"] for page in pages for generation in page} == created_ids
    assert second["next"] is None
    assert claim_status == HTTPStatus.OK
    assert (claimed["status"], claimed["attempts"]) == ("running", 1)
    assert claimed["id"] in created_ids
    assert (beat_status, beat["status"]) == (HTTPStatus.OK, "running")
    assert beat["lease_expires_at"] >= claimed["lease_expires_at"]
    assert (done_status, done["status"]) == (HTTPStatus.OK, "completed")
    assert done["output_path"] == "/renders/lighthouse.png"
    assert done["duration_ms"] >= 0
    assert (read_status, read["status"]) == (HTTPStatus.OK, "completed")
